"""R0 regularised reward maximisation of the digits generator: a 4-step generator initialised from
the pretrained one, trained from prompts only (docs/algorithms.md §8, §10 #27).

Launch (after pretraining a base with configs/digits/flow.py):
  python -m launch.train --config=configs/digits/r0.py:init=/tmp/digits_flow --workdir=/tmp/r0
  python -m launch.train --config=configs/digits/r0.py:runlocal --workdir=/tmp/smoke
With the trained pointwise VLM reward (configs/digits/reward_vlm.py):
  ...r0.py:init=/tmp/digits_flow,reward=vlm_yes,reward_path=/tmp/digits_rm/reward_model
Options after the colon: init=<base workdir>, steps=<steps>, reward=<reward kind> (several joined
by '+', e.g. digit_prototype+mean_intensity, each normalised separately), reward_path=<VLM reward
dir>, native=<n: the VLM reward sees images projected to n×n; 8 for the digits>, lr=<lr>,
l2=<λ>, cap=<τ: maximise min(reward, τ), so saturated samples are not pushed further; 0 = no
cap>, plus (R0+), runlocal.
"""

import ml_collections

from configs.digits.common import add_runtime
from rewarddance_jax.config_lib import parse_arg
from rewarddance_jax.models.presets import model_preset


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, init='', steps=0, reward='digit_prototype', reward_path='',
                  lr=3e-4, l2=1e-2, plus=False, model='digits', native=0, cap=0.0)
  c = ml_collections.ConfigDict()
  c.trainer = 'r0'
  c.seed = 0
  c.total_steps = arg.steps or (4 if arg.runlocal else 100)
  c.log_every = 10
  c.max_nonfinite = 10

  c.model = model_preset(arg.model)
  c.init = dict(generator=arg.init, use_ema=False)
  c.data = dict(batch_size=32, max_text_len=8, prompts='')
  c.r0 = dict(num_steps=4, schedule='linear', shift=1.0, eta_max=1.0, l2_weight=arg.l2,
              norm_eps=1e-8, reward_cap=arg.cap, plus=arg.plus, remat=True,
              ema_decay=0.0)
  c.rewards = {}
  for kind in arg.reward.split('+'):
    if kind == 'vlm_yes':
      if not arg.reward_path:
        raise ValueError('reward=vlm_yes needs reward_path=<dir of a saved VLM reward>.')
      c.rewards[kind] = dict(weight=1.0, path=arg.reward_path, mode='pointwise',
                             normalization='two_way', prompts='digits', native_size=arg.native)
    else:
      c.rewards[kind] = dict(weight=1.0)
  c.optax = dict(lr=arg.lr, schedule='constant', warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.0, grad_clip=1.0)
  add_runtime(c, samples_every=2 if arg.runlocal else 50, ckpt_every=2 if arg.runlocal else 100,
              runlocal=arg.runlocal)
  # The judge samples with the trained 4-step generator (DDIM with η = 0 is the Euler step).
  c.sampler.num_steps = c.r0.num_steps
  if arg.runlocal:
    c.log_every = 1
    c.model = model_preset('tiny')
    c.data.batch_size = 8
  return c
