"""SD3 / SD3.5 MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers", §4), Flax NNX.

A sibling of `mmdit.py` sharing `nn/`; same call signature as `Generator`:
`SD3Generator(x, sigma, cond={'txt','pooled'[, 'mask']})` → velocity v = ε − x0, x (B, H, W, C).
  1. Patchify x into p×p tokens (our `pack`, channel order (c, ph, pw) = the order of diffusers'
     patch-embedding conv weight flattened), embed linearly, add the learned 2D position table
     (pos_embed_max_size², a fixed sin-cos buffer in the checkpoints) center-cropped to the grid.
  2. vec = time_in(emb(1000σ)) + vector_in(pooled); txt = context_embedder(txt).
  3. Joint blocks: per stream adaLN-Zero (shift, scale, gate ×2); q/k/v per stream with optional
     RMS q/k norm (SD3.5), one attention over [img; txt]; per-stream output projection and MLP.
     The last block is "context pre-only": its text stream only feeds keys/values (its adaLN is
     continuous: shift, scale) and has no output projection or MLP.
     Dual-attention blocks (SD3.5, `dual_attention_layers`) add a second, image-only
     self-attention with its own (shift, scale, gate) from the same modulation (9 chunks).
  4. Final adaLN (shift, scale) + linear to p·p·C, unpatchified in (c, ph, pw) order.
Layers are not scanned (blocks differ: dual attention, pre-only last block; the DiNa-LRM backbone,
models/backbone_sd3.py, scans runs of blocks of one kind).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from rewarddance_jax.models.generator import pack, unpack
from rewarddance_jax.nn import layers
from rewarddance_jax.nn.attention import attention
from rewarddance_jax.nn.stack import REMAT_POLICIES


class Buffer(nnx.Variable):
  """A fixed array loaded with the weights (not a Param: optimizers leave it alone)."""


@dataclass(frozen=True)
class SD3Config:
  latent_channels: int = 16
  patch_size: int = 2
  num_heads: int = 24
  head_dim: int = 64
  depth: int = 24
  context_dim: int = 4096
  caption_projection_dim: int = 1536
  pooled_dim: int = 2048
  pos_embed_max_size: int = 384
  dual_attention_layers: tuple[int, ...] = tuple(range(13))
  qk_norm: bool = True
  mlp_ratio: float = 4.0
  timestep_scale: float = 1000.0
  # A diffusers config field the model does not read, kept so that an export round-trips.
  sample_size: int = 128
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: str = 'none'
  attention: str = 'auto'

  RANGES = {'latent_channels': '[1, inf)', 'patch_size': '[1, inf)', 'num_heads': '[1, inf)',
            'head_dim': '[1, inf)', 'depth': '[1, inf)', 'context_dim': '[1, inf)',
            'caption_projection_dim': '[1, inf)', 'pooled_dim': '[1, inf)',
            'pos_embed_max_size': '[1, inf)', 'mlp_ratio': '(0, inf)',
            'timestep_scale': '(0, inf)', 'sample_size': '[1, inf)'}

  @property
  def hidden(self) -> int:
    return self.num_heads * self.head_dim

  def __post_init__(self):
    if self.caption_projection_dim != self.hidden:
      raise ValueError(f'sd3 caption_projection_dim={self.caption_projection_dim} must equal '
                       f'num_heads·head_dim={self.hidden}.')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'sd3 remat={self.remat!r} is not one of {tuple(REMAT_POLICIES)}.')


def _kw(cfg: SD3Config, rngs):
  return dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class _Attn(nnx.Module):
  """q/k/v for one stream, optional RMS q/k norm (eps 1e-6)."""

  def __init__(self, cfg: SD3Config, rngs: nnx.Rngs):
    d, kw = cfg.hidden, _kw(cfg, rngs)
    self.heads = cfg.num_heads
    self.q = layers.dense(d, d, ('embed', 'heads'), **kw)
    self.k = layers.dense(d, d, ('embed', 'heads'), **kw)
    self.v = layers.dense(d, d, ('embed', 'heads'), **kw)
    self.q_norm = layers.RMSNorm(cfg.head_dim, name='kv') if cfg.qk_norm else None
    self.k_norm = layers.RMSNorm(cfg.head_dim, name='kv') if cfg.qk_norm else None

  def __call__(self, x):
    split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v


def _merge_heads(o):
  return o.reshape(*o.shape[:2], -1)


class JointBlock(nnx.Module):

  def __init__(self, cfg: SD3Config, rngs: nnx.Rngs, *, pre_only: bool, dual: bool):
    d, kw = cfg.hidden, _kw(cfg, rngs)
    hidden = int(d * cfg.mlp_ratio)
    self.cfg, self.pre_only, self.dual = cfg, pre_only, dual
    self.img_mod = layers.Modulation(d, 9 if dual else 6, **kw)
    self.txt_mod = layers.Modulation(d, 2 if pre_only else 6, **kw)
    self.img_attn = _Attn(cfg, rngs)
    self.txt_attn = _Attn(cfg, rngs)
    self.img_out = layers.dense(d, d, ('heads', 'embed'), **kw)
    self.img_mlp = layers.FeedForward(d, hidden, **kw)
    self.txt_out = None if pre_only else layers.dense(d, d, ('heads', 'embed'), **kw)
    self.txt_mlp = None if pre_only else layers.FeedForward(d, hidden, **kw)
    self.attn2 = _Attn(cfg, rngs) if dual else None
    self.attn2_out = layers.dense(d, d, ('heads', 'embed'), **kw) if dual else None

  def __call__(self, img, txt, vec, mask):
    cfg, ln, mod = self.cfg, layers.layer_norm, layers.modulate
    im = self.img_mod(vec)
    sh1, sc1, g1, sh2, sc2, g2 = im[:6]
    img_n = ln(img)
    iq, ik, iv = self.img_attn(mod(img_n, sh1, sc1))
    tm = self.txt_mod(vec)
    tq, tk, tv = self.txt_attn(mod(ln(txt), tm[0], tm[1]))
    cat = lambda a, b: jnp.concatenate([a, b], axis=1)
    o = _merge_heads(attention(cat(iq, tq), cat(ik, tk), cat(iv, tv), mask=mask,
                               impl=cfg.attention))
    n_img = img.shape[1]
    img = img + g1[:, None] * self.img_out(o[:, :n_img])
    if self.dual:
      sh3, sc3, g3 = im[6:]
      q2, k2, v2 = self.attn2(mod(img_n, sh3, sc3))
      o2 = _merge_heads(attention(q2, k2, v2, impl=cfg.attention))
      img = img + g3[:, None] * self.attn2_out(o2)
    img = img + g2[:, None] * self.img_mlp(mod(ln(img), sh2, sc2))
    if self.pre_only:
      return img, txt
    _, _, tg1, tsh2, tsc2, tg2 = tm
    txt = txt + tg1[:, None] * self.txt_out(o[:, n_img:])
    txt = txt + tg2[:, None] * self.txt_mlp(mod(ln(txt), tsh2, tsc2))
    return img, txt


class SD3Generator(nnx.Module):
  """(x, σ, cond) → velocity, with the SD3 transformer (see module doc)."""

  def __init__(self, cfg: SD3Config, *, rngs: nnx.Rngs):
    d, kw = cfg.hidden, _kw(cfg, rngs)
    p, c = cfg.patch_size, cfg.latent_channels
    self.cfg = cfg
    self.img_in = layers.dense(c * p * p, d, (None, 'embed'), **kw)
    self.pos_embed = Buffer(jnp.zeros((cfg.pos_embed_max_size ** 2, d),
                                      jnp.dtype(cfg.param_dtype)), out_sharding=(None, 'embed'))
    self.txt_in = layers.dense(cfg.context_dim, d, (None, 'embed'), **kw)
    self.time_in = layers.MLPEmbedder(256, d, **kw)
    self.vector_in = layers.MLPEmbedder(cfg.pooled_dim, d, **kw)
    self.blocks = nnx.List([
        JointBlock(cfg, rngs, pre_only=i == cfg.depth - 1, dual=i in cfg.dual_attention_layers)
        for i in range(cfg.depth)])
    self.final_mod = layers.Modulation(d, 2, **kw)
    self.final_out = layers.dense(d, c * p * p, ('embed', None),
                                  kernel_init=nnx.initializers.zeros_init(), **kw)

  def cropped_pos_embed(self, h: int, w: int) -> jax.Array:
    m = self.cfg.pos_embed_max_size
    if h > m or w > m:
      raise ValueError(f'token grid {h}x{w} exceeds pos_embed_max_size {m}.')
    top, left = (m - h) // 2, (m - w) // 2
    table = self.pos_embed[...].reshape(m, m, -1)[top:top + h, left:left + w]
    return table.reshape(h * w, -1)

  def __call__(self, x: jax.Array, sigma: jax.Array, cond: dict,
               guidance: jax.Array | None = None) -> jax.Array:
    del guidance   # SD3 is not guidance-distilled
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    b, h, w, c = x.shape
    if c != cfg.latent_channels:
      raise ValueError(f'latent has {c} channels, the model expects {cfg.latent_channels}.')
    missing = {'txt', 'pooled'} - set(cond)
    if missing:
      raise ValueError(f'SD3 conditioning needs keys {sorted(missing)} in cond.')
    p = cfg.patch_size
    tokens = pack(x[:, None], p)
    img = self.img_in(tokens.astype(dtype)) + self.cropped_pos_embed(h // p, w // p)[None].astype(
        dtype)
    txt = self.txt_in(cond['txt'].astype(dtype))
    t = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,)) * cfg.timestep_scale
    vec = self.time_in(layers.timestep_embedding(t, 256).astype(dtype))
    vec = vec + self.vector_in(cond['pooled'].astype(dtype))
    mask = None
    if cond.get('mask') is not None:
      mask = jnp.concatenate([jnp.ones(img.shape[:2], bool), cond['mask'].astype(bool)], axis=1)
    for block in self.blocks:
      if cfg.remat != 'none':
        img, txt = nnx.remat(lambda blk, *a: blk(*a), policy=REMAT_POLICIES[cfg.remat])(
            block, img, txt, vec, mask)
      else:
        img, txt = block(img, txt, vec, mask)
    shift, scale = self.final_mod(vec)
    out = self.final_out(layers.modulate(layers.layer_norm(img), shift, scale))
    return unpack(out.astype(jnp.float32), 1, h, w, c, p)[:, 0]
