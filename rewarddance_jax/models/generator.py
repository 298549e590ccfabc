"""The rectified-flow generator: latent image (or video) in, velocity out.

`Generator(x, sigma, cond, guidance)`:
  1. Pack the latent x (B, H, W, C) or (B, F, H, W, C) into tokens of p×p patches, channel order
     (c, ph, pw) as FLUX packs its latents, with position ids (frame, row, col).
  2. Conditioning: `cond = {'tokens', 'mask'}` runs the built-in `TokenTextEncoder` (digits);
     `cond = {'txt', 'pooled'[, 'mask']}` takes embeddings from external encoders (T5 + CLIP).
  3. The MMDiT predicts v = ε − x0 per token at timestep 1000·σ; unpack to x's shape (fp32).
The model knows nothing of RL or of the sampler: flow/ calls it through a velocity closure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from rewarddance_jax import config_lib
from rewarddance_jax.models.mmdit import MMDiT, MMDiTConfig
from rewarddance_jax.models.text import TokenTextEncoder
from rewarddance_jax.nn.rope import image_position_ids

TEXT_KINDS = ('tokens', 'external')


@dataclass(frozen=True)
class GeneratorConfig:
  mmdit: MMDiTConfig
  latent_channels: int = 16
  patch_size: int = 2
  text: str = 'external'
  vocab_size: int = 0
  max_text_len: int = 0
  timestep_scale: float = 1000.0

  RANGES = {'latent_channels': '[1, inf)', 'patch_size': '[1, inf)', 'vocab_size': '[0, inf)',
            'max_text_len': '[0, inf)', 'timestep_scale': '(0, inf)'}

  def __post_init__(self):
    if self.text not in TEXT_KINDS:
      raise ValueError(f'config.model.text={self.text!r} is not one of {TEXT_KINDS}.')


def generator_config(model_cfg) -> GeneratorConfig:
  """Builds the static config from the flat `config.model` section (GeneratorConfig and
  MMDiTConfig keys side by side, and a preset 'name'); unknown keys are an error."""
  cfg = {k: v for k, v in dict(model_cfg).items() if k != 'name'}
  gen_fields = {f.name for f in dataclasses.fields(GeneratorConfig)} - {'mmdit'}
  mm_fields = {f.name for f in dataclasses.fields(MMDiTConfig)}
  config_lib.check_keys(cfg, gen_fields | mm_fields, 'config.model')
  gen = config_lib.section(GeneratorConfig, {k: v for k, v in cfg.items() if k in gen_fields},
                           'config.model', mmdit=None)
  c_in = gen.latent_channels * gen.patch_size**2
  mm = {'in_channels': c_in, **{k: v for k, v in cfg.items() if k in mm_fields}}
  mmdit = config_lib.section(MMDiTConfig, mm, 'config.model')
  if mmdit.in_channels != c_in:
    raise ValueError(f'config.model.in_channels={mmdit.in_channels} must equal latent_channels·'
                     f'patch_size² = {c_in}.')
  return dataclasses.replace(gen, mmdit=mmdit)


def pack(x: jax.Array, p: int) -> jax.Array:
  """(B, F, H, W, C) → (B, F·(H/p)·(W/p), C·p·p), channel order (c, ph, pw)."""
  b, f, h, w, c = x.shape
  if h % p or w % p:
    raise ValueError(f'latent size {h}x{w} is not divisible by patch_size {p}.')
  x = x.reshape(b, f, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 3, 5)
  return x.reshape(b, f * (h // p) * (w // p), c * p * p)


def unpack(tokens: jax.Array, f: int, h: int, w: int, c: int, p: int) -> jax.Array:
  """Inverse of `pack` → (B, F, H, W, C)."""
  b = tokens.shape[0]
  x = tokens.reshape(b, f, h // p, w // p, c, p, p).transpose(0, 1, 2, 5, 3, 6, 4)
  return x.reshape(b, f, h, w, c)


class Generator(nnx.Module):
  """MMDiT + (optional) token text encoder; `__call__` maps (x, σ, cond) → velocity."""

  def __init__(self, cfg: GeneratorConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.transformer = MMDiT(cfg.mmdit, rngs=rngs)
    if cfg.text == 'tokens' and (cfg.vocab_size <= 0 or cfg.max_text_len <= 0):
      raise ValueError('model.text="tokens" needs model.vocab_size and model.max_text_len > 0.')
    self.text_encoder = TokenTextEncoder(
        cfg.vocab_size, cfg.max_text_len, cfg.mmdit.context_dim, cfg.mmdit.pooled_dim,
        rngs=rngs, param_dtype=jnp.dtype(cfg.mmdit.param_dtype)) if cfg.text == 'tokens' else None

  def encode_text(self, cond: dict) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    if self.text_encoder is not None:
      txt, pooled = self.text_encoder(cond['tokens'], cond['mask'])
      return txt, pooled, cond['mask']
    missing = {'txt', 'pooled'} - set(cond)
    if missing:
      raise ValueError(f'external text conditioning needs keys {sorted(missing)} in cond.')
    return cond['txt'], cond['pooled'], cond.get('mask')

  def __call__(self, x: jax.Array, sigma: jax.Array, cond: dict,
               guidance: jax.Array | None = None) -> jax.Array:
    video = x.ndim == 5
    x5 = x if video else x[:, None]
    b, f, h, w, c = x5.shape
    if c != self.cfg.latent_channels:
      raise ValueError(f'latent has {c} channels, the model expects {self.cfg.latent_channels}.')
    p = self.cfg.patch_size
    tokens = pack(x5, p)
    img_ids = image_position_ids(b, f, h // p, w // p)
    txt, pooled, mask = self.encode_text(cond)
    txt_ids = jnp.zeros((b, txt.shape[1], 3), jnp.float32)
    t = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,)) * self.cfg.timestep_scale
    out = self.transformer(tokens, img_ids, txt, txt_ids, t, pooled, guidance, mask)
    v = unpack(out, f, h, w, c, p)
    return v if video else v[:, 0]
