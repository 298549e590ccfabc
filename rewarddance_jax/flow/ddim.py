"""DDIM-η step of a rectified flow, the R0 generator's step (docs/algorithms.md §8, inferred).

With x_σ = (1 − σ)·x0 + σ·ε and v = ε − x0: x̂0 = x − σ·v, ε̂ = x + (1 − σ)·v, and from σ to σ' < σ
  x' = (1 − σ')·x̂0 + σ'·(sqrt(1 − η²)·ε̂ + η·ξ),   ξ ~ N(0, I),  η ∈ [0, 1] per sample.
η = 0 is exactly the Euler ODE step x + (σ' − σ)·v; η = 1 re-noises x̂0 with fresh noise. At σ' = 0
the step returns x̂0 whatever η.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rewarddance_jax.flow import steps


def ddim_eta_step(v: jax.Array, x: jax.Array, sigma: Any, sigma_next: Any, eta: Any,
                  noise: jax.Array) -> jax.Array:
  """x' of the module docstring, fp32; σ, σ', η scalars or (B,); noise (B, ...) standard normal."""
  x = jnp.asarray(x, jnp.float32)
  x0_hat = steps.predicted_x0(x, sigma, v)
  eps_hat = steps.predicted_noise(x, sigma, v)
  s_next = steps.per_sample(sigma_next, x)
  e = steps.per_sample(eta, x)
  mixed = jnp.sqrt(jnp.maximum(1.0 - jnp.square(e), 0.0)) * eps_hat + e * noise
  return (1.0 - s_next) * x0_hat + s_next * mixed
