"""One sampling step of a rectified flow, deterministic or stochastic, with its Gaussian log-prob.

Convention (docs/algorithms.md §1.1): ``x_σ = (1 − σ)·x0 + σ·ε``, the network predicts ``v = ε − x0``, so
``x̂0 = x − σ·v`` and ``ε̂ = x + (1 − σ)·v``. A step goes from σ to σ' < σ, ``dt = σ' − σ < 0``.

Algorithm (§2.1–2.3), in float32 whatever the dtype of v and x:
  1. σ and σ' (scalars or (B,) arrays) are broadcast per sample to (B, 1, ..., 1).
  2. Mean μ and std of the Gaussian transition, by kind:
     - ``ode``: ``μ = x + dt·v``, std 0 (MixGRPO ``flow_grpo_step(determistic=True)``).
     - ``dance``, ``flow_grpo``: Euler–Maruyama on the reverse SDE
       ``dx = [v − (g²/2)·score] dt + g dW`` with ``score = −ε̂/σ``:
       ``μ = x + dt·(v + g²/(2σ)·ε̂)``, ``std = g·sqrt(−dt)``, where
       - ``dance`` (XueZeyue/DanceGRPO:fastvideo/train_grpo_flux.py ``flux_step``): g = η;
       - ``flow_grpo`` (yifan123/flow_grpo:flow_grpo/diffusers_patch/sd3_sde_with_logprob.py):
         ``g = a·sqrt(σ/(1 − σ̃))``, σ̃ = σ' at σ = 1 (their ``sigmas[1]`` at step 0), else σ.
       Both repositories' own formulas reduce to this (tests/test_flow_steps.py checks).
     - ``cps`` (arXiv 2509.05952; flow_grpo ``sde_type="cps"``): ``std = σ'·sin(aπ/2)``,
       ``μ = x̂0·(1 − σ') + ε̂·sqrt(σ'² − std²) = x̂0·(1 − σ') + ε̂·σ'·cos(aπ/2)``.
  3. ``x_next = μ + std·z``, z ~ N(0, I) from ``key``; or x_next is given (re-scoring a stored
     transition).
  4. Log-prob, a per-element MEAN over the non-batch axes (§2.3):
     - ``dance``, ``flow_grpo``: ``mean_elem(−(x_next − μ)²/(2·std²) − log std − log sqrt(2π))``
       (some DanceGRPO versions lose both constants to a stray line break; they cancel in ratios);
     - ``cps``: ``mean_elem(−(x_next − μ)²)``, all constants dropped as in flow_grpo, so CPS
       log-ratios are on another scale than the SDE kinds;
     - ``ode``, and any transition whose std is exactly 0 (a = 0): 0.
  5. Bit-exact re-scoring: the rollout and the re-score are different XLA programs, so μ, the square
     sum and the per-sample coefficients are written to round identically under any fusion (see
     ``_mean_std``, ``_reduce_mean``); then ``logp_new == logp_old`` exactly with unchanged params.

The step is pure and jit-able; ``kind`` is static.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

STEP_KINDS = ('ode', 'dance', 'flow_grpo', 'cps')

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class StepOutput(NamedTuple):
  """Result of one step; all float32.

  Attributes:
    x_next: (B, ...) the sampled (or given) next state.
    mean: (B, ...) mean of the Gaussian transition.
    std: (B, 1, ..., 1) std of the transition, sqrt(−dt) included for the SDE kinds; 0 for 'ode'.
    logp: (B,) per-element mean log-density of x_next (constants dropped for 'cps'; 0 for 'ode').
  """
  x_next: jax.Array
  mean: jax.Array
  std: jax.Array
  logp: jax.Array


def check_step_kind(kind: str) -> None:
  """Raises ValueError if ``kind`` is not one of ``STEP_KINDS``."""
  if kind not in STEP_KINDS:
    raise ValueError(f'Unknown flow step kind {kind!r}; valid kinds: {STEP_KINDS}.')


def per_sample(value: Any, x: jax.Array) -> jax.Array:
  """Float32 scalar or (B,) array -> (B, 1, ..., 1), broadcastable against x of shape (B, ...)."""
  value = jnp.asarray(value, jnp.float32)
  batch = x.shape[0]
  if value.ndim == 0:
    value = jnp.broadcast_to(value, (batch,))
  elif value.shape != (batch,):
    raise ValueError(f'Expected a scalar or a ({batch},) array for x of shape {x.shape}, '
                     f'got shape {value.shape}.')
  return value.reshape((batch,) + (1,) * (x.ndim - 1))


def predicted_x0(x: jax.Array, sigma: Any, v: jax.Array) -> jax.Array:
  """x̂0 = x − σ·v in float32; σ is a scalar or a (B,) array."""
  x = jnp.asarray(x, jnp.float32)
  return x - per_sample(sigma, x) * jnp.asarray(v, jnp.float32)


def predicted_noise(x: jax.Array, sigma: Any, v: jax.Array) -> jax.Array:
  """ε̂ = x + (1 − σ)·v in float32; σ is a scalar or a (B,) array."""
  x = jnp.asarray(x, jnp.float32)
  return x + (1.0 - per_sample(sigma, x)) * jnp.asarray(v, jnp.float32)


def _noise_constants(kind: str, noise_level: Any, x: jax.Array) -> dict[str, jax.Array]:
  """Float32 terms of the noise level: scalars, or (B, 1, ..., 1) for a per-sample (B,) level.

  A concrete level (a Python or numpy number, the usual config value) becomes literals computed
  in float64 here, so XLA has no product of constants to reassociate; a traced or (B,) level goes
  through jnp.
  Pass the level the same way (concrete or traced) to the rollout and to the re-score.
  """
  concrete = not isinstance(noise_level, jax.Array) and np.ndim(noise_level) == 0
  xp = np if concrete else jnp
  a = np.float64(noise_level) if concrete else per_sample(noise_level, x)
  if kind == 'cps':
    angle = a * (math.pi / 2.0)
    terms = {'cos': xp.cos(angle), 'sin': xp.sin(angle)}
  else:
    terms = {'g': a, 'half_g2': 0.5 * a * a}
  return {k: jnp.asarray(t, jnp.float32) if concrete else t for k, t in terms.items()}


def _mean_std(kind: str, v: jax.Array, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array,
              noise_level: Any) -> tuple[jax.Array, jax.Array]:
  """Transition mean (B, ...) and std (B, 1, ..., 1) in float32; σ, σ' already per-sample.

  The rollout and the log-prob recompute are different XLA programs, fused differently, so the same
  formula must round the same way in any fusion for the GRPO ratio to be exactly 1:
  - XLA on CPU contracts ``a·b + c`` into an FMA inside a fusion, so every sum below has at most one
    product operand (one unambiguous contraction);
  - XLA reassociates products with constants differently for scalar and (B,) σ, so each per-sample
    coefficient is a single division or product of a constant and a σ term (σ cancels where it can).
  """
  dt = sigma_next - sigma
  if kind == 'ode':
    return x + dt * v, jnp.zeros_like(sigma)
  c = _noise_constants(kind, noise_level, x)
  eps_hat = x + (1.0 - sigma) * v
  if kind == 'cps':
    x0_hat = x - sigma * v
    # x̂0·(1 − σ') + ε̂·sqrt(σ'² − std²), using sqrt(σ'² − std²) = σ'·cos(aπ/2) for a ∈ [0, 1] (no
    # negative square root under rounding), regrouped as x̂0 + σ'·(cos·ε̂ − x̂0).
    mean = x0_hat + sigma_next * (c['cos'] * eps_hat - x0_hat)
    return mean, sigma_next * c['sin']
  if kind == 'dance':
    score_coef = c['half_g2'] / sigma  # g²/(2σ) with g = η
    std = c['g'] * jnp.sqrt(-dt)
  else:  # flow_grpo
    # g² = a²·σ/(1 − σ̃); σ̃ = σ except at σ = 1, where σ/(1 − σ) is infinite (Flow-GRPO uses σ_1).
    sigma_den = jnp.where(sigma == 1.0, sigma_next, sigma)
    score_coef = c['half_g2'] / (1.0 - sigma_den)  # g²/(2σ) = a²/(2(1 − σ̃))
    std = c['g'] * jnp.sqrt(sigma * -dt / (1.0 - sigma_den))
  # The drift gains (g²/2)·ε̂/σ = −(g²/2)·score.
  mean = x + dt * (v + score_coef * eps_hat)
  return mean, std


@jax.jit  # One compiled kernel when called eagerly (instead of one per slice); inlined under jit.
def _reduce_mean(a: jax.Array) -> jax.Array:
  """Mean over all non-batch axes (B, ...) -> (B,), summed in a fixed pairwise order.

  XLA reductions have no fixed order (on CPU they are vectorised with reassociation, differently per
  fusion), so a plain jnp.mean rounds differently in the rollout and in the re-score. Halving the
  flattened row with elementwise adds pins the order; it is also the accurate pairwise sum.
  """
  count = math.prod(a.shape[1:])
  a = a.reshape(a.shape[0], count)
  width = 1 << (count - 1).bit_length()
  if width != count:
    a = jnp.pad(a, ((0, 0), (0, width - count)))  # Zeros add exactly.
  while a.shape[1] > 1:
    half = a.shape[1] // 2
    a = a[:, :half] + a[:, half:]
  return a[:, 0] * (1.0 / count)


def _log_prob(kind: str, x_next: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """Per-element mean log-density (B,) of x_next under N(mean, std²)."""
  if kind == 'ode':
    return jnp.zeros(x_next.shape[:1], jnp.float32)
  msq = _reduce_mean(jnp.square(x_next - mean))
  if kind == 'cps':
    return -msq
  # std is shared within a sample, so mean_elem(−Δ²/(2std²) − log std − c) = −mean(Δ²)/(2std²) − ...
  # A zero std (a = 0) has no density: report 0 like the ODE, via a safe std so that neither value
  # nor gradient becomes NaN (also in the unselected branch of a masked step).
  std = std.reshape(-1)
  positive = std > 0
  safe_std = jnp.where(positive, std, 1.0)
  logp = -msq * (0.5 / jnp.square(safe_std)) - jnp.log(safe_std) - _LOG_SQRT_2PI
  return jnp.where(positive, logp, 0.0)


def flow_step(kind: str, v: jax.Array, x: jax.Array, sigma: Any, sigma_next: Any, *,
              noise_level: Any = 0.0, key: jax.Array | None = None,
              x_next: jax.Array | None = None) -> StepOutput:
  """One step from σ to σ' of the given kind (see the module docstring); float32 throughout.

  Args:
    kind: one of ``STEP_KINDS`` (static).
    v: (B, ...) predicted velocity ε − x0, any float dtype.
    x: (B, ...) current state, any float dtype.
    sigma: σ, a scalar or a (B,) array.
    sigma_next: σ' < σ, a scalar or a (B,) array.
    noise_level: η for 'dance', a for 'flow_grpo' and 'cps' (scalar or (B,)); ignored by 'ode'.
    key: PRNG key for the step noise; required by the SDE kinds unless x_next is given.
    x_next: (B, ...) a stored next state; if given, nothing is sampled and its log-prob is returned.

  Returns:
    StepOutput(x_next, mean, std, logp), all float32.

  Raises:
    ValueError: unknown kind, mismatched shapes, or a missing key.
  """
  check_step_kind(kind)
  x = jnp.asarray(x, jnp.float32)
  v = jnp.asarray(v, jnp.float32)
  if v.shape != x.shape or x.ndim < 1:
    raise ValueError(f'v and x must share a (B, ...) shape, got {v.shape} and {x.shape}.')
  if x_next is not None:
    x_next = jnp.asarray(x_next, jnp.float32)
    if x_next.shape != x.shape:
      raise ValueError(f'x_next has shape {x_next.shape}, expected {x.shape}.')
  elif kind != 'ode' and key is None:
    raise ValueError(f'flow_step kind {kind!r} samples noise: pass key= (or a given x_next).')
  sigma = per_sample(sigma, x)
  sigma_next = per_sample(sigma_next, x)
  mean, std = _mean_std(kind, v, x, sigma, sigma_next, noise_level)
  if x_next is None:
    x_next = mean if kind == 'ode' else mean + std * jax.random.normal(key, x.shape, jnp.float32)
  return StepOutput(x_next, mean, std, _log_prob(kind, x_next, mean, std))
