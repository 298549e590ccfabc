"""PAVRM process reward (PRFL) on the digits generator's own noisy latents (issue 5).

Launch (after a base generator run, e.g. configs/digits/flow.py:steps=600 in /tmp/latent_base):
  python -m launch.train --config=configs/digits/reward_process.py \
      --config.reward.base_workdir=/tmp/latent_base --workdir=/tmp/reward_process
  python -m launch.train --config=configs/digits/reward_process.py:runlocal --workdir=/tmp/smoke
The held-out per-σ accuracy table lands in <workdir>/eval/accuracy_<step>.json;
`rewards.latent.load_reward(workdir, sigmas=...)` turns the run into a `Reward`.
"""

import ml_collections

from rewarddance_jax.config_lib import parse_arg
from rewarddance_jax.models.presets import model_preset
from rewarddance_jax.nn.lora import BLOCK_TARGETS
from rewarddance_jax.parallel.sharding import DEFAULT_RULES


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, steps=0, base='')
  steps = arg.steps or (10 if arg.runlocal else 600)
  c = ml_collections.ConfigDict()
  c.trainer = 'latent_reward'
  c.seed = 0
  c.total_steps = steps
  c.log_every = 50
  c.max_nonfinite = 10

  # The generator architecture; it must equal the model section saved in base_workdir.
  c.model = model_preset('digits')
  c.reward = dict(
      kind='process',
      base_workdir=arg.base,          # generator run dir (checkpoints/, tokenizer.json); '' = fresh
      base_item='params',
      num_blocks=3, layers=(3,),       # features after the last block (PRFL: after block 8)
      # LoRA on attention and MLP kernels (PRFL tunes blocks 0-7 fully; a LoRA here).
      lora_rank=8, lora_alpha=16.0, lora_targets=BLOCK_TARGETS,
      loss='bce',                      # bce | siamese_bt
      head=dict(num_heads=4, hidden=(64, 32)),  # PRFL: 8 heads, (1024, 512) at W = 5120
      sigma_sampler='uniform', shift=1.0)   # PRFL code: the shift-5 grid; uniform for the digits
  c.pairs = dict(source='digits', batch_size=32, max_text_len=8, kinds=('prompt', 'clean'))
  c.eval = dict(every=600, num_pairs=1000, sigmas=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
                                                   0.9))
  c.optax = dict(lr=1e-3, schedule='cosine', warmup_steps=100, decay_steps=steps,
                 end_lr_fraction=0.05, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4,
                 grad_clip=1.0)

  c.mesh = dict(axes=('data', 'fsdp', 'tensor'), ici=(1, -1, 1), dcn=(1, 1, 1), num_devices=0)
  c.sharding_rules = DEFAULT_RULES
  c.ckpt = dict(every=600, keep=2, async_save=True)
  c.resume_with_changes = False

  if arg.runlocal:
    c.log_every = 2
    c.model = model_preset('tiny')
    c.reward.num_blocks, c.reward.layers = 2, (2,)
    c.pairs.batch_size = 8
    c.eval = dict(every=5, num_pairs=16, sigmas=(0.2, 0.5))
    c.ckpt.every = 5
  return c
