"""The digits family: the embedded default's pixel-space MMDiT (16×16×1, identity codec),
conditioned on token ids through its own text encoder (`config.model.text = 'tokens'`)."""

from __future__ import annotations

from rewarddance_jax.families.base import Family, Guidance
from rewarddance_jax.models.generator import Generator, generator_config

LATENT_SHAPE = (16, 16, 1)


def model_config(model: dict):
  cfg = generator_config(model)
  if cfg.text != 'tokens':
    raise ValueError('config.family=digits needs config.model.text="tokens" (its own text '
                     'encoder); an external-text MMDiT is family flux.')
  return cfg


FAMILY = Family(
    name='digits', conditioning='tokens', default_guidance=Guidance(),
    guidance_kinds=('none', 'cfg'), model_config=model_config,
    make_model=lambda cfg, rngs: Generator(cfg, rngs=rngs), default_latent_shape=LATENT_SHAPE)
