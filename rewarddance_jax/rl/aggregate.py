"""Several rewards, one advantage (docs/algorithms.md §3.6; the default: §10 #12).

Given rewards r_k (B,), weights w_k and norm(·) the group normalisation of ``group_advantages``:

  advantage aggregation (MG ``advantage_aggr``, our default):  A = clip(Σ_k w_k·norm(r_k), ±clip)
  reward aggregation    (MG ``reward_aggr``):                  A = clip(norm(Σ_k w_k·r_k), ±clip)

Source: MG:fastvideo/train_grpo_flux.py ``train_one_step`` (``advantage_aggr`` normalises each
reward per group with the DanceGRPO statistics, sums the unclipped advantages with the weights
and clamps once, at the loss; ``reward_aggr`` sums the weighted rewards first). MixGRPO's ``main``
divides the weights by their sum before either form; ``normalize_weights=True`` copies that (with
three weights 1.0 each reward then counts 1/3, which changes how often the ±5 clip bites).
Advantage aggregation makes each reward scale-free, so the weights alone set each reward's share;
under reward aggregation a reward's raw scale acts as an extra weight (GRPO is invariant only to one
global scale). MixGRPO's optional ``trimmed_ratio`` (drop the lowest rewards before the group
statistics) is not implemented.

DanceGRPO's form (DG:fastvideo/train_grpo_hunyuan.py) is different again: it clips each A_k,
builds one clipped surrogate per reward with the shared ratio and sums c_k·L_k. Because the PPO clip
depends on the sign of A, that is not the surrogate of Σ c_k·A_k; get it by calling
``grpo_loss.clipped_surrogate`` once per reward.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from rewarddance_jax.rl import advantages


def _weights(rewards: Mapping[str, jax.Array], weights: Mapping[str, float],
             normalize: bool) -> dict[str, float]:
  """Checked weights, divided by their sum if ``normalize`` (MG); sorted by reward name."""
  names = _check_names(rewards, weights)
  out = {name: weights[name] for name in names}
  if normalize:
    total = sum(out.values())
    if total == 0:
      raise ValueError(f'Cannot normalise reward weights that sum to 0: {out}.')
    out = {name: w / total for name, w in out.items()}
  return out


def _check_names(rewards: Mapping[str, jax.Array], weights: Mapping[str, float]) -> list[str]:
  """Sorted reward names; raises ValueError if the two mappings do not name the same rewards."""
  if not rewards:
    raise ValueError('No rewards given.')
  no_weight = sorted(set(rewards) - set(weights))
  no_reward = sorted(set(weights) - set(rewards))
  if no_weight or no_reward:
    raise ValueError(f'Rewards and weights must name the same rewards: rewards without a weight '
                     f'{no_weight}, weights without a reward {no_reward}.')
  return sorted(rewards)


def advantage_aggregation(rewards: Mapping[str, jax.Array], weights: Mapping[str, float],
                          group_size: int, *, mode: str = 'dance', global_std: bool = False,
                          clip: float | None = 5.0, normalize_weights: bool = False) -> jax.Array:
  """A = clip(Σ_k w_k·A_k), each A_k the unclipped group advantage of r_k; (B,) float32.

  Args:
    rewards: name -> (B,) rewards.
    weights: name -> weight; the same names as ``rewards``.
    group_size, mode, global_std: as in ``advantages.group_advantages``, applied to every reward.
    clip: one clip to [−clip, clip] after the weighted sum; None for none.
    normalize_weights: divide the weights by their sum first, as MixGRPO does (Python floats only).

  Raises:
    ValueError: a reward without a weight or a weight without a reward, or an error of
      ``group_advantages``.
  """
  total = None
  for name, weight in _weights(rewards, weights, normalize_weights).items():
    adv = advantages.group_advantages(rewards[name], group_size, mode=mode, global_std=global_std,
                                      clip=None)
    term = jnp.asarray(weight, jnp.float32) * adv
    total = term if total is None else total + term
  if clip is not None:
    total = jnp.clip(total, -clip, clip)
  return total


def reward_aggregation(rewards: Mapping[str, jax.Array], weights: Mapping[str, float],
                       group_size: int, *, mode: str = 'dance', global_std: bool = False,
                       clip: float | None = 5.0, normalize_weights: bool = False) -> jax.Array:
  """A = group advantage of r = Σ_k w_k·r_k (clipped to ±clip); (B,) float32.

  Args and Raises: as ``advantage_aggregation``.
  """
  total = None
  for name, weight in _weights(rewards, weights, normalize_weights).items():
    term = jnp.asarray(weight, jnp.float32) * jnp.asarray(rewards[name], jnp.float32)
    total = term if total is None else total + term
  return advantages.group_advantages(total, group_size, mode=mode, global_std=global_std,
                                     clip=clip)
