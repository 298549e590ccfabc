"""Per-label image tables on device: (P, T, H, W, C), one image drawn per batch row by key.

Used for ReFL's best-of-N references (T = the top candidates per prompt) and for the real-image
flow-matching term of GRPO (T = real images of each digit). Drawing inside the jitted step from
a step key (rather than on the host) makes a resumed run draw exactly what the uninterrupted
run would have drawn.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sample_table(table: jax.Array, labels: jax.Array, key: jax.Array) -> jax.Array:
  """(B, H, W, C): for each row one of the T images of its label, uniformly.

  One-hot contractions instead of a gather, so a replicated table indexed by batch-sharded
  labels shards on the batch (see rules.digit_prototype).
  """
  p, t = table.shape[:2]
  pick = jax.random.randint(key, labels.shape, 0, t)
  w = (jax.nn.one_hot(labels, p, dtype=jnp.float32)[:, :, None]
       * jax.nn.one_hot(pick, t, dtype=jnp.float32)[:, None, :])
  return jnp.einsum('bpt,pthwc->bhwc', w, table)


def build_table(images: np.ndarray, labels: np.ndarray, num_labels: int,
                per_label: int | None = None) -> np.ndarray:
  """(num_labels, T, H, W, C) float32: the first T images of each label, T = `per_label` or the
  smallest label count. A label with fewer than T images (or none) is an error naming it."""
  labels = np.asarray(labels)
  counts = [int(np.sum(labels == k)) for k in range(num_labels)]
  t = per_label if per_label is not None else min(counts)
  for k, n in enumerate(counts):
    if n < max(t, 1):
      raise ValueError(f'label {k} has {n} image(s); the table needs {max(t, 1)} per label.')
  return np.stack([np.asarray(images)[labels == k][:t] for k in range(num_labels)]).astype(
      np.float32)
