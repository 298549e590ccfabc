"""Named random streams: the one way to derive a key (or an integer seed) from a run's seed.

`fold_in(root, 'lora_init')` folds a stable hash of the stream's name (CRC-32, the same on every
host and Python run) into `root`; `key(seed, name)` does so from `jax.random.key(seed)`. Two
streams with different names never share a key, whatever the seeds of the stages that use them;
`seed_for(seed, name)` gives an integer seed where an API wants one (numpy, a stage's config).
"""

from __future__ import annotations

import zlib

import jax
import numpy as np


def stream_id(name: str) -> np.uint32:
  """The 32-bit id of a stream name (CRC-32 of its UTF-8 bytes)."""
  if not name:
    raise ValueError('a random stream needs a non-empty name.')
  return np.uint32(zlib.crc32(name.encode('utf-8')))


def fold_in(root: jax.Array, name: str) -> jax.Array:
  """The key of stream `name` under `root`."""
  return jax.random.fold_in(root, stream_id(name))


def key(seed: int, name: str) -> jax.Array:
  """The key of stream `name` under the run's seed."""
  return fold_in(jax.random.key(int(seed)), name)


def seed_for(seed: int, name: str) -> int:
  """A non-negative int31 seed for stream `name`, from its key's bits."""
  bits = np.asarray(jax.random.bits(key(seed, name), (), np.uint32))
  return int(bits) & 0x7FFFFFFF
