"""GRPO alignment of the digits generator (DanceGRPO defaults, scaled to the digits).

Launch (after pretraining a base with configs/digits/flow.py):
  python -m launch.train --config=configs/digits/grpo.py:init=/tmp/digits_flow --workdir=/tmp/grpo
  python -m launch.train --config=configs/digits/grpo.py:runlocal --workdir=/tmp/smoke
Options after the colon: init=<base workdir>, steps=<iterations>, reward=<reward kind>,
selection=fraction|prefix|window|sliding, lora=<rank> (0 = full fine-tuning; alpha = 2·rank,
attention kernels), fm_weight=<w: flow matching on real digits in every update minibatch,
PPO-ptx style; 0 = pure GRPO>, runlocal.
"""

import ml_collections

from configs.digits.common import add_alignment
from rewarddance_jax.nn.lora import ATTENTION_TARGETS
from rewarddance_jax.config_lib import parse_arg
from rewarddance_jax.models.presets import model_preset


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, init='', steps=0, reward='digit_prototype',
                  selection='fraction', model='digits', lora=0, fm_weight=0.0)
  c = ml_collections.ConfigDict()
  c.trainer = 'grpo'
  c.seed = 0
  c.total_steps = arg.steps or (4 if arg.runlocal else 200)
  c.log_every = 10
  c.max_nonfinite = 10

  c.model = model_preset(arg.model)
  c.init = dict(generator=arg.init, use_ema=False)
  # 4 prompts × G = 8 rollouts per iteration.
  c.data = dict(batch_size=32, max_text_len=8, prompts='')
  c.grpo = dict(
      group_size=8, step_kind='dance', noise_level=0.3, schedule='linear', num_steps=10,
      shift=1.0,
      selection=dict(kind=arg.selection, fraction=0.6, window=3, window_range=(0, 0),
                     iters_per_group=25, max_start=-1),
      advantage='dance', global_std=False, adv_clip=5.0, aggregation='advantage',
      clip_range=1e-3, minibatches=2, kl_beta=0.0, rollout_kl=0.0, same_noise=True,
      ema_decay=0.0, variance_window=50, fm_weight=arg.fm_weight,
      # best_of = k > 0: train only each group's k/2 best and k/2 worst rollouts (rl/extremes.py).
      best_of=0,
      lora=dict(rank=arg.lora, alpha=2.0 * max(arg.lora, 1), targets=ATTENTION_TARGETS))
  c.rewards = {arg.reward: dict(weight=1.0)}
  add_alignment(c, lr=1e-4, steps=arg.steps, runlocal=arg.runlocal)
  if arg.runlocal:
    c.grpo.group_size = 4
    c.grpo.num_steps = 4
    c.grpo.variance_window = 4
  return c
