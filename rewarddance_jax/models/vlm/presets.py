"""Named InternVL sizes for reward models; a config starts from one and overrides fields.

The real-size presets follow the public InternVL3 checkpoints (OpenGVLab/InternVL3-2B and -8B,
config.json; InternVL3 report, arXiv:2504.10479 §2): vision InternViT-300M-448px (24 layers,
width 1024, 16 heads, MLP 4096, 448² tiles of 14² patches, qkv bias, LayerNorm, no qk norm),
pixel shuffle 0.5 (256 tokens per tile), and a Qwen2.5 language model with InternVL3's
151674-token vocabulary:
  internvl3-2b: Qwen2.5-1.5B — 28 layers, width 1536, 12 heads / 2 KV heads, MLP 8960 (≈2.1B).
  internvl3-8b: Qwen2.5-7B  — 28 layers, width 3584, 28 heads / 4 KV heads, MLP 18944 (≈8.1B).
Both keep separate input embeddings and LM head (the conservative, larger choice for memory
scans). `tiny` is a unit-test size. `vlm_preset(name, **overrides)` returns a fresh dict for
`config.vlm` (read by `models.vlm.config.vlm_config`).
"""

from __future__ import annotations

import copy

_INTERN_VIT_300M = dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                        image_size=448, patch_size=14, qkv_bias=True, qk_norm=False,
                        norm_type='layer_norm')
_INTERNVL3_TEXT = dict(vocab_size=151674, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False)

VLM_PRESETS = {
    'tiny': dict(
        vision=dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                    image_size=16, patch_size=4),
        text=dict(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                  intermediate_size=64, rope_theta=10000.0, tie_word_embeddings=True),
        downsample_ratio=0.5, image_token_id=63),
    'internvl3-2b': dict(
        vision=_INTERN_VIT_300M,
        text=dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                  intermediate_size=8960, **_INTERNVL3_TEXT),
        downsample_ratio=0.5, image_token_id=151667),
    'internvl3-8b': dict(
        vision=_INTERN_VIT_300M,
        text=dict(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                  intermediate_size=18944, **_INTERNVL3_TEXT),
        downsample_ratio=0.5, image_token_id=151667),
}


def vlm_preset(name: str, **overrides) -> dict:
  """A fresh `config.vlm` dict of the preset with top-level `overrides` (e.g. dtype, remat)."""
  if name not in VLM_PRESETS:
    raise ValueError(f'unknown VLM preset {name!r}; choose one of {sorted(VLM_PRESETS)}.')
  out = copy.deepcopy(VLM_PRESETS[name])
  out.update(overrides)
  return out
