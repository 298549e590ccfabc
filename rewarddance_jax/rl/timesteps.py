"""Which denoising steps GRPO trains, and where the rollout is stochastic (docs/algorithms.md §3.5).

A rollout of N steps stores every transition; this module picks, per sample, the T step indices
the update trains on (an int32 (B, T) array, static T) and the (N,) SDE mask of the rollout:

| selection  | trained steps of sample b                                     | SDE mask        | source |
|------------|---------------------------------------------------------------|-----------------|--------|
| 'fraction' | first int((N−1)·f) of an independent random permutation of    | all steps       | DG:fastvideo/train_grpo_flux.py |
|            | the N−1 steps that exclude the last transition                |                 | (f = 0.6; DG #50 drops the last) |
| 'prefix'   | the first int(N·f) steps, in order (last step excluded)       | all steps       | FG:scripts/train_sd3.py (f = 0.99) |
| 'window'   | w steps from start ~ U{lo, …, hi − w}, shared by the batch     | the window only | FG:scripts/train_sd3_fast.py (w = 3, (0, N//2)) |
| 'sliding'  | w steps from start = (iteration // iters_per_group) mod       | the window only | MG:fastvideo/utils/grpo_states.py |
|            | (max_start + 1) (MixGRPO's progressive window with roll-back) |                 | (w = 4, 25 iterations, max N − 2) |

Outside the SDE mask the rollout takes ODE steps (log-prob 0), which is what makes the window
methods cheaper to sample from. The last transition (σ → 0) is never trained (§2.5).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

SELECTIONS = ('fraction', 'prefix', 'window', 'sliding')


@dataclasses.dataclass(frozen=True)
class TimestepSelection:
  """Static description of the trained steps of an N-step rollout.

  Attributes:
    kind: one of SELECTIONS.
    num_steps: N, the rollout's steps.
    fraction: f for 'fraction' and 'prefix'.
    window: w for 'window' and 'sliding'.
    window_range: (lo, hi) start range for 'window'; hi defaults to N // 2 when 0.
    iters_per_group: iterations per window position for 'sliding'.
    max_start: last window start for 'sliding' (default N − 1 − w, so the window never reaches
      the last transition).
  """
  kind: str = 'fraction'
  num_steps: int = 16
  fraction: float = 0.6
  window: int = 3
  window_range: tuple[int, int] = (0, 0)
  iters_per_group: int = 25
  max_start: int = -1

  RANGES = {'num_steps': '[2, inf)', 'fraction': '(0, 1]', 'window': '[1, inf)',
            'iters_per_group': '[1, inf)', 'max_start': '[-1, inf)'}

  def __post_init__(self):
    if self.kind not in SELECTIONS:
      raise ValueError(f'timestep selection {self.kind!r} is not one of {SELECTIONS}.')
    if self.num_steps < 2:
      raise ValueError(f'grpo.num_steps={self.num_steps} must be >= 2 (a GRPO rollout of at least 2 '
                       'steps).')
    if self.num_trained < 1:
      raise ValueError(f'timestep selection {self.kind!r} trains no step with num_steps='
                       f'{self.num_steps}, fraction={self.fraction}, window={self.window}.')
    if self.kind in ('window', 'sliding') and self.window > self.num_steps - 1:
      raise ValueError(f'window={self.window} does not fit the {self.num_steps - 1} trainable '
                       f'steps of a {self.num_steps}-step rollout.')
    if self.kind == 'window':
      lo, hi = self.start_range
      if not 0 <= lo <= hi - self.window or hi > self.num_steps - 1:
        raise ValueError(f'window_range={self.window_range} must allow a window of {self.window} '
                         f'steps inside [0, {self.num_steps - 1}).')

  @property
  def num_trained(self) -> int:
    """T, the trained steps per sample (static)."""
    n = self.num_steps
    if self.kind == 'fraction':
      return int((n - 1) * self.fraction)
    if self.kind == 'prefix':
      return min(int(n * self.fraction), n - 1)
    return self.window

  @property
  def start_range(self) -> tuple[int, int]:
    lo, hi = (int(v) for v in self.window_range)
    return lo, (hi if hi > 0 else self.num_steps // 2)

  @property
  def last_start(self) -> int:
    return self.max_start if self.max_start >= 0 else self.num_steps - 1 - self.window


def select(sel: TimestepSelection, key: jax.Array, batch: int,
           iteration: Any = 0) -> tuple[jax.Array, jax.Array]:
  """Returns (idx (B, T) int32 trained step indices, sde_mask (N,) bool); see the module table.

  Args:
    sel: the static selection.
    key: PRNG key ('fraction' and 'window' are random).
    batch: B.
    iteration: the GRPO iteration (traced int), used by 'sliding'.
  """
  n, t = sel.num_steps, sel.num_trained
  steps = jnp.arange(n)
  if sel.kind == 'fraction':
    keys = jax.random.split(key, batch)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n - 1))(keys)
    return perms[:, :t].astype(jnp.int32), jnp.ones((n,), jnp.bool_)
  if sel.kind == 'prefix':
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    return idx, jnp.ones((n,), jnp.bool_)
  if sel.kind == 'window':
    lo, hi = sel.start_range
    start = jax.random.randint(key, (), lo, hi - sel.window + 1)
  else:
    start = (jnp.asarray(iteration, jnp.int32) // sel.iters_per_group) % (sel.last_start + 1)
  idx = start + jnp.arange(t, dtype=jnp.int32)
  mask = (steps >= start) & (steps < start + t)
  return jnp.broadcast_to(idx, (batch, t)).astype(jnp.int32), mask


def gather_steps(stored: jax.Array, idx: jax.Array) -> jax.Array:
  """Stored per-step values (N, B, ...) → the selected ones per sample, (B, T, ...)."""
  per_sample = jnp.moveaxis(stored, 0, 1)  # (B, N, ...)
  index = idx.reshape(idx.shape + (1,) * (per_sample.ndim - 2))
  return jnp.take_along_axis(per_sample, index, axis=1)
