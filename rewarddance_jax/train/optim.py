"""The optimizer from `config.optax`, and optimizer-state shardings that follow the params.

Default (docs/algorithms.md §10 #29): clip_by_global_norm(1.0) → AdamW(b1 0.9, b2 0.999, eps 1e-8,
weight decay 1e-4), learning rate constant / linear warm-up + cosine decay. Moments are fp32
because params are fp32 masters. Every numeric key is checked against its range (`RANGES`)
first: a bad value is a one-line error naming `config.optax.<key>` and the value.
"""

from __future__ import annotations

import math

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rewarddance_jax.config_lib import check_keys

OPTAX_KEYS = ('lr', 'schedule', 'warmup_steps', 'decay_steps', 'end_lr_fraction', 'b1', 'b2',
              'eps', 'weight_decay', 'grad_clip')

# Allowed values of the numeric keys, low <= value < high (so never NaN, and finite where high is
# inf): Adam's bias correction divides by 1 - b**t, so b1 and b2 stay below 1.
RANGES = {'lr': (0.0, math.inf), 'warmup_steps': (0, math.inf), 'decay_steps': (0, math.inf),
          'end_lr_fraction': (0.0, math.inf), 'b1': (0.0, 1.0), 'b2': (0.0, 1.0),
          'eps': (0.0, math.inf), 'weight_decay': (0.0, math.inf), 'grad_clip': (0.0, math.inf)}


def check_values(cfg) -> None:
  """Raises naming the first key of `config.optax` outside its range in `RANGES`."""
  for key, (low, high) in RANGES.items():
    if key not in cfg:
      continue
    value = cfg[key]
    try:
      ok = not isinstance(value, bool) and low <= float(value) < high
    except (TypeError, ValueError):
      ok = False
    if not ok:
      bound = f'a finite number >= {low}' if high == math.inf else f'in [{low}, {high})'
      raise ValueError(f'config.optax.{key}={value!r} must be {bound}.')


def learning_rate(cfg) -> optax.Schedule:
  kind = cfg.get('schedule', 'constant')
  warmup = int(cfg.get('warmup_steps', 0))
  lr = float(cfg.lr)
  if kind == 'constant':
    if warmup:
      return optax.linear_schedule(0.0, lr, warmup)
    return optax.constant_schedule(lr)
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(int(cfg.decay_steps), warmup + 1),
        end_value=lr * float(cfg.get('end_lr_fraction', 0.0)))
  raise ValueError(f'config.optax.schedule={kind!r} is not one of (constant, cosine).')


def make_optimizer(cfg) -> optax.GradientTransformation:
  check_keys(cfg, OPTAX_KEYS, 'config.optax')
  check_values(cfg)
  parts = []
  if cfg.get('grad_clip', 0.0):
    parts.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
  parts.append(optax.adamw(learning_rate(cfg), b1=float(cfg.get('b1', 0.9)),
                           b2=float(cfg.get('b2', 0.999)), eps=float(cfg.get('eps', 1e-8)),
                           weight_decay=float(cfg.get('weight_decay', 1e-4))))
  return optax.chain(*parts)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings, mesh):
  """Shardings for `tx.init(params)`: param-shaped leaves follow their param, the rest replicate."""
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_state, param_shardings,
      transform_non_params=lambda _: replicated)
