"""KL between the policy's and the reference's Gaussian step transitions (docs/algorithms.md §2.4).

Two Gaussians with the same std s: KL(N(μθ, s²I) ‖ N(μref, s²I)) = ‖μθ − μref‖²/(2·s²).

Flow-GRPO's code (FG:scripts/train_sd3.py, with μ and ``std_dev_t`` from
FG:flow_grpo/diffusers_patch/sd3_sde_with_logprob.py) computes, per sample,

  kl = mean_elem((μθ − μref)²) / (2·std_dev_t²)                           (``gaussian_mean_kl``)

where ``std_dev_t`` = g EXCLUDES the step's sqrt(−dt): the actual transition std is g·sqrt(|dt|).
So this code form is the true per-element KL multiplied by |dt| (the paper's ‖·‖²/(2σ_t²|Δt|) is
the true one; unverified). The published β values (0.04 GenEval/OCR SD3, 0.01 PickScore, ...)
belong to the code form, which is therefore what we implement (§10 #10). Pass the full step std
(``StepOutput.std`` of ``rewarddance_jax.flow.steps``) as ``std_dev_t`` to get the true KL instead.

Velocity form (inferred, §2.4). Both SDE kinds step with (§2.1)
  μ = x + dt·(v + g²/(2σ)·(x + (1 − σ)·v)),
so for the same x, σ, dt and noise level, the mean difference depends on the velocities only:
  μθ − μref = dt·(1 + g²(1 − σ)/(2σ))·(vθ − vref),
and the code-form KL is ``dt²·(1 + g²(1 − σ)/(2σ))²·mean_elem((vθ − vref)²)/(2g²)``
(``velocity_kl``), with
  'dance'      g = η                          (DG:fastvideo/train_grpo_flux.py ``flux_step``),
  'flow_grpo'  g = a·sqrt(σ/(1 − σ̃)), σ̃ = σ except σ̃ = σ + dt at σ = 1
               (FG ``sde_step_with_logprob``), so g²(1 − σ)/(2σ) = a²(1 − σ)/(2(1 − σ̃)).
'cps' and 'ode' have no such code form (the ODE has no density; CPS uses another mean) and are
rejected.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

VELOCITY_KL_KINDS = ('dance', 'flow_grpo')


def _mean_elem(a: jax.Array) -> jax.Array:
  """Mean over all non-batch axes, (B, ...) -> (B,)."""
  return jnp.mean(a, axis=tuple(range(1, a.ndim)))


def _per_sample(name: str, value: Any, batch: int) -> jax.Array:
  """A scalar, (B,) or (B, 1, ..., 1) float -> (B,) float32."""
  value = jnp.asarray(value, jnp.float32)
  if value.ndim == 0:
    return jnp.broadcast_to(value, (batch,))
  if value.shape[0] != batch or value.size != batch:
    raise ValueError(f'{name} must be a scalar or hold one value per sample (B={batch}), got shape '
                     f'{value.shape}.')
  return value.reshape(batch)


def gaussian_mean_kl(mean_theta: jax.Array, mean_ref: jax.Array, std_dev_t: Any) -> jax.Array:
  """Per-sample (B,) float32 ``mean_elem((μθ − μref)²)/(2·std_dev_t²)``, the FG code-form KL.

  Args:
    mean_theta: (B, ...) transition mean under the trained model.
    mean_ref: (B, ...) transition mean under the reference model (same x, σ, dt).
    std_dev_t: a scalar, (B,) or (B, 1, ..., 1) std. FG passes its ``std_dev_t`` (no sqrt(−dt)),
      which gives the true KL × |dt|; the full step std gives the true per-element KL.

  Returns:
    (B,) float32; FG's loss term is β times its batch mean.
  """
  mean_theta = jnp.asarray(mean_theta, jnp.float32)
  mean_ref = jnp.asarray(mean_ref, jnp.float32)
  if mean_theta.shape != mean_ref.shape or mean_theta.ndim < 1:
    raise ValueError(f'mean_theta and mean_ref must share a (B, ...) shape, got {mean_theta.shape} '
                     f'and {mean_ref.shape}.')
  std = _per_sample('std_dev_t', std_dev_t, mean_theta.shape[0])
  return _mean_elem(jnp.square(mean_theta - mean_ref)) / (2.0 * jnp.square(std))


def velocity_kl(v_theta: jax.Array, v_ref: jax.Array, sigma: Any, dt: Any, noise_level: Any,
                kind: str) -> jax.Array:
  """Code-form KL (B,) of one SDE step computed from the two velocities; see the module docstring.

  Equals ``gaussian_mean_kl(μθ, μref, g)`` for the means of ``flow_step(kind, ...)`` at the same x.

  Args:
    v_theta: (B, ...) velocity of the trained model.
    v_ref: (B, ...) velocity of the reference model at the same (x, σ, c).
    sigma: σ of the step's start, scalar or (B,).
    dt: σ' − σ < 0, scalar or (B,).
    noise_level: η for 'dance', a for 'flow_grpo' (> 0), scalar or (B,).
    kind: 'dance' or 'flow_grpo' (static).

  Returns:
    (B,) float32.

  Raises:
    ValueError: another kind, a non-positive concrete noise level, or mismatched shapes.
  """
  if kind not in VELOCITY_KL_KINDS:
    raise ValueError(f'velocity_kl supports kinds {VELOCITY_KL_KINDS}, got {kind!r}.')
  if not isinstance(noise_level, jax.Array) and jnp.ndim(noise_level) == 0 and noise_level <= 0:
    raise ValueError(f'The KL needs a positive noise level, got {noise_level}.')
  v_theta = jnp.asarray(v_theta, jnp.float32)
  v_ref = jnp.asarray(v_ref, jnp.float32)
  if v_theta.shape != v_ref.shape or v_theta.ndim < 1:
    raise ValueError(f'v_theta and v_ref must share a (B, ...) shape, got {v_theta.shape} and '
                     f'{v_ref.shape}.')
  batch = v_theta.shape[0]
  sigma = _per_sample('sigma', sigma, batch)
  dt = _per_sample('dt', dt, batch)
  a2 = jnp.square(_per_sample('noise_level', noise_level, batch))
  if kind == 'dance':
    g2 = a2
    drift = 1.0 + a2 * (1.0 - sigma) / (2.0 * sigma)
  else:
    one_minus = 1.0 - jnp.where(sigma == 1.0, sigma + dt, sigma)  # 1 − σ̃
    g2 = a2 * sigma / one_minus
    drift = 1.0 + a2 * (1.0 - sigma) / (2.0 * one_minus)
  return jnp.square(dt * drift) * _mean_elem(jnp.square(v_theta - v_ref)) / (2.0 * g2)
