"""The main job: the digits alignment pipeline, every stage for real on tiny models.

  python -m launch.train --config=configs/digits/pipeline.py --workdir=runs/digits
  python -m launch.train --config=configs/digits/pipeline.py:seed=1 --workdir=runs/digits_seed1

Stages (each in WORKDIR/<stage>, skipped when finished, resumed when interrupted):
  base        flow-matching pretraining with a short, fixed budget (an under-trained base);
  reward_vlm  the RewardDance VLM reward (tiny InternVL) trained from scratch on real digits;
  grpo_vlm    GRPO of a copy of the base with the VLM reward (P("yes"), pointwise);
then the evaluation: judge accuracy, reward mean/std, best-of-N and Search over Paths at equal
model calls, sample grids and curves → WORKDIR/report.md.
"""

import ml_collections

from rewarddance_jax.config_lib import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, seed=0, base_steps=450, rm_steps=800, grpo_steps=120, smoke=False)
  # smoke: every stage on the tiny runlocal configs (a minute or two; for tests).
  local = 'runlocal,' if arg.smoke else ''
  if arg.smoke:
    arg.base_steps, arg.rm_steps, arg.grpo_steps = 4, 4, 2
  c = ml_collections.ConfigDict()
  c.trainer = 'pipeline'
  c.seed = arg.seed
  no_samples = {'samples': {'every': 0}}
  c.order = ('base', 'reward_vlm', 'grpo_vlm')
  c.stages = {
      'base': dict(config='configs.digits.flow', arg=f'{local}steps={arg.base_steps}',
                   overrides=dict(no_samples, ckpt={'every': 10_000})),
      'reward_vlm': dict(config='configs.digits.reward_vlm', arg=f'{local}steps={arg.rm_steps}'),
      'grpo_vlm': dict(
          config='configs.digits.grpo', arg=f'{local}init={{base}},steps={arg.grpo_steps}',
          needs=['base', 'reward_vlm'],
          overrides=no_samples,
          replace={'rewards': {'vlm': dict(kind='vlm_yes', path='{reward_vlm}/reward_model',
                                           mode='pointwise', normalization='two_way')}}),
  }
  # The yardstick reward of the report: the trained VLM reward, pointwise.
  c.evaluate = dict(per_class=2 if arg.smoke else 20, sop_n=4, sop_m=2, sop_delta_f=0.1, sop_every=4,
                    reward={'vlm': dict(kind='vlm_yes', path='{reward_vlm}/reward_model',
                                        mode='pointwise', normalization='two_way')})
  return c
