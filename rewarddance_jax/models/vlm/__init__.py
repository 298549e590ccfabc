"""InternVL-style VLM (InternViT + pixel shuffle + MLP projector + Qwen2) in Flax NNX."""

from rewarddance_jax.models.vlm.config import (TextConfig, VisionConfig, VLMConfig, from_hf_dict,
                                               vlm_config)
from rewarddance_jax.models.vlm.model import InternVL, check_placeholders, pixel_shuffle
from rewarddance_jax.models.vlm.presets import VLM_PRESETS, vlm_preset
