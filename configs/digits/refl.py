"""ReFL alignment of the digits generator (RewardDance's RL stage, docs/algorithms.md §7, §10 #18).

Launch (after pretraining a base with configs/digits/flow.py):
  python -m launch.train --config=configs/digits/refl.py:init=/tmp/digits_flow --workdir=/tmp/refl
  python -m launch.train --config=configs/digits/refl.py:runlocal --workdir=/tmp/smoke
With the trained VLM reward (configs/digits/reward_vlm.py), pairwise against a best-of-N reference:
  ...refl.py:init=/tmp/digits_flow,reward=vlm_yes,reward_path=/tmp/digits_rm/reward_model
Options after the colon: init=<base workdir>, steps=<steps>, reward=<reward kind>,
reward_path=<VLM reward dir>, mode=pairwise|pointwise (vlm_yes), lr=<lr>, fm_weight=<w>,
scale=<λ of the linear ReFL loss>, native=<n: the VLM reward sees images projected to n×n
(`vlm_yes.native_projection`; 8 for the digits)>, runlocal.
"""

import ml_collections

from configs.digits.common import add_runtime
from rewarddance_jax.config_lib import parse_arg
from rewarddance_jax.models.presets import model_preset


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, init='', steps=0, reward='digit_prototype', reward_path='',
                  mode='pairwise', lr=1e-3, fm_weight=1.0, scale=5.0, model='digits', native=0)
  c = ml_collections.ConfigDict()
  c.trainer = 'refl'
  c.seed = 0
  c.total_steps = arg.steps or (4 if arg.runlocal else 100)
  c.log_every = 10
  c.max_nonfinite = 10

  c.model = model_preset(arg.model)
  c.init = dict(generator=arg.init, use_ema=False)
  c.data = dict(batch_size=32, max_text_len=8)
  # The judge's sampler grid (20 linear Euler steps); the gradient step is in the last 25%.
  # scale 5, not docs/algorithms.md §10 #18's 1e-3: the prototype reward is a small MSE next to
  # the FM term (docs/digits_pipeline.md).
  c.refl = dict(num_steps=20, schedule='linear', shift=1.0, late_fraction=0.25, loss='linear',
                scale=arg.scale, target=2.0, fm_weight=arg.fm_weight, ema_decay=0.0,
                reference_n=16, reference_top=2)
  if arg.reward == 'vlm_yes':
    if not arg.reward_path:
      raise ValueError('reward=vlm_yes needs reward_path=<dir of a saved VLM reward>.')
    c.rewards = {'vlm_yes': dict(weight=1.0, path=arg.reward_path, mode=arg.mode,
                                 normalization='two_way', prompts='digits', ref_images='',
                                 native_size=arg.native)}
  else:
    c.rewards = {arg.reward: dict(weight=1.0)}
  c.optax = dict(lr=arg.lr, schedule='constant', warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=0.0, grad_clip=1.0)
  add_runtime(c, samples_every=2 if arg.runlocal else 50, ckpt_every=2 if arg.runlocal else 100,
              runlocal=arg.runlocal)
  if arg.runlocal:
    c.log_every = 1
    c.model = model_preset('tiny')
    c.data.batch_size = 8
    c.refl.num_steps = 4
    c.refl.reference_n = 3
  return c
