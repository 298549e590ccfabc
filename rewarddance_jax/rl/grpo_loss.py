"""GRPO clipped surrogate of one step and the KL to the rollout policy (docs/algorithms.md §3.3).

For one trained step t of every sample (logp stored at rollout, recomputed with the current params):

  ρ   = exp(logp_new − logp_old)
  L_b = max(−A_b·ρ_b, −A_b·clip(ρ_b, 1 − ε, 1 + ε))
  loss = Σ_b m_b·L_b / Σ_b m_b        (mean over the kept samples; 0 if none is kept)

Identical in DG:fastvideo/train_grpo_flux.py, FG:scripts/train_sd3.py and
MG:fastvideo/train_grpo_flux.py (ε = 1e-4 by default, A already clipped to ±5). No value function,
no entropy term.
The mask m (§10 #5, our choice) replaces FG's removal of zero-advantage samples with weight 0; with
m = 1 the loss is the repos' plain batch mean.

Gradient w.r.t. logp_new (what the tests pin): −A_b·ρ_b·m_b/Σm where the unclipped term is the max
(inside the band, or outside it on the side where the clip would not help: A > 0 with ρ < 1 − ε,
A < 0 with ρ > 1 + ε), and 0 where the clipped constant is the max (A > 0 with ρ > 1 + ε, A < 0 with
ρ < 1 − ε).

Logged statistics (FG:scripts/train_sd3.py): ``approx_kl = 0.5·mean((logp_new − logp_old)²)``,
``clipfrac = mean(|ρ − 1| > ε)``, ``clipfrac_gt_one = mean(ρ − 1 > ε)``,
``clipfrac_lt_one = mean(1 − ρ > ε)``, plus the ratio mean/min/max and ``log_ratio_max_abs =
max|logp_new − logp_old|`` (0 exactly on-policy: the recomputation reproduces the rollout's
log-probs bit for bit); all over the kept samples.

``rollout_kl`` is MixGRPO's optional penalty toward the rollout policy,
``kl_coeff·0.5·mean((logp_new − logp_old)²)`` (MG:fastvideo/train_grpo_flux.py, ``kl_coeff`` 0.01 in
argparse, 0.0 in the scripts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _as_batch(name: str, value: jax.Array, batch: int | None = None) -> jax.Array:
  value = jnp.asarray(value, jnp.float32)
  if value.ndim != 1 or (batch is not None and value.shape[0] != batch):
    expected = '(B,)' if batch is None else f'({batch},)'
    raise ValueError(f'{name} must have shape {expected}, got {value.shape}.')
  return value


def _weights(mask: jax.Array | None, batch: int) -> jax.Array:
  """(B,) float32 sample weights: the mask, or ones."""
  if mask is None:
    return jnp.ones((batch,), jnp.float32)
  return _as_batch('mask', mask, batch)


def _weighted_mean(x: jax.Array, w: jax.Array) -> jax.Array:
  """Σ w·x / Σ w, and 0 when Σ w = 0 (no NaN in the value or the gradient)."""
  total = jnp.sum(w)
  safe = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, jnp.sum(jnp.where(w > 0, w * x, 0.0)) / safe, 0.0)


def _log_ratio(logp_new: jax.Array, logp_old: jax.Array,
               mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  logp_new = _as_batch('logp_new', logp_new)
  batch = logp_new.shape[0]
  logp_old = _as_batch('logp_old', logp_old, batch)
  w = _weights(mask, batch)
  # Dropped samples get log-ratio 0: a stray huge logp there cannot overflow exp into inf·0 = NaN.
  return jnp.where(w > 0, logp_new - logp_old, 0.0), w


def rollout_kl(logp_new: jax.Array, logp_old: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
  """0.5·mean((logp_new − logp_old)²) over the kept samples, float32 scalar (MG ``kl_coeff`` form).

  Args:
    logp_new: (B,) log-probs under the current params.
    logp_old: (B,) log-probs stored at rollout.
    mask: optional (B,) sample weights (0 = dropped); the mean is Σ w·x/Σ w, 0 if all are dropped.
  """
  delta, w = _log_ratio(logp_new, logp_old, mask)
  return _weighted_mean(0.5 * jnp.square(delta), w)


def clipped_surrogate(logp_new: jax.Array, logp_old: jax.Array, adv: jax.Array,
                      clip_range: float, mask: jax.Array | None = None,
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO/GRPO clipped policy loss of one trained step; see the module docstring.

  Args:
    logp_new: (B,) per-element-mean log-probs of the stored x_{t+1} under the current params.
    logp_old: (B,) the same log-probs stored at rollout (constants: the caller holds them fixed).
    adv: (B,) advantages, already clipped to ±5 (constants).
    clip_range: ε (1e-4 DG/FG default).
    mask: optional (B,) float weights, 0 for samples kept only for static shapes (e.g.
      ``advantages.nonzero_advantage_mask``); the loss is Σ m·L / Σ m, and 0 if Σ m = 0.

  Returns:
    (loss, stats): a float32 scalar, and float32 scalars ``ratio_mean``, ``ratio_min``,
    ``ratio_max``, ``clipfrac``, ``clipfrac_gt_one``, ``clipfrac_lt_one``, ``approx_kl``,
    ``log_ratio_max_abs``, all over
    the kept samples (the ratio min/max are 1 if none is kept).

  Raises:
    ValueError: inputs not all of shape (B,).
  """
  delta, w = _log_ratio(logp_new, logp_old, mask)
  adv = _as_batch('adv', adv, delta.shape[0])
  ratio = jnp.exp(delta)
  clipped_ratio = jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  per_sample = jnp.maximum(-adv * ratio, -adv * clipped_ratio)
  loss = _weighted_mean(per_sample, w)

  ratio_sg = jax.lax.stop_gradient(ratio)
  kept = w > 0
  any_kept = jnp.any(kept)

  def frac(cond: jax.Array) -> jax.Array:
    return _weighted_mean(cond.astype(jnp.float32), w)

  stats = {
      'ratio_mean': _weighted_mean(ratio_sg, w),
      'ratio_min': jnp.where(any_kept, jnp.min(jnp.where(kept, ratio_sg, jnp.inf)), 1.0),
      'ratio_max': jnp.where(any_kept, jnp.max(jnp.where(kept, ratio_sg, -jnp.inf)), 1.0),
      'clipfrac': frac(jnp.abs(ratio_sg - 1.0) > clip_range),
      'clipfrac_gt_one': frac(ratio_sg - 1.0 > clip_range),
      'clipfrac_lt_one': frac(1.0 - ratio_sg > clip_range),
      'approx_kl': _weighted_mean(0.5 * jnp.square(jax.lax.stop_gradient(delta)), w),
      'log_ratio_max_abs': jnp.max(jnp.where(kept, jnp.abs(jax.lax.stop_gradient(delta)), 0.0)),
  }
  return loss, stats
