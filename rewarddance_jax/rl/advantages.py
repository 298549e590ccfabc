"""GRPO advantages: rewards normalised within groups of adjacent rows (docs/algorithms.md §3.2).

Rows are grouped ADJACENTLY: the prompts are repeated G times in a row, so the (B,) rewards reshape
to (B/G, G) with one prompt per row, whatever the device placement (§3.1, our choice).

  A = (r − centre)/(scale + eps), then A is clipped to ±clip (``adv_clip_max`` = 5 in both repos).

| mode        | centre     | scale                                               | eps  |
|-------------|------------|-----------------------------------------------------|------|
| 'dance'     | group mean | group std, unbiased (ddof 1)                        | 1e-8 |
| 'flow_grpo' | group mean | group std, ddof 0; whole-batch std if global_std    | 1e-4 |

Sources: 'dance' DG:fastvideo/train_grpo_flux.py (``--use_group``; DanceGRPO's non-group form, whose
mean and std are over the whole batch, is group_size = B); 'flow_grpo'
FG:flow_grpo/stat_tracking.py ``PerPromptStatTracker.update`` (``global_std`` divides by
``np.std(rewards) + 1e-4`` of all rewards while still centring per prompt).

A group whose rewards are all equal gets advantages exactly 0 (the where below): in float32 the
group mean of equal numbers need not equal them, and (r − mean)/1e-8 would turn that rounding into
an advantage of order 0.1. Such groups are what ``zero_std_fraction`` counts (FG's
``zero_std_ratio``).

Zero-advantage samples (§10 #5, our choice): FG drops them and tops the batch up with random ones;
we keep static shapes and give them loss weight 0 via ``nonzero_advantage_mask``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ADVANTAGE_MODES = ('dance', 'flow_grpo')
ADVANTAGE_EPS = {'dance': 1e-8, 'flow_grpo': 1e-4}


def grouped_rewards(rewards: jax.Array, group_size: int) -> jax.Array:
  """(B,) rewards -> (B/G, G) float32, one row per group of G adjacent samples.

  Raises:
    ValueError: rewards not 1-D, group_size < 1, or B not divisible by G.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 1:
    raise ValueError(f'rewards must have shape (B,), got {rewards.shape}.')
  batch = rewards.shape[0]
  if group_size < 1 or batch % group_size:
    raise ValueError(f'The batch size B={batch} is not a multiple of the group size '
                     f'G={group_size}.')
  return rewards.reshape(batch // group_size, group_size)


def _constant_groups(groups: jax.Array) -> jax.Array:
  """(B/G, 1) bool: True where every reward of the group is the same (group std exactly 0)."""
  return jnp.max(groups, axis=1, keepdims=True) == jnp.min(groups, axis=1, keepdims=True)


def group_advantages(rewards: jax.Array, group_size: int, *, mode: str = 'dance',
                     global_std: bool = False, clip: float | None = 5.0) -> jax.Array:
  """Per-sample GRPO advantages (B,) in float32; see the module docstring for the formulas.

  Args:
    rewards: (B,) rewards, any float dtype; B = (number of prompts)·G, groups adjacent.
    group_size: G (static).
    mode: 'dance' (DG, ddof 1, eps 1e-8) or 'flow_grpo' (FG, ddof 0, eps 1e-4) (static).
    global_std: 'flow_grpo' only: divide by the std (ddof 0) of the whole batch instead of the
      group's; the centre stays the group mean (FG SD3/FLUX default).
    clip: clip the advantages to [−clip, clip]; None leaves them unclipped (the multi-reward
      aggregation clips once after summing).

  Returns:
    (B,) float32 advantages; exactly 0 in groups of equal rewards.

  Raises:
    ValueError: unknown mode, global_std with 'dance', 'dance' with G < 2 (no unbiased std), or a
      shape error (see ``grouped_rewards``).
  """
  if mode not in ADVANTAGE_MODES:
    raise ValueError(f'Unknown advantage mode {mode!r}; valid modes: {ADVANTAGE_MODES}.')
  if global_std and mode != 'flow_grpo':
    raise ValueError("global_std is a 'flow_grpo' option; DanceGRPO's global form is group_size=B.")
  if mode == 'dance' and group_size < 2:
    raise ValueError(f"mode 'dance' uses the unbiased group std, which needs G >= 2, got "
                     f'G={group_size}.')
  groups = grouped_rewards(rewards, group_size)
  centred = groups - jnp.mean(groups, axis=1, keepdims=True)
  if mode == 'dance':
    scale = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / (group_size - 1))
  elif global_std:
    scale = jnp.std(groups)  # ddof 0 over the whole batch.
  else:
    scale = jnp.sqrt(jnp.mean(jnp.square(centred), axis=1, keepdims=True))
  adv = centred / (scale + ADVANTAGE_EPS[mode])
  adv = jnp.where(_constant_groups(groups), 0.0, adv)
  if clip is not None:
    adv = jnp.clip(adv, -clip, clip)
  return adv.reshape(-1)


def zero_std_fraction(rewards: jax.Array, group_size: int) -> jax.Array:
  """Fraction (float32 scalar) of groups whose rewards are all equal, i.e. group std 0.

  FG:scripts/train_sd3.py logs it as ``zero_std_ratio``; these groups carry no learning signal.
  """
  return jnp.mean(_constant_groups(grouped_rewards(rewards, group_size)).astype(jnp.float32))


def nonzero_advantage_mask(adv: jax.Array) -> jax.Array:
  """(B,) float32 loss weights: 1 where A != 0, else 0 (§10 #5: kept with weight 0, static shapes).

  FG:scripts/train_sd3.py instead removes the samples whose advantage is 0 at every step; our
  advantage is one value per sample, broadcast to all of its trained steps.
  """
  return (jnp.asarray(adv) != 0).astype(jnp.float32)
