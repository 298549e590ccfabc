"""MMDiT with FLUX-style double-stream and single-stream blocks (Flax NNX).

Forward pass on packed image tokens (Black Forest Labs FLUX.1; diffusers `FluxTransformer2DModel`):
  1. img = img_in(x_tokens); txt = txt_in(context).
  2. vec = time_in(emb(1000σ)) [+ guidance_in(emb(1000·g))] + vector_in(pooled).
  3. Double-stream blocks: each stream is adaLN-modulated (shift, scale, gate ×2 from vec), projects
     its own q/k/v with RMS q/k norm; attention runs jointly over [txt; img] with 3-axis RoPE
     (text ids are zero); each stream has its own output projection and MLP.
  4. Single-stream blocks over the concatenation [txt; img]: one modulation (shift, scale, gate),
     parallel attention and MLP branches summed into one residual.
  5. Final adaLN (shift, scale) + linear to the patch channels, on the image tokens only.
Each stream's q/k/v is one fused (D, 3·D) kernel whose columns are interleaved per head (`_Attn`),
so sharding on 'heads' keeps a head's q, k and v together; diffusers' separate to_q/to_k/to_v are
fused on import (weights/flux.py). The single block keeps its input projection as two kernels (qkv
and mlp_in) and its output linear on concat(attn, mlp) as two (attn_out + mlp_out): the same
function, with the parts sharding on 'heads' and 'mlp'.
Layers optionally run as a `lax.scan` over stacked weights with a remat policy (config;
`nn/stack.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from rewarddance_jax.nn import layers
from rewarddance_jax.nn.attention import attention
from rewarddance_jax.nn.rope import apply_rope, rope_angles
from rewarddance_jax.nn.stack import REMAT_POLICIES, make_stack, run_stack
from rewarddance_jax.parallel.sharding import constrain

_TOKENS = ('act_batch', 'act_len', 'act_embed')


@dataclass(frozen=True)
class MMDiTConfig:
  """Static architecture of the transformer (hashable: it lives in the graphdef)."""
  in_channels: int = 64          # channels of a packed token (latent channels · patch²)
  out_channels: int | None = None
  num_heads: int = 24
  head_dim: int = 128
  depth_double: int = 19
  depth_single: int = 38
  mlp_ratio: float = 4.0
  context_dim: int = 4096
  pooled_dim: int = 768
  axes_dims: tuple[int, ...] = (16, 56, 56)
  rope_theta: float = 10000.0
  guidance_embed: bool = False
  qkv_bias: bool = True
  dtype: str = 'float32'         # compute dtype
  param_dtype: str = 'float32'
  scan_layers: bool = False
  remat: str = 'none'
  attention: str = 'auto'
  # Pin block inputs/outputs to the (act_batch, act_len, act_embed) layout with sharding
  # constraints, so GSPMD never picks a surprising activation layout between blocks.
  constrain_activations: bool = True

  RANGES = {'in_channels': '[1, inf)', 'out_channels': '[1, inf)', 'num_heads': '[1, inf)',
            'head_dim': '[1, inf)', 'depth_double': '[0, inf)', 'depth_single': '[0, inf)',
            'mlp_ratio': '(0, inf)', 'context_dim': '[1, inf)', 'pooled_dim': '[1, inf)',
            'rope_theta': '(0, inf)'}

  @property
  def hidden(self) -> int:
    return self.num_heads * self.head_dim

  def __post_init__(self):
    if sum(self.axes_dims) != self.head_dim:
      raise ValueError(f'model.axes_dims={tuple(self.axes_dims)} must sum to head_dim='
                       f'{self.head_dim}.')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'model.remat={self.remat!r} is not one of {tuple(REMAT_POLICIES)}.')


def _dt(name: str):
  return jnp.dtype(name)


class _Attn(nnx.Module):
  """One fused q/k/v projection with RMS q/k norm for one stream.

  The kernel is (D, 3·D) with its columns interleaved per head, (D, H, 3, head_dim): one GEMM
  projects q, k and v (three separate batch-1 GEMMs of N = D leave an H100 part idle, and XLA's
  dot merger would otherwise concatenate the three weights on every call), and a split of the
  columns over heads ('heads' → tensor) keeps each head's q, k and v on one device.
  """

  def __init__(self, cfg: MMDiTConfig, rngs: nnx.Rngs):
    d, h, pd = cfg.hidden, cfg.num_heads, _dt(cfg.param_dtype)
    self.heads = h
    # Initialised as three (D, D) projections drawing their keys in the order three separate
    # Linears would (q kernel, q bias, k kernel, ...): the same initial model as separate q/k/v.
    keys = [rngs.params() for _ in range(6 if cfg.qkv_bias else 3)][::2 if cfg.qkv_bias else 1]
    parts = [layers.default_kernel_init(k, (d, d), pd).reshape(d, h, 1, -1) for k in keys]
    kernel = jnp.concatenate(parts, axis=2).reshape(d, 3 * d)
    self.qkv = layers.dense(d, 3 * d, ('embed', 'heads'), use_bias=cfg.qkv_bias,
                            kernel_init=lambda *_: kernel, rngs=nnx.Rngs(0), dtype=_dt(cfg.dtype),
                            param_dtype=pd)
    self.q_norm = layers.RMSNorm(cfg.head_dim, name='kv')
    self.k_norm = layers.RMSNorm(cfg.head_dim, name='kv')

  def __call__(self, x):
    qkv = self.qkv(x).reshape(*x.shape[:2], self.heads, 3, -1)
    return self.q_norm(qkv[..., 0, :]), self.k_norm(qkv[..., 1, :]), qkv[..., 2, :]


def _constrain(cfg: MMDiTConfig, x: jax.Array) -> jax.Array:
  return constrain(x, _TOKENS) if cfg.constrain_activations else x


def _joint_attention(cfg, q, k, v, angles, mask):
  q, k = apply_rope(q, angles), apply_rope(k, angles)
  out = attention(q, k, v, mask=mask, impl=cfg.attention)
  return out.reshape(*out.shape[:2], -1)


class DoubleBlock(nnx.Module):
  """Two streams (txt, img), joint attention, separate weights per stream."""

  def __init__(self, cfg: MMDiTConfig, rngs: nnx.Rngs):
    d = cfg.hidden
    kw = dict(rngs=rngs, dtype=_dt(cfg.dtype), param_dtype=_dt(cfg.param_dtype))
    self.cfg = cfg
    self.img_mod = layers.Modulation(d, 6, **kw)
    self.txt_mod = layers.Modulation(d, 6, **kw)
    self.img_attn = _Attn(cfg, rngs)
    self.txt_attn = _Attn(cfg, rngs)
    self.img_out = layers.dense(d, d, ('heads', 'embed'), **kw)
    self.txt_out = layers.dense(d, d, ('heads', 'embed'), **kw)
    hidden = int(d * cfg.mlp_ratio)
    self.img_mlp = layers.FeedForward(d, hidden, **kw)
    self.txt_mlp = layers.FeedForward(d, hidden, **kw)

  def __call__(self, carry):
    img, txt, vec, angles, mask = carry
    i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = self.img_mod(vec)
    t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = self.txt_mod(vec)
    iq, ik, iv = self.img_attn(layers.modulate(layers.layer_norm(img), i_sh1, i_sc1))
    tq, tk, tv = self.txt_attn(layers.modulate(layers.layer_norm(txt), t_sh1, t_sc1))
    cat = lambda a, b: jnp.concatenate([a, b], axis=1)
    attn = _joint_attention(self.cfg, cat(tq, iq), cat(tk, ik), cat(tv, iv), angles, mask)
    n_txt = txt.shape[1]
    txt = txt + t_g1[:, None] * self.txt_out(attn[:, :n_txt])
    img = img + i_g1[:, None] * self.img_out(attn[:, n_txt:])
    img = img + i_g2[:, None] * self.img_mlp(layers.modulate(layers.layer_norm(img), i_sh2, i_sc2))
    txt = txt + t_g2[:, None] * self.txt_mlp(layers.modulate(layers.layer_norm(txt), t_sh2, t_sc2))
    return _constrain(self.cfg, img), _constrain(self.cfg, txt), vec, angles, mask


class SingleBlock(nnx.Module):
  """One stream over [txt; img]: parallel attention and MLP, one modulated residual."""

  def __init__(self, cfg: MMDiTConfig, rngs: nnx.Rngs):
    d = cfg.hidden
    kw = dict(rngs=rngs, dtype=_dt(cfg.dtype), param_dtype=_dt(cfg.param_dtype))
    self.cfg = cfg
    hidden = int(d * cfg.mlp_ratio)
    self.mod = layers.Modulation(d, 3, **kw)
    self.attn = _Attn(cfg, rngs)
    self.mlp_in = layers.dense(d, hidden, ('embed', 'mlp'), **kw)
    self.attn_out = layers.dense(d, d, ('heads', 'embed'), use_bias=False, **kw)
    self.mlp_out = layers.dense(hidden, d, ('mlp', 'embed'), **kw)

  def __call__(self, carry):
    x, vec, angles, mask = carry
    shift, scale, gate = self.mod(vec)
    h = layers.modulate(layers.layer_norm(x), shift, scale)
    q, k, v = self.attn(h)
    attn = _joint_attention(self.cfg, q, k, v, angles, mask)
    mlp = jax.nn.gelu(self.mlp_in(h), approximate=True)
    x = x + gate[:, None] * (self.attn_out(attn) + self.mlp_out(mlp))
    return _constrain(self.cfg, x), vec, angles, mask


class MMDiT(nnx.Module):
  """The transformer: packed image tokens + text tokens → velocity per image token."""

  def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden
    kw = dict(rngs=rngs, dtype=_dt(cfg.dtype), param_dtype=_dt(cfg.param_dtype))
    self.cfg = cfg
    self.img_in = layers.dense(cfg.in_channels, d, (None, 'embed'), **kw)
    self.txt_in = layers.dense(cfg.context_dim, d, (None, 'embed'), **kw)
    self.time_in = layers.MLPEmbedder(256, d, **kw)
    self.vector_in = layers.MLPEmbedder(cfg.pooled_dim, d, **kw)
    self.guidance_in = layers.MLPEmbedder(256, d, **kw) if cfg.guidance_embed else None
    self.double_blocks = make_stack(DoubleBlock, cfg, cfg.depth_double, rngs)
    self.single_blocks = make_stack(SingleBlock, cfg, cfg.depth_single, rngs)
    self.final_mod = layers.Modulation(d, 2, **kw)
    # Zero-initialised output: the untrained model predicts v = 0 (stable start from scratch).
    self.final_out = layers.dense(d, cfg.out_channels or cfg.in_channels, ('embed', None),
                                  kernel_init=nnx.initializers.zeros_init(), **kw)

  def __call__(self, img: jax.Array, img_ids: jax.Array, txt: jax.Array, txt_ids: jax.Array,
               timesteps: jax.Array, pooled: jax.Array, guidance: jax.Array | None = None,
               txt_mask: jax.Array | None = None) -> jax.Array:
    """img (B,N,C_in), ids (B,N,3), txt (B,L,C_ctx), timesteps (B,) already ×1000, pooled (B,P)."""
    cfg = self.cfg
    dtype = _dt(cfg.dtype)
    img = _constrain(cfg, self.img_in(img.astype(dtype)))
    txt = _constrain(cfg, self.txt_in(txt.astype(dtype)))
    vec = self.time_in(layers.timestep_embedding(timesteps, 256).astype(dtype))
    if self.guidance_in is not None:
      if guidance is None:
        raise ValueError('this model has a guidance embedding: pass guidance (B,).')
      vec = vec + self.guidance_in(layers.timestep_embedding(guidance * 1000.0, 256).astype(dtype))
    vec = vec + self.vector_in(pooled.astype(dtype))
    angles = rope_angles(jnp.concatenate([txt_ids, img_ids], axis=1), cfg.axes_dims,
                         cfg.rope_theta)
    mask = None
    if txt_mask is not None:
      mask = jnp.concatenate([txt_mask.astype(bool),
                              jnp.ones(img.shape[:2], bool)], axis=1)
    img, txt, vec, angles, mask = run_stack(self.double_blocks, cfg, cfg.depth_double,
                                            (img, txt, vec, angles, mask))
    n_txt = txt.shape[1]
    x = jnp.concatenate([txt, img], axis=1)
    x, *_ = run_stack(self.single_blocks, cfg, cfg.depth_single, (x, vec, angles, mask))
    img = x[:, n_txt:]
    shift, scale = self.final_mod(vec)
    out = self.final_out(layers.modulate(layers.layer_norm(img), shift, scale))
    return out.astype(jnp.float32)
