"""R0: regularised reward maximisation of a few-step generator (docs/algorithms.md §8).

Objective (arXiv 2503.13070, inferred): max_θ E_{z,c}[Σ_k w_k·R_k(g_θ(z, c, η), c)] − λ·‖θ − θ0‖².

Per-reward gradient normalisation (R0 v1 Fig. 8): each reward's image-space gradient is divided
by its norm before the weighted sum, so no single reward dominates:
  g_k,b = ∂R_k(x_b)/∂x_b,   d_b = Σ_k w_k·g_k,b / (‖g_k,b‖ + ε)        (per sample b)
and the generator follows d through its Jacobian. With x = g_θ(·) that is the gradient of the
surrogate
  L(θ) = −(1/B)·Σ_b ⟨stop_grad(d_b), x_b(θ)⟩ + λ·‖θ − θ0‖²,
whose θ-gradient is −(1/B)·Σ_b J_bᵀ d_b + 2λ(θ − θ0).

Reward cap (ours, optional): with a cap τ the maximised reward is min(R_k, τ), so a sample whose
reward already exceeds τ gets no push (its gradient is 0, and 0/(0 + ε) = 0). Without it the
per-sample normalisation turns the vanishing gradient of a saturated P("yes") ≈ 1 into a full
unit-norm push, which drives every sample of a prompt to the same image (docs/digits_pipeline.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp


def _per_sample_norm(g: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)), keepdims=True))


def normalized_direction(reward_fns: Mapping[str, Callable[[jax.Array], jax.Array]],
                         weights: Mapping[str, float], x: jax.Array, *,
                         eps: float = 1e-8, cap: float | None = None
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """d = Σ_k w_k·∇_x min(R_k, τ) / (‖∇_x min(R_k, τ)‖ + ε) per sample, and each reward's (B,)
  values (uncapped). τ = `cap`, None = no cap (module docstring).

  Args:
    reward_fns: name → fn(x (B, ...)) → (B,) rewards (per-sample independent).
    weights: name → w_k.
    x: (B, ...) the generated images (any space the reward_fns read).
    eps: added to each per-sample gradient norm.

  Returns:
    (direction (B, ...) fp32, {name: (B,) rewards}); no gradient flows out of either.
  """
  x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  direction = jnp.zeros_like(x)
  values = {}
  for name, fn in reward_fns.items():
    if cap is None:
      r, pullback = jax.vjp(fn, x)
    else:
      capped = lambda x, fn=fn: (lambda r: (jnp.minimum(r, cap), r))(fn(x))  # pylint: disable=unnecessary-lambda-assignment
      _, pullback, r = jax.vjp(capped, x, has_aux=True)
    (g,) = pullback(jnp.ones_like(r))   # rows are independent: row b gets ∂R_k(x_b)/∂x_b
    direction = direction + jnp.float32(weights[name]) * g / (_per_sample_norm(g) + eps)
    values[name] = r
  return direction, values


def surrogate_loss(x: jax.Array, direction: jax.Array) -> jax.Array:
  """−mean_b ⟨stop_grad(d_b), x_b⟩: its gradient w.r.t. x is −d/B (module docstring)."""
  d = jax.lax.stop_gradient(direction)
  prods = jnp.sum(d * jnp.asarray(x, jnp.float32), axis=tuple(range(1, d.ndim)))
  return -jnp.mean(prods)


def l2_to_init(params: Any, init_params: Any) -> jax.Array:
  """‖θ − θ0‖² summed over all leaves (θ0 frozen), fp32 scalar."""
  sq = jax.tree.map(lambda p, p0: jnp.sum(jnp.square(
      jnp.asarray(p, jnp.float32) - jax.lax.stop_gradient(jnp.asarray(p0, jnp.float32)))),
                    params, init_params)
  return sum(jax.tree.leaves(sq), jnp.float32(0.0))
