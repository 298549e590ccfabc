"""Rectified-flow (flow-matching) training objective.

Conventions of docs/algorithms.md §1.1: x_σ = (1 − σ)·x0 + σ·ε, target v = ε − x0.
  1. Draw σ per sample: 'uniform' U(0, 1); 'logit_normal' σ = sigmoid(m + s·n), n ~ N(0, 1)
     (SD3, Esser et al. 2024 §3.1); then optionally the constant shift s·σ/(1 + (s − 1)·σ).
  2. Interpolate x_σ and regress the network's v on ε − x0:
        L = mean_b mean_elem (v_θ(x_σ, σ, c) − (ε − x0))²
This loss is also PRFL's SFT regulariser (PRFL Alg. 1, L_FM).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SIGMA_SAMPLERS = ('uniform', 'logit_normal')


def sample_sigmas(key: jax.Array, batch: int, *, kind: str = 'uniform', shift: float = 1.0,
                  loc: float = 0.0, scale: float = 1.0) -> jax.Array:
  """(B,) training noise levels in (0, 1), fp32."""
  if kind == 'uniform':
    sigma = jax.random.uniform(key, (batch,), jnp.float32)
  elif kind == 'logit_normal':
    sigma = jax.nn.sigmoid(loc + scale * jax.random.normal(key, (batch,), jnp.float32))
  else:
    raise ValueError(f'sigma sampler {kind!r} is not one of {SIGMA_SAMPLERS}.')
  if shift != 1.0:
    sigma = shift * sigma / (1.0 + (shift - 1.0) * sigma)
  return sigma


def interpolate(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
  """x_σ = (1 − σ)·x0 + σ·ε with σ (B,) broadcast over the non-batch axes."""
  s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
  return (1.0 - s) * x0 + s * noise


def flow_matching_loss(v_pred: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
  """mean over batch and elements of (v_pred − (ε − x0))², in fp32."""
  target = noise.astype(jnp.float32) - x0.astype(jnp.float32)
  return jnp.mean(jnp.square(v_pred.astype(jnp.float32) - target))
