"""Flow-matching pretraining of the digits generator (the embedded default's first stage).

Launch:
  python -m launch.train --config=configs/digits/flow.py --workdir=/tmp/digits_flow
  python -m launch.train --config=configs/digits/flow.py:runlocal --workdir=/tmp/smoke
  python -m launch.train --config=configs/digits/flow.py --config.total_steps=500 --workdir=...
Then:
  python -m launch.evaluate --samples=/tmp/digits_flow/samples/samples_<last>.npz
"""

import ml_collections

from configs.digits.common import add_runtime
from rewarddance_jax.config_lib import parse_arg
from rewarddance_jax.models.presets import model_preset


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, model='digits', steps=0)
  steps = arg.steps or (20 if arg.runlocal else 2000)
  c = ml_collections.ConfigDict()
  c.trainer = 'flow'
  c.seed = 0
  c.total_steps = steps
  c.log_every = 50
  c.max_nonfinite = 10
  c.ema_decay = 0.0

  c.model = model_preset(arg.model)
  c.data = dict(name='digits', batch_size=64, max_text_len=8)
  c.flow = dict(sigma_sampler='uniform', shift=1.0)
  c.optax = dict(lr=1e-3, schedule='cosine', warmup_steps=100, decay_steps=steps,
                 end_lr_fraction=0.05, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4,
                 grad_clip=1.0)
  # Sampling for the periodic sample grids (and launch.sample): 20 Euler steps.
  add_runtime(c, samples_every=10 if arg.runlocal else 1000,
              ckpt_every=10 if arg.runlocal else 500, runlocal=arg.runlocal)
  if arg.runlocal:
    c.log_every = 5
    c.model = model_preset('tiny')
    c.data.batch_size = 16
  return c
