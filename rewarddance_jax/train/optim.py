"""The optimizer from `config.optax`, and optimizer-state shardings that follow the params.

Default (docs/algorithms.md §10 #29): clip_by_global_norm(1.0) → AdamW(b1 0.9, b2 0.999, eps 1e-8,
weight decay 1e-4), learning rate constant / linear warm-up + cosine decay. Moments are fp32
because params are fp32 masters. Every numeric key is checked against its range
(`OptaxConfig.RANGES`): a bad value is a one-line error naming `config.optax.<key>` and the value.
"""

from __future__ import annotations

import dataclasses

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rewarddance_jax import config_lib


@dataclasses.dataclass(frozen=True)
class OptaxConfig:
  """`config.optax`. Adam's bias correction divides by 1 - b**t, so b1 and b2 stay below 1."""
  lr: float
  schedule: str = 'constant'
  warmup_steps: int = 0
  decay_steps: int = 0
  end_lr_fraction: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 1e-4
  grad_clip: float = 0.0

  RANGES = {'lr': '[0, inf)', 'warmup_steps': '[0, inf)', 'decay_steps': '[0, inf)',
            'end_lr_fraction': '[0, inf)', 'b1': '[0, 1)', 'b2': '[0, 1)', 'eps': '[0, inf)',
            'weight_decay': '[0, inf)', 'grad_clip': '[0, inf)'}

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f'config.optax.schedule={self.schedule!r} is not one of {SCHEDULES}.')


SCHEDULES = ('constant', 'cosine')


def learning_rate(cfg: OptaxConfig) -> optax.Schedule:
  if cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup_steps, max(cfg.decay_steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.end_lr_fraction)
  if cfg.warmup_steps:
    return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  return optax.constant_schedule(cfg.lr)


def make_optimizer(section) -> optax.GradientTransformation:
  """The optimizer of the `config.optax` section."""
  cfg = config_lib.section(OptaxConfig, section, 'config.optax')
  parts = []
  if cfg.grad_clip:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings, mesh):
  """Shardings for `tx.init(params)`: param-shaped leaves follow their param, the rest replicate."""
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_state, param_shardings,
      transform_non_params=lambda _: replicated)
