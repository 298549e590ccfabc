"""Named generator sizes; a config starts from one and overrides fields.

`tiny` is for unit tests, `digits` the embedded default (16×16×1 pixels, patch 4 → 16 tokens,
sized for two CPU cores), `flux-bench` the benchmark model (0.95B, the shared PyTorch peer's
config), `flux-dev` the FLUX.1-dev architecture (11.9B).
"""

from __future__ import annotations

import copy

_DIGITS_TEXT = dict(text='tokens', vocab_size=128, max_text_len=16)
_FLUX = dict(latent_channels=16, patch_size=2, head_dim=128, mlp_ratio=4.0, context_dim=4096,
             pooled_dim=768, axes_dims=(16, 56, 56), guidance_embed=True, text='external')

MODEL_PRESETS = {
    'tiny': dict(latent_channels=1, patch_size=4, num_heads=2, head_dim=16, depth_double=1,
                 depth_single=1, mlp_ratio=2.0, context_dim=32, pooled_dim=32,
                 axes_dims=(4, 6, 6), **_DIGITS_TEXT),
    'digits': dict(latent_channels=1, patch_size=4, num_heads=4, head_dim=16, depth_double=2,
                   depth_single=1, mlp_ratio=4.0, context_dim=64, pooled_dim=64,
                   axes_dims=(4, 6, 6), **_DIGITS_TEXT),
    'flux-bench': dict(num_heads=12, depth_double=6, depth_single=12, **_FLUX),
    'flux-dev': dict(num_heads=24, depth_double=19, depth_single=38, **_FLUX),
}


def model_preset(name: str, **overrides) -> dict:
  """A fresh dict of the preset's fields with `overrides` applied."""
  if name not in MODEL_PRESETS:
    raise ValueError(f'unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}.')
  out = copy.deepcopy(MODEL_PRESETS[name])
  out.update(overrides)
  out['name'] = name
  return out
