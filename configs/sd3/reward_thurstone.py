"""DiNa-LRM Thurstone latent reward on SD3.5-medium at real size (issue 8, item 2).

Scan its layouts for a TPU pod on a CPU host (docs/scaling.md has the tables):
  python -m launch.scan_sharding --config=configs/sd3/reward_thurstone.py --topology=v5p:4x4x4 \
      --step=latent_reward --layouts="1,-1,1:full:scan"
  python -m launch.scan_sharding --config=configs/sd3/reward_thurstone.py --topology=v6e:8x8 \
      --step=latent_reward

  1. Backbone: the SD3.5-medium MMDiT (`models/sd3.py`, family 'sd3': 24 joint blocks, 24 heads ×
     64 = 1536 wide, dual attention in blocks 0-12, RMS q/k norm; 2.47B), cut to its first 12
     blocks (1.22B + embedders) with features after blocks 4, 8, 12 (`models/backbone_sd3.py`),
     fp32 frozen base, bf16 compute, full remat per block; with `scan` layouts the blocks between
     recorded layers run as one lax.scan each (three scans of four dual-attention blocks).
  2. LoRA r = 64, α = 128 on every attention projection of those blocks (DRM: to_q/k/v, to_out.0,
     add_{q,k,v}_proj, to_add_out; the dual-attention attn2 projections have the same names),
     plus the Thurstone head (F = W/4, 4 queries, 8 heads); only they train
     (docs/algorithms.md §5.2).
  3. Pairs at 1024² (128×128×16 latents, 4096 image tokens) with CLIP-L/G (77) + T5 (128) text
     tokens padded to 256 (4096 + 256 = 4352 = 34·128: the TPU flash-attention kernel applies),
     64 pairs per step (one per chip of a 64-chip slice), AdamW lr 5e-5, wd 0.01, constant
     (docs/algorithms.md §5.3).
  4. `config.layouts`: the default layout per topology (docs/scaling.md has the scans).
The trainer (`train/latent_reward.py`) builds MMDiT backbones only: training this config for real
needs the SD3 base weights wired into its `load_base` (not done; the scanner builds it abstractly).
"""

import ml_collections

from configs.sd3.common import SD35_MEDIUM
from rewarddance_jax.config_lib import parse_arg
from rewarddance_jax.models.backbone_sd3 import SD3_ATTENTION_TARGETS
from rewarddance_jax.parallel.sharding import DEFAULT_RULES

# Candidate layouts scanned by default (launch.scan_sharding --layouts=default).
CANDIDATES = ('1,-1,1:full:scan:latent_reward;2,-1,1:full:scan:latent_reward;'
              '1,-1,1:dots:scan:latent_reward')

# Default layout per topology (docs/scaling.md, "SD3.5-medium DiNa-LRM"): FSDP over all chips,
# blocks scanned (why: same section).
LAYOUTS = {
    'v5p:4x4x4': '1,-1,1:full:scan:latent_reward',
    'v6e:8x8': '1,-1,1:full:scan:latent_reward',
}


def get_config(arg=None):
  arg = parse_arg(arg, steps=0, res=1024)
  if arg.res % 16:
    raise ValueError(f'config arg res={arg.res} must be a multiple of 16 (VAE 8 × patch 2).')
  c = ml_collections.ConfigDict()
  c.trainer = 'latent_reward'
  c.seed = 42
  c.total_steps = arg.steps or 12500   # ≈ 0.8M HPDv3 pairs / 64 per step: one epoch
  c.log_every = 50
  c.max_nonfinite = 10

  c.family = 'sd3'
  c.model = dict(SD35_MEDIUM, dtype='bfloat16', param_dtype='float32', remat='full',
                 attention='auto', scan_layers=True)
  c.reward = dict(
      kind='thurstone', base_workdir='', base_item='params',
      num_blocks=12, layers=(4, 8, 12),
      lora_rank=64, lora_alpha=128.0, lora_targets=SD3_ATTENTION_TARGETS,
      loss='thurstone', head=dict(num_queries=4, num_heads=8),
      sigma_sampler='uniform', shift=1.0, ensemble_sigmas=(0.2, 0.5, 0.7), ensemble_weight=0.0)
  latent = arg.res // 8
  c.pairs = dict(source='jsonl', path='', heldout_path='', batch_size=64, max_text_len=256,
                 latent_shape=(latent, latent, 16))
  c.eval = dict(every=1000, num_pairs=1000, sigmas=(0.3, 0.4, 0.5))
  c.optax = dict(lr=5e-5, schedule='constant', warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.01, grad_clip=1.0)
  c.scan = dict(candidates=CANDIDATES)
  c.layouts = dict(LAYOUTS)
  c.mesh = dict(axes=('data', 'fsdp', 'tensor'), ici=(1, -1, 1), dcn=(1, 1, 1), num_devices=0)
  c.sharding_rules = DEFAULT_RULES
  c.ckpt = dict(every=1000, keep=2, async_save=True)
  c.resume_with_changes = False
  return c
