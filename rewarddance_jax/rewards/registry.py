"""Rewards by name from the config: `config.rewards = {name: {kind, weight, ...options}}`.

Each entry becomes one `Reward` of a `WeightedRewards`; `kind` defaults to the entry's name and
the remaining keys are the factory's options. Rule rewards are registered here; trained reward
models register a loader that reads their checkpoint directory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rewarddance_jax.rewards import base, rules

Builder = Callable[..., base.Reward]

BUILDERS: dict[str, Builder] = {
    'mean_intensity': lambda name: rules.mean_intensity(name=name),
    'digit_prototype': lambda name, split_seed=0: rules.digit_prototype(split_seed, name=name),
    'ink_fraction': lambda name, threshold=0.5: rules.ink_fraction(threshold, name=name),
}


def register(kind: str, builder: Builder) -> None:
  """Adds a reward kind: `builder(name, **options) -> Reward`."""
  BUILDERS[kind] = builder


def build_rewards(cfg: Mapping[str, Any]) -> base.WeightedRewards:
  """`{name: {kind, weight, **options}}` → WeightedRewards; unknown kinds/options name the entry."""
  if not cfg:
    raise ValueError('config.rewards is empty: name at least one reward.')
  pairs = []
  for name, entry in dict(cfg).items():
    entry = dict(entry)
    kind = entry.pop('kind', name)
    weight = float(entry.pop('weight', 1.0))
    if kind not in BUILDERS:
      raise ValueError(f'config.rewards.{name}: unknown reward kind {kind!r}; known: '
                       f'{sorted(BUILDERS)}.')
    try:
      reward = BUILDERS[kind](name, **entry)
    except TypeError as e:
      raise ValueError(f'config.rewards.{name} (kind {kind!r}): bad options {sorted(entry)}: '
                       f'{e}') from None
    pairs.append((reward, weight))
  return base.WeightedRewards(pairs)
