"""PRFL on the digits: process reward feedback at any denoising step + flow matching on real data.

Launch (after a base generator and a process reward, configs/digits/reward_process.py):
  python -m launch.train --config=configs/digits/prfl.py:init=/tmp/base,reward_path=/tmp/rp \
      --workdir=/tmp/prfl
  python -m launch.train --config=configs/digits/prfl.py:runlocal --workdir=/tmp/smoke
Without reward_path the reward is the (differentiable) digit-prototype rule.
"""

import ml_collections

from configs.digits.common import add_alignment
from rewarddance_jax.config_lib import parse_arg
from rewarddance_jax.models.presets import model_preset


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, init='', steps=0, reward_path='', model='digits')
  c = ml_collections.ConfigDict()
  c.trainer = 'prfl'
  c.seed = 0
  c.total_steps = arg.steps or (4 if arg.runlocal else 150)
  c.log_every = 10
  c.max_nonfinite = 10
  c.model = model_preset(arg.model)
  c.init = dict(generator=arg.init, use_ema=False)
  c.data = dict(batch_size=32, max_text_len=8)
  # λ = 0.1, w = 1 as PRFL; 10 Euler steps (the GRPO rollout grid) for the no-grad prefix.
  c.prfl = dict(schedule='linear', num_steps=10, shift=1.0, scale=0.1, fm_weight=1.0,
                ema_decay=0.0)
  if arg.reward_path:
    c.rewards = {'process': dict(kind='process', path=arg.reward_path, output='sigmoid')}
  else:
    c.rewards = {'digit_prototype': dict(weight=1.0)}
  add_alignment(c, lr=1e-4, steps=arg.steps, runlocal=arg.runlocal)
  if arg.runlocal:
    c.prfl.num_steps = 4
  return c
