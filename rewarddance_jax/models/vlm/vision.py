"""InternViT vision encoder (transformers `InternVLVisionModel`), Flax NNX.

Per tile (B, H, W, C) already normalised:
  1. patches p×p → linear (the conv of transformers as a dense over flattened (p, p, C) patches);
  2. prepend the cls token, add absolute position embeddings (1 + grid², D);
  3. pre-norm blocks: x += λ1 · Attn(N1(x)); x += λ2 · MLP(N2(x)), with layer-scale vectors λ, an
     optional RMS qk-norm over the full width (InternViT-6B), GELU (erf) MLP;
  4. a final LayerNorm unless `use_mean_pooling` (transformers' convention: identity then).
Returns every token (cls included); the VLM drops the cls token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rewarddance_jax.models.vlm.config import VLMConfig
from rewarddance_jax.nn import layers
from rewarddance_jax.nn.attention import attention
from rewarddance_jax.nn.stack import make_stack, run_stack
from rewarddance_jax.parallel.sharding import constrain

_TOKENS = ('act_batch', 'act_len', 'act_embed')


def _kw(cfg: VLMConfig, rngs):
  return dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias (torch nn.LayerNorm), fp32 inside."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=('norm',))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=('norm',))

  def __call__(self, x):
    y = layers.layer_norm(x.astype(jnp.float32), self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def make_norm(kind: str, dim: int, eps: float, param_dtype=jnp.float32):
  if kind == 'rms_norm':
    return layers.RMSNorm(dim, eps=eps, name='norm', param_dtype=param_dtype)
  return LayerNorm(dim, eps=eps, param_dtype=param_dtype)


class VisionBlock(nnx.Module):
  """One InternViT layer; carry = (x,)."""

  def __init__(self, cfg: VLMConfig, rngs: nnx.Rngs):
    v, kw = cfg.vision, _kw(cfg, rngs)
    d, pd = v.hidden_size, jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.norm1 = make_norm(v.norm_type, d, v.norm_eps, pd)
    self.norm2 = make_norm(v.norm_type, d, v.norm_eps, pd)
    self.q = layers.dense(d, d, ('embed', 'heads'), use_bias=v.qkv_bias, **kw)
    self.k = layers.dense(d, d, ('embed', 'heads'), use_bias=v.qkv_bias, **kw)
    self.v = layers.dense(d, d, ('embed', 'heads'), use_bias=v.qkv_bias, **kw)
    self.q_norm = layers.RMSNorm(d, eps=1e-6, name='norm', param_dtype=pd) if v.qk_norm else None
    self.k_norm = layers.RMSNorm(d, eps=1e-6, name='norm', param_dtype=pd) if v.qk_norm else None
    self.proj = layers.dense(d, d, ('heads', 'embed'), **kw)
    self.fc1 = layers.dense(d, v.intermediate_size, ('embed', 'mlp'), **kw)
    self.fc2 = layers.dense(v.intermediate_size, d, ('mlp', 'embed'), **kw)
    self.lambda_1 = nnx.Param(jnp.full((d,), v.layer_scale_init, pd), out_sharding=('norm',))
    self.lambda_2 = nnx.Param(jnp.full((d,), v.layer_scale_init, pd), out_sharding=('norm',))

  def __call__(self, carry):
    (x,) = carry
    heads = self.cfg.vision.num_heads
    h = self.norm1(x)
    q, k, v = self.q(h), self.k(h), self.v(h)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    split = lambda t: t.reshape(*t.shape[:2], heads, -1)
    out = attention(split(q), split(k), split(v), impl=self.cfg.attention)
    x = x + self.lambda_1[...].astype(x.dtype) * self.proj(out.reshape(x.shape))
    h = self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))
    x = x + self.lambda_2[...].astype(x.dtype) * h
    return (constrain(x, _TOKENS),)


class VisionEncoder(nnx.Module):
  """Tiles (N, H, W, C), normalised → tokens (N, 1 + grid², D)."""

  def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs):
    v, kw = cfg.vision, _kw(cfg, rngs)
    d, pd = v.hidden_size, jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.patch = layers.dense(v.patch_size ** 2 * v.num_channels, d, ('conv_in', 'embed'), **kw)
    init = nnx.initializers.normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), pd), out_sharding=(None, None, 'embed'))
    self.pos_embed = nnx.Param(init(rngs.params(), (1, v.grid ** 2 + 1, d), pd),
                               out_sharding=(None, None, 'embed'))
    self.layers = make_stack(VisionBlock, cfg, v.num_layers, rngs)
    self.final_norm = None if v.use_mean_pooling else LayerNorm(d, eps=v.norm_eps, param_dtype=pd)

  def __call__(self, tiles: jax.Array) -> jax.Array:
    v, dtype = self.cfg.vision, jnp.dtype(self.cfg.dtype)
    n, h, w, c = tiles.shape
    if (h, w, c) != (v.image_size, v.image_size, v.num_channels):
      raise ValueError(f'vision tiles must be ({v.image_size}, {v.image_size}, '
                       f'{v.num_channels}), got {tiles.shape[1:]}.')
    p, g = v.patch_size, v.grid
    x = tiles.astype(dtype).reshape(n, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = self.patch(x.reshape(n, g * g, p * p * c))
    cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (n, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(dtype)
    (x,) = run_stack(self.layers, self.cfg, v.num_layers, (constrain(x, _TOKENS),))
    return x if self.final_norm is None else self.final_norm(x)
