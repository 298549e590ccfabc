"""GRPO on SD3.5-medium with classifier-free guidance (Flow-GRPO's SD3.5-M column of
docs/algorithms.md §3.7), from public weights.

  python -m launch.encode_prompts --family=sd3 --pipeline=/models/stable-diffusion-3.5-medium \
      --prompts=prompts.jsonl --out=/data/sd3_prompts --negative_prompt=""
  python -m launch.train --config=configs/sd3/grpo_sd35_medium.py:src=/models/stable-diffusion-\
3.5-medium,prompts=/data/sd3_prompts,reward=thurstone,reward_path=/runs/lrm --workdir=/runs/grpo_sd3
Options after the colon: src (a diffusers SD3.5 pipeline root: transformer/ and vae/ are read),
prompts (the encode_prompts output, with negative/), reward = mean_intensity | thurstone |
process | vlm_yes, reward_path, res (pixels, multiple of 16; 512 as Flow-GRPO), cfg (the
guidance scale, 4.5), lora (rank; 0 = full fine-tuning), steps, cache_dir.

  1. Generator: SD3.5-medium (2.5B), fp32 params, bf16 compute, full remat; with lora=R a rank-R
     LoRA (α = 2R) on the attention projections, the base frozen in bf16.
  2. Guidance: v = v_u + 4.5·(v_c − v_u) in the rollout and in the update's log-probs (the
     conditional and negative rows run as one batch of 2B).
  3. GRPO: G = 24, 'flow_grpo' SDE a = 0.7 on the `flow_grpo_sd3` schedule (shift 3), 10 steps,
     trained steps the 'prefix' 0.99, clip 1e-4, KL β 0.04 to the initial policy.
"""

import ml_collections

from configs.sd3.common import add_sd3_data
from rewarddance_jax.config_lib import parse_arg
from rewarddance_jax.models.backbone_sd3 import SD3_ATTENTION_TARGETS
from rewarddance_jax.parallel.sharding import DEFAULT_RULES


def get_config(arg=None):
  arg = parse_arg(arg, src='', prompts='', cache_dir='', reward='mean_intensity', reward_path='',
                  res=512, cfg=4.5, lora=32, steps=0)
  c = ml_collections.ConfigDict()
  c.trainer = 'grpo'
  c.seed = 0
  c.total_steps = arg.steps or 1000
  c.log_every = 1
  c.max_nonfinite = 10
  add_sd3_data(c, arg, batch_size=48)
  c.grpo = dict(
      group_size=24, step_kind='flow_grpo', noise_level=0.7, schedule='flow_grpo_sd3',
      num_steps=10, shift=3.0, selection=dict(kind='prefix', fraction=0.99),
      advantage='flow_grpo', global_std=False, adv_clip=5.0, aggregation='advantage',
      clip_range=1e-4, minibatches=2, kl_beta=0.04, rollout_kl=0.0, same_noise=True,
      ema_decay=0.0, variance_window=1000,
      lora=dict(rank=int(arg.lora), alpha=2.0 * max(int(arg.lora), 1),
                targets=SD3_ATTENTION_TARGETS, base_dtype='bfloat16'))
  c.optax = dict(lr=3e-4 if arg.lora else 1e-5, schedule='constant', warmup_steps=0, b1=0.9,
                 b2=0.999, eps=1e-8, weight_decay=1e-4, grad_clip=1.0)
  c.samples = dict(every=0, per_class=0)
  c.mesh = dict(axes=('data', 'fsdp', 'tensor'), ici=(1, -1, 1), dcn=(1, 1, 1), num_devices=0)
  c.sharding_rules = DEFAULT_RULES
  c.ckpt = dict(every=50, keep=2, async_save=True)
  c.resume_with_changes = False
  return c
