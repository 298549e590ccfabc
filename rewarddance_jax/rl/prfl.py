"""PRFL objective: process reward feedback + flow-matching regulariser (docs/algorithms.md §6.3).

PRFL (arXiv 2511.21541, Alg. 1, Eqs. 7–10; PRFL:scripts/prfl/train_prfl.py `train_step_refl`):
a frozen process reward r = σ(PAVRM(x_{s+1}, t_{s+1}, p)) ∈ (0, 1) scores the noisy latent made
by the one generator step with gradient, and real data keep the model on the data manifold:

  L = λ·mean(relu(2 − r)) + w·L_FM,   L_FM = mean‖v_θ(x_t, t, p) − (ε − x0)‖²

λ = 0.1 and w = 1 in the paper. The paper alternates the two terms over iterations; the sum in
one step (our choice) has the same expected gradient and one jitted step. While r < 2 the reward
term equals λ·(2 − r), i.e. −λ·r up to a constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def prfl_loss(rewards: jax.Array, fm_loss: jax.Array, *, scale: float = 0.1,
              fm_weight: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(total, reward term) = (λ·mean(relu(2 − r)) + w·L_FM, λ·mean(relu(2 − r))), float32.

  Args:
    rewards: (B,) differentiable process rewards of the gradient-carrying step.
    fm_loss: scalar flow-matching loss on real data (0 to switch the regulariser off).
    scale: λ.
    fm_weight: w.
  """
  r = jnp.asarray(rewards, jnp.float32)
  if r.ndim != 1:
    raise ValueError(f'rewards must have shape (B,), got {r.shape}.')
  reward_term = scale * jnp.mean(jax.nn.relu(2.0 - r))
  return reward_term + fm_weight * jnp.asarray(fm_loss, jnp.float32), reward_term
