"""ReFL: reward feedback learning through one gradient-carrying step (docs/algorithms.md §7).

ImageReward's ReFL (THUDM/ImageReward:ImageReward/ReFL.py; arXiv 2304.05977 §4.2):
  1. N denoising steps; draw `mid` uniformly over the last quarter of them (their 30..39 of 40);
     roll out steps 0..mid−1 without gradient.
  2. One gradient-carrying step at σ_mid: x̂0 = x_mid − σ_mid·v_θ(x_mid, σ_mid, c) (flow form).
  3. r = R(decode(x̂0), c), with the gradient flowing through decode and the reward model.
  4. The loss on r, one of
       'imagereward':  L = scale·mean_b relu(target − r_b)     (target 2, scale 1e-3 there)
       'linear':       L = −scale·mean_b r_b                   (ours for RewardDance, §10 #18:
                                                                λ = 1e-3; r = P(yes) ∈ [0, 1], so
                                                                relu(2 − r) = 2 − r: same gradient)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOSS_KINDS = ('linear', 'imagereward')


def imagereward_loss(rewards: jax.Array, *, target: float = 2.0, scale: float = 1e-3) -> jax.Array:
  """scale·mean(relu(target − r)), fp32 scalar."""
  r = jnp.asarray(rewards, jnp.float32)
  return scale * jnp.mean(jax.nn.relu(target - r))


def linear_loss(rewards: jax.Array, *, scale: float = 1e-3) -> jax.Array:
  """−scale·mean(r), fp32 scalar."""
  return -scale * jnp.mean(jnp.asarray(rewards, jnp.float32))


def refl_loss(rewards: jax.Array, kind: str, *, scale: float = 1e-3,
              target: float = 2.0) -> jax.Array:
  """The configured ReFL loss on (B,) rewards (module docstring)."""
  if kind == 'linear':
    return linear_loss(rewards, scale=scale)
  if kind == 'imagereward':
    return imagereward_loss(rewards, target=target, scale=scale)
  raise ValueError(f'refl loss kind {kind!r} is not one of {LOSS_KINDS}.')


def late_step_range(num_steps: int, fraction: float = 0.25) -> tuple[int, int]:
  """[lo, hi) step indices of the last `fraction` of `num_steps` (40, 0.25 → [30, 40))."""
  if num_steps < 1 or not 0.0 < fraction <= 1.0:
    raise ValueError(f'late_step_range needs num_steps >= 1 and fraction in (0, 1], got '
                     f'{num_steps}, {fraction}.')
  count = max(1, math.ceil(num_steps * fraction - 1e-9))
  return num_steps - count, num_steps


def sample_step(key: jax.Array, lo: int, hi: int) -> jax.Array:
  """One int32 step index uniform over [lo, hi) for the whole batch (ImageReward draws one)."""
  return jax.random.randint(key, (), lo, hi, jnp.int32)
