"""R0 on FLUX.1-dev: a 4-step generator by regularised maximisation of an InternVL P("yes")
reward (docs/algorithms.md §8; the data path of GRPO on FLUX, `configs/flux/grpo_flux_dev.py`).

  python -m launch.encode_prompts --family=flux --pipeline=/models/FLUX.1-dev \\
      --prompts=prompts.jsonl --out=/data/flux_prompts
  python -m launch.train --config=configs/flux/r0_flux_dev.py:src=/models/FLUX.1-dev,\\
prompts=/data/flux_prompts,reward_path=/models/InternVL3-8B --workdir=/runs/r0_flux

Options after the colon: src (diffusers FLUX directory or pipeline root: transformer/ and vae/),
prompts (the encode_prompts output), reward=vlm_yes|mean_intensity|thurstone|process,
reward_path (a transformers InternVL directory or a saved VLM reward; a latent reward run's
workdir), res=720|1024, steps, lr, l2 (λ of ‖θ − θ0‖²), cap (maximise min(reward, cap); 0 = no
cap), cache_dir (converted-weights cache).

Settings: K = 4 DDIM-η steps (η ~ U(0, 1) per step), full backpropagation through the K steps
with each step rematerialised, per-reward gradient normalisation, fp32 params and AdamW state,
bf16 compute, scanned blocks with full remat; 8 prompts per step; guidance 3.5 (FLUX.1-dev's
distilled guidance input). The reward sees the VAE decode of x̂0 (one 448² tile for InternVL).
"""

import ml_collections

from configs.flux.common import add_flux_data
from rewarddance_jax.config_lib import parse_arg
from rewarddance_jax.parallel.sharding import DEFAULT_RULES


def get_config(arg=None):
  arg = parse_arg(arg, res=720, steps=0, src='', prompts='', cache_dir='', reward='vlm_yes',
                  reward_path='', lr=1e-6, l2=1e-2, cap=0.0)
  c = ml_collections.ConfigDict()
  c.trainer = 'r0'
  c.seed = 0
  c.total_steps = arg.steps or 1000
  c.log_every = 1
  c.max_nonfinite = 10
  add_flux_data(c, arg, batch_size=8)
  c.r0 = dict(num_steps=4, schedule='shift', shift=3.0, eta_max=1.0, l2_weight=arg.l2,
              norm_eps=1e-8, reward_cap=arg.cap, plus=False, remat=True,
              ema_decay=0.0)
  c.optax = dict(lr=arg.lr, schedule='constant', warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.0, grad_clip=1.0)
  c.sampler = dict(kind='ode', schedule='shift', num_steps=4, shift=3.0, noise_level=0.0)
  c.samples = dict(every=0, per_class=0)
  c.mesh = dict(axes=('data', 'fsdp', 'tensor'), ici=(1, -1, 1), dcn=(1, 1, 1), num_devices=0)
  c.sharding_rules = DEFAULT_RULES
  c.ckpt = dict(every=50, keep=2, async_save=True)
  c.resume_with_changes = False
  return c
