"""CLIP text transformer (the FLUX / SD3 pooled-text encoder) in Flax NNX.

Radford et al. 2021 (CLIP, §2.4): a causal pre-LN transformer over BPE tokens.
  1. h = token_embedding(ids) + position_embedding[:L].
  2. Per layer: h += out_proj(CausalAttn(LN1(h))); h += fc2(act(fc1(LN2(h)))), act = quick_gelu
     x·σ(1.702x) (OpenAI CLIP-L) or gelu (OpenCLIP bigG); padding keys are masked as well.
  3. last_hidden_state = LN_final(h); pooled = last_hidden_state at the EOS token (the first
     position holding eos_token_id; argmax(ids) for legacy configs with eos_token_id == 2);
     text_embeds = text_projection(pooled) when the model has a projection (SD3).
  `penultimate` (the hidden state before the last layer, no final LN) is what SD3 conditions on.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from rewarddance_jax.nn import layers

ACTIVATIONS = {
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  projection_dim: int | None = None      # set for CLIPTextModelWithProjection
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'CLIP hidden_act={self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}.')


class LayerNorm(nnx.Module):
  """LayerNorm with affine scale/bias; fp32 inside."""

  def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=('norm',))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=('norm',))

  def __call__(self, x):
    return (layers.layer_norm(x.astype(jnp.float32), self.eps) * self.scale[...]
            + self.bias[...]).astype(x.dtype)


class CLIPLayer(nnx.Module):

  def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    d, pd = cfg.hidden_size, jnp.dtype(cfg.param_dtype)
    self.heads, self.act = cfg.num_attention_heads, ACTIVATIONS[cfg.hidden_act]
    self.ln1 = LayerNorm(d, cfg.layer_norm_eps, pd)
    self.q = layers.dense(d, d, ('embed', 'heads'), **kw)
    self.k = layers.dense(d, d, ('embed', 'heads'), **kw)
    self.v = layers.dense(d, d, ('embed', 'heads'), **kw)
    self.out = layers.dense(d, d, ('heads', 'embed'), **kw)
    self.ln2 = LayerNorm(d, cfg.layer_norm_eps, pd)
    self.fc1 = layers.dense(d, cfg.intermediate_size, ('embed', 'mlp'), **kw)
    self.fc2 = layers.dense(cfg.intermediate_size, d, ('mlp', 'embed'), **kw)

  def __call__(self, h, mask):
    x = self.ln1(h)
    split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)
    o = jax.nn.dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                     mask=mask, implementation='xla')
    h = h + self.out(o.reshape(*o.shape[:2], -1))
    return h + self.fc2(self.act(self.fc1(self.ln2(h))))


class CLIPTextModel(nnx.Module):
  """ids (B, L), mask (B, L) → dict(last_hidden_state, penultimate, pooled[, text_embeds]), fp32."""

  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd, d = jnp.dtype(cfg.param_dtype), cfg.hidden_size
    init = nnx.initializers.normal(0.02)
    self.token_embedding = nnx.Embed(
        cfg.vocab_size, d, param_dtype=pd, dtype=jnp.dtype(cfg.dtype), rngs=rngs,
        embedding_init=nnx.with_partitioning(init, ('vocab', 'embed')))
    self.position_embedding = nnx.Param(init(rngs.params(), (cfg.max_position_embeddings, d), pd),
                                        out_sharding=(None, 'embed'))
    self.layers = nnx.List([CLIPLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
    self.final_ln = LayerNorm(d, cfg.layer_norm_eps, pd)
    self.text_projection = (layers.dense(d, cfg.projection_dim, ('embed', None), use_bias=False,
                                         rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=pd)
                            if cfg.projection_dim else None)

  def eos_index(self, ids: jax.Array) -> jax.Array:
    if self.cfg.eos_token_id == 2:
      return jnp.argmax(ids, axis=-1)
    return jnp.argmax((ids == self.cfg.eos_token_id).astype(jnp.int32), axis=-1)

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> dict:
    b, length = ids.shape
    if length > self.cfg.max_position_embeddings:
      raise ValueError(f'CLIP text length {length} exceeds max_position_embeddings '
                       f'{self.cfg.max_position_embeddings}.')
    h = self.token_embedding(ids) + self.position_embedding[...][None, :length].astype(
        jnp.dtype(self.cfg.dtype))
    full = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if mask is not None:
      full = full & mask.astype(bool)[:, None, None, :]
    penultimate = h
    for i, layer in enumerate(self.layers):
      if i == len(self.layers) - 1:
        penultimate = h
      h = layer(h, full)
    last = self.final_ln(h).astype(jnp.float32)
    pooled = last[jnp.arange(b), self.eos_index(ids)]
    out = {'last_hidden_state': last, 'penultimate': penultimate.astype(jnp.float32),
           'pooled': pooled}
    if self.text_projection is not None:
      out['text_embeds'] = self.text_projection(pooled.astype(jnp.dtype(self.cfg.dtype))).astype(
          jnp.float32)
    return out
