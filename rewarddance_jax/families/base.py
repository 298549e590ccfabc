"""What a generator family is, and the parts every family shares.

A `Family` (one per module: digits.py, flux.py, sd3.py) says how to
  1. build its generator from `config.model` (a preset: `model_config` + `make_model`) or load
     it from a diffusers directory (`load`; `export` writes it back);
  2. condition it: 'tokens' (token ids through the generator's own text encoder) or 'encoded'
     (the T5/CLIP outputs `launch.encode_prompts` wrote, `txt`/`pooled`/`mask`);
  3. guide it (`Guidance`): none, the distilled guidance scalar (FLUX.1-dev), or classifier-free
     guidance v = v_u + s·(v_c − v_u) with a negative prompt (SD3.5);
  4. map latents to pixels and back (`Codec`): the identity for pixel-space generators, the
     AutoencoderKL with its scale and shift otherwise.
`GeneratorFamily` (families/registry.py) resolves those against one run's config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rewarddance_jax.models.backbone import COND_KEYS

GUIDANCE_KINDS = ('none', 'distilled', 'cfg')
CONDITIONINGS = ('tokens', 'encoded')
NEGATIVE = 'neg_'   # batch keys neg_<cond key>: the negative prompt of CFG, one per row


@dataclasses.dataclass(frozen=True)
class Guidance:
  """`config.guidance`: kind (GUIDANCE_KINDS), scale, and for 'cfg' the negative prompt (text
  for token conditioning; an encoded-prompts directory for encoded conditioning, default
  `<config.data.encoded_prompts>/negative`)."""
  kind: str = 'none'
  scale: float = 0.0
  negative: str = ''
  RANGES = {'scale': '[0, inf)'}

  def __post_init__(self):
    if self.kind not in GUIDANCE_KINDS:
      raise ValueError(f'config.guidance.kind={self.kind!r} is not one of {GUIDANCE_KINDS}.')
    if self.kind != 'none' and not self.scale > 0:
      raise ValueError(f'config.guidance.scale={self.scale} must be > 0 for kind={self.kind!r}.')


@dataclasses.dataclass(frozen=True)
class Codec:
  """Latents ⇄ pixels in [0, 1]. `decode(latents, params)` / `encode(pixels, params)` are pure
  (differentiable) functions of the codec's params, passed as a sharded const; `params` holds
  them (None for the identity)."""
  decode: Callable[[jax.Array, Any], jax.Array]
  encode: Callable[[jax.Array, Any], jax.Array]
  params: Any = None
  name: str = 'identity'


def unit_decode(latents: jax.Array, params=None) -> jax.Array:
  """The identity codec: model space [−1, 1] → pixels [0, 1]."""
  del params
  return jnp.clip((latents + 1.0) * 0.5, 0.0, 1.0)


def unit_encode(pixels: jax.Array, params=None) -> jax.Array:
  del params
  return pixels * 2.0 - 1.0


IDENTITY_CODEC = Codec(decode=unit_decode, encode=unit_encode)


def vae_codec(graphdef, params, name: str = 'vae') -> Codec:
  """The AutoencoderKL codec: decode_latents / encode_latents (mean, scaled and shifted)."""

  def decode(latents, p):
    return unit_decode(nnx.merge(graphdef, p).decode_latents(latents))

  def encode(pixels, p):
    return nnx.merge(graphdef, p).encode_latents(unit_encode(pixels))

  return Codec(decode=decode, encode=encode, params=params, name=name)


@dataclasses.dataclass(frozen=True)
class Family:
  """A generator family (module docstring). `load(src, mesh, rules, cache_dir=, progress=,
  **runtime overrides) -> (graphdef, params, model cfg)`; `export(params, cfg, out_dir)`."""
  name: str
  conditioning: str
  default_guidance: Guidance
  guidance_kinds: tuple[str, ...]
  model_config: Callable[[dict], Any]
  make_model: Callable[[Any, nnx.Rngs], nnx.Module]
  load: Callable | None = None
  load_config: Callable | None = None   # (src, **runtime overrides) -> model cfg, no weights
  export: Callable | None = None
  default_latent_shape: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.conditioning not in CONDITIONINGS:
      raise ValueError(f'family {self.name}: conditioning {self.conditioning!r} is not one of '
                       f'{CONDITIONINGS}.')


def cond_from_batch(batch: dict) -> dict:
  """The generator's conditioning arrays of a batch: token ids or external embeddings, and the
  negative prompt's (`neg_*`) when the batch carries one (CFG)."""
  keys = COND_KEYS + tuple(NEGATIVE + k for k in COND_KEYS)
  return {k: batch[k] for k in keys if k in batch}


def split_negative(cond: dict) -> tuple[dict, dict]:
  """(positive cond, negative cond) of `cond_from_batch`'s output."""
  pos = {k: v for k, v in cond.items() if not k.startswith(NEGATIVE)}
  neg = {k[len(NEGATIVE):]: v for k, v in cond.items() if k.startswith(NEGATIVE)}
  return pos, neg


def guided_velocity(graphdef, guidance: Guidance):
  """`velocity(params, x, σ (B,), cond) -> v` of the guided generator.

  'distilled' feeds the scale as the guidance input; 'cfg' runs the conditional and the
  negative rows as one batch of 2B and returns v_u + s·(v_c − v_u) (Ho & Salimans 2022)."""

  def velocity(params, x, sigma, cond):
    model = nnx.merge(graphdef, params)
    pos, neg = split_negative(cond)
    b = x.shape[0]
    if guidance.kind == 'distilled':
      return model(x, sigma, pos, jnp.full((b,), guidance.scale, jnp.float32))
    if guidance.kind == 'cfg':
      if set(neg) != set(pos):
        raise ValueError(f'classifier-free guidance needs the negative prompt in the batch '
                         f'({sorted(NEGATIVE + k for k in pos)}); got {sorted(cond)}.')
      both = {k: jnp.concatenate([pos[k], neg[k]], axis=0) for k in pos}
      sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,))
      v = model(jnp.concatenate([x, x], axis=0), jnp.concatenate([sigma, sigma]), both)
      v_c, v_u = v[:b], v[b:]
      return v_u + jnp.float32(guidance.scale) * (v_c - v_u)
    return model(x, sigma, pos)

  return velocity
