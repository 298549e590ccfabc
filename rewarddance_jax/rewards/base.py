"""The reward protocol: one pure function per reward, combined by weight.

A reward is a pure, jit-able function ``fn(params, samples, batch, key) -> (B,) float32``:

- ``params``: a frozen parameter tree (a reward model's weights, a target image, the digit
  prototypes, or None). Rewards carry no optimizer state (docs/design.md §3 rule 1).
- ``samples``: a dict of what the caller has for the B samples being scored, e.g. 'pixels'
  (B, H, W, C) in [0, 1], 'latents' (model-space x̂0), 'noisy_latents' (x_t) with 'sigma' (B,).
  Which keys a reward reads is declared by its ``inputs`` (see ``REQUIRED_SAMPLE_KEYS``), so a
  caller knows whether it must decode latents to pixels before scoring.
- ``batch``: the conditioning arrays of the data batch (e.g. 'tokens', 'mask', 'labels'). Only
  arrays may go through ``jax.jit``; host-side fields such as the prompt strings must be dropped
  (or turned into arrays) by the caller first.
- ``key``: a PRNG key for stochastic rewards (noise ensembling); deterministic rewards ignore it.

Rewards know nothing of trainers. The module:

1. defines ``Reward``, a frozen dataclass and a pytree whose only leaves are its ``params``: a
   jitted function can take a Reward (or a ``WeightedRewards``) as an argument, with its weights
   sharded like any frozen tree, while the name, fn and metadata are static;
2. ``Reward.__call__`` checks the required sample keys (KeyError naming the reward and the key),
   calls ``fn`` with the reward's own params, checks the result is (B,) float32 and stops the
   gradient of rewards marked non-differentiable. All checks are on static shapes and dtypes, so
   they run once at trace time and cost nothing under jit;
3. defines ``WeightedRewards``, built from ``[(Reward, weight), ...]`` with unique names:
   ``per_reward`` scores every reward with its own key ``fold_in(key, index)``, ``total`` is
   Σ_k w_k·r_k, and ``differentiable`` / ``inputs`` summarise the metadata for the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

RewardFn = Callable[[Any, Mapping[str, jax.Array], Mapping[str, Any], jax.Array | None],
                    jax.Array]

# What each kind of reward reads from `samples`. 'noisy_latents' keeps x_t apart from the x̂0 of
# 'latents', so one WeightedRewards can mix a process reward and a latent reward on one dict.
REQUIRED_SAMPLE_KEYS = {
    'pixels': ('pixels',),
    'latents': ('latents',),
    'noisy_latents': ('noisy_latents', 'sigma'),
}
REWARD_INPUTS = tuple(REQUIRED_SAMPLE_KEYS)


# eq=False: the params may hold arrays, whose == is elementwise; identity equality keeps a Reward
# hashable and comparable. As a pytree only `params` is data; the rest is static jit metadata.
@dataclasses.dataclass(frozen=True, eq=False)
class Reward:
  """One reward: a pure ``fn(params, samples, batch, key) -> (B,)`` and its metadata.

  Attributes:
    name: unique name within a ``WeightedRewards`` (the metrics key).
    fn: the pure, jit-able reward function; no Python side effects.
    inputs: 'pixels' (images in [0, 1], (B, H, W, C)), 'latents' (model-space x̂0) or
      'noisy_latents' (x_t with its σ, for process rewards).
    differentiable: whether gradients of the reward w.r.t. its inputs are meaningful (ReFL, PRFL
      and R0 need it; GRPO does not). If False, ``__call__`` stops the gradient.
    params: the frozen parameter tree passed to ``fn`` as its first argument.
  """

  name: str
  fn: RewardFn
  inputs: str
  differentiable: bool
  params: Any = None

  def __post_init__(self):
    # Only static fields are checked: pytree unflattening re-runs this with arbitrary leaves.
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f'a reward name must be a non-empty string, got {self.name!r}')
    if not callable(self.fn):
      raise TypeError(f'reward {self.name!r}: fn must be callable, got {type(self.fn).__name__}')
    if self.inputs not in REQUIRED_SAMPLE_KEYS:
      raise ValueError(f'reward {self.name!r}: inputs must be one of {REWARD_INPUTS}, '
                       f'got {self.inputs!r}')
    if not isinstance(self.differentiable, bool):
      raise TypeError(f'reward {self.name!r}: differentiable must be a bool, '
                      f'got {self.differentiable!r}')

  @property
  def required_keys(self) -> tuple[str, ...]:
    """The keys of `samples` this reward reads."""
    return REQUIRED_SAMPLE_KEYS[self.inputs]

  def __call__(self, samples: Mapping[str, jax.Array], batch: Mapping[str, Any],
               key: jax.Array | None = None) -> jax.Array:
    """Scores the samples: (B,) float32, B the leading size of the first required input.

    Raises:
      KeyError: `samples` lacks a key this reward needs.
      ValueError: fn returned something other than a (B,) float32 array.
    """
    for sample_key in self.required_keys:
      if sample_key not in samples:
        raise KeyError(f'reward {self.name!r} (inputs={self.inputs!r}) needs samples'
                       f'[{sample_key!r}]; samples has keys {sorted(samples)}')
    first = samples[self.required_keys[0]]
    if jnp.ndim(first) < 1:
      raise ValueError(f'reward {self.name!r}: samples[{self.required_keys[0]!r}] must have a '
                       f'leading batch axis, got shape {jnp.shape(first)}')
    size = jnp.shape(first)[0]
    out = self.fn(self.params, samples, batch, key)
    shape, dtype = jnp.shape(out), getattr(out, 'dtype', None)
    if shape != (size,) or dtype != jnp.float32:
      raise ValueError(f'reward {self.name!r} must return a ({size},) float32 array (one reward '
                       f'per sample), got shape {shape} dtype {dtype}')
    # The metadata is enforced, not advisory: a trainer that asks for reward gradients gets
    # exact zeros from a non-differentiable reward instead of an arbitrary surrogate gradient.
    return out if self.differentiable else jax.lax.stop_gradient(out)


jax.tree_util.register_dataclass(
    Reward, data_fields=['params'], meta_fields=['name', 'fn', 'inputs', 'differentiable'])


@jax.tree_util.register_pytree_node_class
class WeightedRewards:
  """Several rewards combined by weight; a pytree whose leaves are the rewards' params.

  Example:
    rewards = WeightedRewards([(rules.digit_prototype(), 1.0), (rules.ink_fraction(), 0.1)])
    per = jax.jit(rewards.per_reward)(samples, batch, key)   # {'digit_prototype': (B,), ...}
    total = jax.jit(lambda r, s, b, k: r.total(s, b, k))(rewards, samples, batch, key)
  """

  def __init__(self, rewards_and_weights: Sequence[tuple[Reward, float]]):
    """Builds from ``[(Reward, weight), ...]``.

    Raises:
      ValueError: no rewards, duplicate names, or a weight that is not a finite real number.
      TypeError: an entry that is not a (Reward, weight) pair.
    """
    rewards, weights = [], []
    for entry in rewards_and_weights:
      if (not isinstance(entry, (tuple, list)) or len(entry) != 2
          or not isinstance(entry[0], Reward)):
        raise TypeError(f'WeightedRewards takes (Reward, weight) pairs, got {entry!r}')
      reward, weight = entry
      if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
          or not math.isfinite(float(weight))):
        raise ValueError(f'reward {reward.name!r}: weight must be a finite real number, '
                         f'got {weight!r}')
      rewards.append(reward)
      weights.append(float(weight))
    if not rewards:
      raise ValueError('WeightedRewards needs at least one (Reward, weight) pair')
    names = [r.name for r in rewards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
      raise ValueError(f'reward names must be unique (they key the metrics); duplicated: '
                       f'{duplicates}')
    self._rewards = tuple(rewards)
    self._weights = tuple(weights)

  @property
  def rewards(self) -> tuple[Reward, ...]:
    return self._rewards

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(r.name for r in self._rewards)

  @property
  def weights(self) -> dict[str, float]:
    return dict(zip(self.names, self._weights))

  @property
  def differentiable(self) -> bool:
    """True if every reward is differentiable (required to backpropagate the total)."""
    return all(r.differentiable for r in self._rewards)

  @property
  def inputs(self) -> frozenset[str]:
    """The kinds of input the rewards read, e.g. {'pixels'}: decode only if 'pixels' is in it."""
    return frozenset(r.inputs for r in self._rewards)

  def per_reward(self, samples: Mapping[str, jax.Array], batch: Mapping[str, Any],
                 key: jax.Array | None = None) -> dict[str, jax.Array]:
    """Every reward's (B,) float32 scores, by name; reward k gets key ``fold_in(key, k)``."""
    out = {}
    for index, reward in enumerate(self._rewards):
      # fold_in by position: adding a reward does not change the keys of those before it.
      sub_key = None if key is None else jax.random.fold_in(key, index)
      out[reward.name] = reward(samples, batch, sub_key)
    return out

  def total(self, samples: Mapping[str, jax.Array], batch: Mapping[str, Any],
            key: jax.Array | None = None) -> jax.Array:
    """Σ_k w_k·r_k, (B,) float32."""
    return self.combine(self.per_reward(samples, batch, key))

  def combine(self, per_reward: Mapping[str, jax.Array]) -> jax.Array:
    """Σ_k w_k·r_k of already computed ``per_reward`` scores (to log both without rescoring)."""
    total = None
    for name, weight in zip(self.names, self._weights):
      term = jnp.float32(weight) * per_reward[name]
      total = term if total is None else total + term
    return total

  def tree_flatten(self):
    return self._rewards, self._weights

  @classmethod
  def tree_unflatten(cls, weights, rewards):
    # Bypasses __init__: the pairs were checked when first built, and leaves may be placeholders.
    obj = cls.__new__(cls)
    obj._rewards = tuple(rewards)
    obj._weights = weights
    return obj

  def __repr__(self) -> str:
    parts = ', '.join(f'{n}: {w:g}' for n, w in zip(self.names, self._weights))
    return f'WeightedRewards({parts})'
