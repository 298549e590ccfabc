"""A small learned text encoder over token ids: the digits' conditioning path.

Real models condition on frozen T5/CLIP outputs (the `external` path of the generator); the digits
default learns its own: token embedding + learned positions → (B, L, context_dim) sequence, and a
masked mean → Linear → (B, pooled_dim) pooled vector. Anything producing `(txt, pooled, mask)`
replaces it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rewarddance_jax.nn import layers


class TokenTextEncoder(nnx.Module):
  """ids (B, L) int, mask (B, L) bool → txt (B, L, context_dim), pooled (B, pooled_dim)."""

  def __init__(self, vocab_size: int, max_len: int, context_dim: int, pooled_dim: int, *,
               rngs: nnx.Rngs, param_dtype=jnp.float32):
    init = nnx.initializers.normal(0.02)
    self.max_len = max_len
    self.embed = nnx.Embed(vocab_size, context_dim, param_dtype=param_dtype,
                           embedding_init=nnx.with_partitioning(init, ('vocab', 'embed')),
                           rngs=rngs)
    self.pos = nnx.Param(init(rngs.params(), (max_len, context_dim), param_dtype),
                         out_sharding=(None, 'embed'))
    self.pool = layers.dense(context_dim, pooled_dim, ('embed', None), rngs=rngs,
                             param_dtype=param_dtype)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    if ids.shape[1] > self.max_len:
      raise ValueError(f'text length {ids.shape[1]} exceeds the encoder max_len {self.max_len}.')
    txt = self.embed(ids) + self.pos[...][None, :ids.shape[1]]
    m = mask.astype(txt.dtype)[..., None]
    pooled = jnp.sum(txt * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return txt, self.pool(pooled)
