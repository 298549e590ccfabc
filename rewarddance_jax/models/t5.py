"""T5 v1.1 encoder (the FLUX / SD3 text encoder) in Flax NNX.

Raffel et al. 2020 (T5, §2.1) with the v1.1 changes (gated-GELU FFN, no bias anywhere, untied):
  1. h = embed(ids).
  2. Per block: h += O·Attn(RMS(h)) with scores q·kᵀ + b(k − q) (no 1/√d scaling: T5 folds it into
     the init), b a learned per-head bias over log-spaced relative-position buckets, computed once
     (block 0's table) and shared by all blocks; then h += W_o(gelu_tanh(W_0·RMS(h)) ⊙ W_1·RMS(h)).
  3. last_hidden_state = RMS_final(h). RMS is T5LayerNorm: x·rsqrt(mean(x²) + ε)·w, no mean.
Padding keys are masked out; the mask is an (B, L) bool (True = token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from rewarddance_jax.nn import layers


@dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dtype: str = 'float32'
  param_dtype: str = 'float32'


def relative_position_bucket(rel: jax.Array, num_buckets: int, max_distance: int) -> jax.Array:
  """Bidirectional T5 buckets of rel = key_pos − query_pos (int32)."""
  num_buckets //= 2
  out = (rel > 0).astype(jnp.int32) * num_buckets
  rel = jnp.abs(rel)
  max_exact = num_buckets // 2
  safe = jnp.maximum(rel, 1).astype(jnp.float32)
  large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return out + jnp.where(rel < max_exact, rel, large)


class T5Block(nnx.Module):

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
              use_bias=False)
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    self.heads = cfg.num_heads
    self.attn_norm = layers.RMSNorm(d, eps=cfg.layer_norm_epsilon)
    self.q = layers.dense(d, inner, ('embed', 'heads'), **kw)
    self.k = layers.dense(d, inner, ('embed', 'heads'), **kw)
    self.v = layers.dense(d, inner, ('embed', 'heads'), **kw)
    self.o = layers.dense(inner, d, ('heads', 'embed'), **kw)
    self.ff_norm = layers.RMSNorm(d, eps=cfg.layer_norm_epsilon)
    self.wi_0 = layers.dense(d, cfg.d_ff, ('embed', 'mlp'), **kw)
    self.wi_1 = layers.dense(d, cfg.d_ff, ('embed', 'mlp'), **kw)
    self.wo = layers.dense(cfg.d_ff, d, ('mlp', 'embed'), **kw)

  def __call__(self, h, bias, mask):
    x = self.attn_norm(h)
    split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)
    out = jax.nn.dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                       bias=bias, mask=mask, scale=1.0, implementation='xla')
    h = h + self.o(out.reshape(*out.shape[:2], -1))
    x = self.ff_norm(h)
    return h + self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class T5Encoder(nnx.Module):
  """ids (B, L) int, mask (B, L) bool → last_hidden_state (B, L, d_model) fp32."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=pd, dtype=jnp.dtype(cfg.dtype),
                           embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0),
                                                                ('vocab', 'embed')), rngs=rngs)
    self.rel_bias = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(),
                                      (cfg.relative_attention_num_buckets, cfg.num_heads), pd),
        out_sharding=(None, None))
    self.blocks = nnx.List([T5Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)

  def position_bias(self, length: int) -> jax.Array:
    pos = jnp.arange(length, dtype=jnp.int32)
    buckets = relative_position_bucket(pos[None, :] - pos[:, None],
                                       self.cfg.relative_attention_num_buckets,
                                       self.cfg.relative_attention_max_distance)
    return jnp.transpose(self.rel_bias[...][buckets], (2, 0, 1))[None]   # (1, H, Lq, Lk)

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    h = self.embed(ids)
    bias = self.position_bias(ids.shape[1]).astype(h.dtype)
    key_mask = None if mask is None else mask.astype(bool)[:, None, None, :]
    for block in self.blocks:
      h = block(h, bias, key_mask)
    return self.final_norm(h).astype(jnp.float32)
