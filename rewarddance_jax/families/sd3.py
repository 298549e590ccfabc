"""The SD3 / SD3.5 family: the SD3 MMDiT (models/sd3.py) on pre-encoded CLIP-L/G + T5 prompts,
classifier-free guidance with a negative prompt, the 16-channel AutoencoderKL; diffusers
weights in and out (weights/sd3.py)."""

from __future__ import annotations

from rewarddance_jax import config_lib
from rewarddance_jax.families.base import Family, Guidance
from rewarddance_jax.models.sd3 import SD3Config, SD3Generator
from rewarddance_jax.weights import sd3 as sd3_weights

# config.model keys that are not SD3Config fields: the preset's name, and the latent-reward
# backbone's `scan_layers` (models/backbone_sd3.py scans runs of blocks; the generator does not).
EXTRA_KEYS = ('name', 'scan_layers')


def model_config(model: dict) -> SD3Config:
  kw = {k: v for k, v in model.items() if k not in EXTRA_KEYS}
  if 'dual_attention_layers' in kw:
    kw['dual_attention_layers'] = tuple(int(i) for i in kw['dual_attention_layers'])
  return config_lib.section(SD3Config, kw, 'config.model (family sd3)')


FAMILY = Family(
    name='sd3', conditioning='encoded', default_guidance=Guidance('cfg', 4.5),
    guidance_kinds=('none', 'cfg'), model_config=model_config,
    make_model=lambda cfg, rngs: SD3Generator(cfg, rngs=rngs), load=sd3_weights.load,
    load_config=lambda src, **kw: sd3_weights.spec(src, **kw).cfg, export=sd3_weights.export)
