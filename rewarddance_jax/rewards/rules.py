"""Simple rule rewards on pixels: cheap, exact signals for tests of RL trainers.

Each factory returns a ``base.Reward`` whose fn is pure jnp on ``samples['pixels']`` (B, H, W, C)
in [0, 1], computed in float32 whatever the input dtype (docs/design.md §3 rule 4):

1. ``mean_intensity()``: the mean pixel, r = mean(x); differentiable.
2. ``target_l2(target)``: r = −mean((x − target)²) to one fixed image (the reward's params);
   differentiable.
3. ``digit_prototype(split_seed)``: r = −mean((x − P[label])²), P the 10 mean training digits
   (10, 16, 16, 1) of ``digits.load_split('train')`` (the params, so they shard or replicate like
   any frozen tree) and label = ``batch['labels']`` (B,), the digit the prompt asks for. A cheap
   prompt-alignment signal: a sample scores higher the closer it is to the average of the
   requested digit. Differentiable.
4. ``ink_fraction(threshold)``: the fraction of pixels above the threshold; a step function, so
   NOT differentiable (its gradient is zero almost everywhere and is stopped by ``Reward``).

Every factory takes a ``name`` so that two rewards of one kind (e.g. two targets) can be combined
in one ``WeightedRewards``, whose names must be unique.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rewarddance_jax.data import digits
from rewarddance_jax.rewards import base


def _pixels(samples: Mapping[str, jax.Array], name: str) -> jax.Array:
  """samples['pixels'] as float32 (B, H, W, C), with a clear error for any other rank."""
  pixels = jnp.asarray(samples['pixels'], jnp.float32)
  if pixels.ndim != 4:
    raise ValueError(f'reward {name!r} expects pixels shaped (B, H, W, C), got {pixels.shape}')
  return pixels


def _per_sample_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def mean_intensity(name: str = 'mean_intensity') -> base.Reward:
  """r = mean pixel value of each sample; differentiable (gradient 1/(H·W·C) everywhere)."""

  def fn(params: Any, samples, batch, key) -> jax.Array:
    del params, batch, key  # A rule: no weights, no conditioning, no noise.
    return _per_sample_mean(_pixels(samples, name))

  return base.Reward(name=name, fn=fn, inputs='pixels', differentiable=True)


def target_l2(target: Any, name: str = 'target_l2') -> base.Reward:
  """r = −mean((x − target)²) over (H, W, C); `target` is one (H, W, C) image, the params."""
  target = jnp.asarray(target, jnp.float32)
  if target.ndim != 3:
    raise ValueError(f'reward {name!r}: target must be one (H, W, C) image, got {target.shape}')

  def fn(params: jax.Array, samples, batch, key) -> jax.Array:
    del batch, key
    pixels = _pixels(samples, name)
    if pixels.shape[1:] != params.shape:
      raise ValueError(f'reward {name!r}: pixels {pixels.shape} do not match the target image '
                       f'{params.shape}')
    return -_per_sample_mean(jnp.square(pixels - params[None]))

  return base.Reward(name=name, fn=fn, inputs='pixels', differentiable=True, params=target)


def digit_prototypes(split_seed: int = 0) -> np.ndarray:
  """(10, 16, 16, 1) float32: the mean training image of each digit label."""
  train = digits.load_split('train', seed=split_seed)
  images, labels = train['images'], train['labels']
  return np.stack([images[labels == k].mean(axis=0) for k in range(10)]).astype(np.float32)


def digit_prototype(split_seed: int = 0, name: str = 'digit_prototype') -> base.Reward:
  """r = −mean((x − P[batch['labels']])²): closeness to the mean training digit of the prompt.

  Args:
    split_seed: the seed of the digits train / held-out split; the prototypes use only the
      training part, so the held-out digits stay unseen by the reward.
    name: the reward name.

  The batch must carry 'labels' (B,) int in 0..9, the digit each sample's prompt asks for (e.g.
  from ``digits.label_from_prompt``; ``pipeline.prompt_iter`` batches do not carry it).
  """
  prototypes = jnp.asarray(digit_prototypes(split_seed))

  def fn(params: jax.Array, samples, batch, key) -> jax.Array:
    del key
    if 'labels' not in batch:
      raise KeyError(f"reward {name!r} needs batch['labels'] (the digit each prompt asks for); "
                     f'batch has keys {sorted(batch)}')
    pixels = _pixels(samples, name)
    if pixels.shape[1:] != params.shape[1:]:
      raise ValueError(f'reward {name!r}: pixels {pixels.shape} do not match the digit '
                       f'prototypes {params.shape[1:]}')
    labels = jnp.asarray(batch['labels'], jnp.int32)
    if labels.shape != pixels.shape[:1]:
      raise ValueError(f'reward {name!r}: batch["labels"] must have shape {pixels.shape[:1]}, '
                       f'got {labels.shape}')
    # Distances to all 10 prototypes, then a one-hot select instead of the gather params[labels]:
    # a gather of a replicated table by batch-sharded indices is rejected under explicit
    # sharding, while this elementwise form shards on the batch under any mesh (10x of a tiny
    # cost). Labels outside 0..9 select nothing and score 0.
    distances = jnp.mean(jnp.square(pixels[:, None] - params[None]), axis=(2, 3, 4))  # (B, 10)
    one_hot = jax.nn.one_hot(labels, params.shape[0], dtype=jnp.float32)
    return -jnp.sum(one_hot * distances, axis=1)

  return base.Reward(name=name, fn=fn, inputs='pixels', differentiable=True, params=prototypes)


def ink_fraction(threshold: float = 0.5, name: str = 'ink_fraction') -> base.Reward:
  """r = fraction of pixels strictly above `threshold`; a count, hence not differentiable."""
  threshold = float(threshold)

  def fn(params: Any, samples, batch, key) -> jax.Array:
    del params, batch, key
    return _per_sample_mean((_pixels(samples, name) > threshold).astype(jnp.float32))

  return base.Reward(name=name, fn=fn, inputs='pixels', differentiable=False)
