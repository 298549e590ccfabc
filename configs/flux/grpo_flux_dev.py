"""GRPO on FLUX.1-dev at real size, rewarded by an InternVL3 yes-token reward (issue 8, item 2).

Scan its layouts for a TPU pod on a CPU host (docs/scaling.md has the tables):
  python -m launch.scan_sharding --config=configs/flux/grpo_flux_dev.py --topology=v5p:4x4x4
  python -m launch.scan_sharding --config=configs/flux/grpo_flux_dev.py:lora=64 \
      --topology=v5p:4x4x4 --layouts="1,-1,1:full:scan:grpo_update"
  python -m launch.scan_sharding --config=configs/flux/grpo_flux_dev.py:vlm=2b,res=1024 \
      --topology=v6e:8x8 --layouts="1,-1,1:full:scan:grpo_rollout"
Options after the colon: vlm=8b|2b (InternVL3 size), res=720|1024, lora=0|R (LoRA rank; 0 = full).

Train (the data path: public FLUX weights, pre-encoded prompts, the VAE decode before rewards
that read pixels; `train/grpo.py`):
  python -m launch.encode_prompts --family=flux --pipeline=/models/FLUX.1-dev \
      --prompts=prompts.jsonl --out=/data/flux_prompts
  python -m launch.train --config=configs/flux/grpo_flux_dev.py:src=/models/FLUX.1-dev,\
prompts=/data/flux_prompts,reward=thurstone,reward_path=/runs/lrm --workdir=/runs/grpo_flux
  src = a diffusers FLUX directory or pipeline root (its transformer/ and vae/ are read);
  prompts = the encode_prompts output; reward = mean_intensity | thurstone | process (a latent
  reward run's workdir as reward_path), or vlm_yes with reward_path = a transformers InternVL
  directory (e.g. InternVL3-8B, used as it is: P("yes") with its chat template, one 448² tile)
  or a VLM reward saved by the vlm_reward trainer (`rewards/vlm_export.py`); it scores each row
  against its own prompt (a prompt table read from the same prompts directory, indexed by the
  batch's prompt ids).

  1. Generator: the FLUX.1-dev MMDiT (11.9B, `models/presets.py`), fp32 params and AdamW state,
     bf16 compute, scanned blocks, full remat. Full fine-tuning, or with lora=R a rank-R LoRA
     (alpha R) on every block's attention and MLP kernels (`nn/lora.BLOCK_TARGETS`; 269M at
     R = 64), the base frozen in bf16 outside the optimizer (`config.grpo.lora`, as the GRPO
     trainer and the scanner read it, `grpo.lora.base_dtype`).
  2. Resolution: 720² pixels give a 90×90×16 latent, 45×45 = 2025 patches of 2×2. We pad the
     latent to 96×96 (768² pixels): 48×48 = 2304 image tokens + 512 T5 tokens = 2816 = 22·128,
     so both attention lengths are multiples of 128 and the TPU flash-attention kernel applies
     (`nn/attention.py` 'auto'); 2025 + 512 = 2537 would fall back to XLA attention with a
     materialised L² score matrix. res=1024: 128×128 latent, 4096 + 512 = 4608 = 36·128 tokens.
  3. GRPO (DanceGRPO FLUX settings, docs/algorithms.md §3.7): G = 12, 16 prompts per iteration
     (B = 192 rollouts), 16 'dance' SDE steps (η = 0.3, shift 3), 60% of the 15 trainable steps
     trained per sample, M = 3 minibatches (64 rollouts: one per chip on a 64-chip slice),
     guidance 3.5 (FLUX.1-dev's distilled guidance input), clip 1e-4.
  4. Reward (`config.scan.reward`, read by `scan/grpo.py`): x̂0 → FLUX VAE decode
     → one 448² tile → InternVL3-8B (or -2B) → P("yes") at the answer position of a
     384-token prompt. Frozen, fp32 weights sharded like the generator's, bf16 compute.
  5. `config.layouts`: the default layout (MESH:REMAT:scan, for the rollout, reward and update
     steps) per topology for this mode (docs/scaling.md has the tables that chose them).
"""

import ml_collections

from configs.flux.common import add_flux_data
from rewarddance_jax.config_lib import parse_arg
from rewarddance_jax.models.vlm.presets import vlm_preset
from rewarddance_jax.nn.lora import BLOCK_TARGETS
from rewarddance_jax.parallel.sharding import DEFAULT_RULES

VLMS = {'2b': 'internvl3-2b', '8b': 'internvl3-8b'}

# Candidate layouts scanned by default (launch.scan_sharding --layouts=default): the iteration's
# three steps (rollout, reward, update) on one layout; MESH (data, fsdp, tensor):remat:scan:step.
CANDIDATES = ('1,-1,1:full:scan:grpo_rollout;1,-1,1:full:scan:reward;'
              '1,-1,1:full:scan:grpo_update')

# Default layout (MESH:REMAT:scan, for all three steps) per topology and mode; docs/scaling.md has
# the scans that chose them (per-chip peaks, the rejected candidates).
LAYOUTS = {
    'full': {'v5p:4x4x4': '1,-1,1:full:scan', 'v6e:8x8': '1,-1,1:full:scan'},
    'lora': {'v5p:4x4x4': '1,-1,1:full:scan', 'v6e:8x8': '1,-1,1:full:scan'},
}


def get_config(arg=None):
  arg = parse_arg(arg, vlm='8b', res=720, steps=0, lora=0, src='', prompts='', cache_dir='',
                  reward='vlm_yes', reward_path='')
  if arg.vlm not in VLMS:
    raise ValueError(f'config arg vlm={arg.vlm!r}: choose one of {sorted(VLMS)}.')
  c = ml_collections.ConfigDict()
  c.trainer = 'grpo'
  c.seed = 0
  c.total_steps = arg.steps or 300
  c.log_every = 1
  c.max_nonfinite = 10

  add_flux_data(c, arg, batch_size=192)
  # lora=R > 0: the trainable tree is a rank-R LoRA on every block's attention and MLP kernels
  # (alpha = R), the base frozen in bf16 and outside the optimizer (module docstring, item 1).
  lora = dict(rank=int(arg.lora), alpha=float(arg.lora or 1), targets=BLOCK_TARGETS,
              base_dtype='bfloat16')
  c.grpo = dict(
      group_size=12, step_kind='dance', noise_level=0.3, schedule='shift', num_steps=16,
      shift=3.0,
      selection=dict(kind='fraction', fraction=0.6, window=3, window_range=(0, 0),
                     iters_per_group=25, max_start=-1),
      advantage='dance', global_std=False, adv_clip=5.0, aggregation='advantage',
      clip_range=1e-4, minibatches=3, kl_beta=0.0, rollout_kl=0.0, same_noise=True,
      ema_decay=0.0, variance_window=1000, lora=lora)
  c.optax = dict(lr=1e-5, schedule='constant', warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=1e-4, grad_clip=1.0)
  c.scan = dict(
      reward=dict(vlm=vlm_preset(VLMS[arg.vlm], dtype='bfloat16'), vae='', pixel_factor=8,
                  vae_dtype='bfloat16', max_len=384, yes_id=9454, no_id=2152),
      candidates=CANDIDATES)
  c.layouts = dict(LAYOUTS['lora' if arg.lora else 'full'])
  c.mesh = dict(axes=('data', 'fsdp', 'tensor'), ici=(1, -1, 1), dcn=(1, 1, 1), num_devices=0)
  c.sharding_rules = DEFAULT_RULES
  c.ckpt = dict(every=50, keep=2, async_save=True)
  c.resume_with_changes = False
  return c
