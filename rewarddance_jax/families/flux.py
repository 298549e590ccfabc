"""The FLUX.1 family: the MMDiT with external T5 + CLIP conditioning (pre-encoded prompts),
FLUX.1-dev's distilled guidance scalar, the 16-channel AutoencoderKL; diffusers weights in and
out (weights/flux.py)."""

from __future__ import annotations

from rewarddance_jax.families.base import Family, Guidance
from rewarddance_jax.models.generator import Generator, generator_config
from rewarddance_jax.weights import flux as flux_weights


def model_config(model: dict):
  cfg = generator_config(model)
  if cfg.text != 'external':
    raise ValueError('config.family=flux needs config.model.text="external" (T5/CLIP inputs).')
  return cfg


FAMILY = Family(
    name='flux', conditioning='encoded', default_guidance=Guidance('distilled', 3.5),
    guidance_kinds=('none', 'distilled', 'cfg'), model_config=model_config,
    make_model=lambda cfg, rngs: Generator(cfg, rngs=rngs), load=flux_weights.load,
    load_config=lambda src, **kw: flux_weights.spec(src, **kw).cfg, export=flux_weights.export)
