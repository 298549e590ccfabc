"""Training on a group's extremes: its k/2 best and k/2 worst rollouts (docs/algorithms.md §3.2).

DanceGRPO's HunyuanVideo script (DG:fastvideo/train_grpo_hunyuan.py, ``--bestofn``) samples G = 24
rollouts per prompt, sorts them by advantage, keeps the top and bottom bestofn/2 (bestofn = 8) and
trains only those; the advantages stay the ones computed over the whole group. The paper calls it
best-of-N training on the extremes: the update spends its compute where the reward's verdicts
differ most and the ranking is most reliable.

  rows(g) = argsort(A_g)[:k/2] ∪ argsort(A_g)[G − k/2:]        for each group g of G adjacent rows

The selection is static in shape: (B/G)·k row indices, group by group, each group's rows in
ascending advantage order (ties broken by the lower row index, `jnp.argsort` being stable).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_keep(group_size: int, keep: int) -> None:
  """Raises ValueError unless keep is 0 (off) or an even number in [2, group_size]."""
  if keep and (keep < 2 or keep % 2 or keep > group_size):
    raise ValueError(f'grpo.best_of={keep} must be 0 (train every rollout) or an even number '
                     f'between 2 and group_size={group_size}.')


def extreme_rows(adv: jax.Array, group_size: int, keep: int) -> jax.Array:
  """(B/G·keep,) int32 row indices of each group's keep/2 lowest and keep/2 highest advantages.

  Args:
    adv: (B,) advantages (or rewards: the order within a group is the same), groups adjacent.
    group_size: G (static).
    keep: k, even, 2 ≤ k ≤ G (static).

  Returns:
    int32 indices into the B rows, group by group, ascending advantage within each group.
  """
  check_keep(group_size, keep)
  adv = jnp.asarray(adv)
  if adv.ndim != 1 or adv.shape[0] % group_size:
    raise ValueError(f'adv must be (B,) with B a multiple of G={group_size}, got {adv.shape}.')
  groups = adv.reshape(-1, group_size)
  order = jnp.argsort(groups, axis=1, stable=True)
  half = keep // 2
  picked = jnp.concatenate([order[:, :half], order[:, group_size - half:]], axis=1)
  offsets = jnp.arange(groups.shape[0], dtype=jnp.int32)[:, None] * group_size
  return (picked.astype(jnp.int32) + offsets).reshape(-1)
