"""Sections every digits config shares: judge sampling, mesh, sharding rules, checkpoints."""

from rewarddance_jax.models.presets import model_preset
from rewarddance_jax.parallel.sharding import DEFAULT_RULES


def add_runtime(c, *, samples_every: int, ckpt_every: int, runlocal: bool):
  """Sets c.sampler (20-step Euler for the judge's samples), c.samples, c.mesh (all devices on
  fsdp), c.sharding_rules, c.ckpt and c.resume_with_changes; `runlocal` shrinks them for smoke
  runs."""
  c.sampler = dict(kind='ode', schedule='linear', num_steps=4 if runlocal else 20, shift=1.0,
                   noise_level=0.0)
  c.samples = dict(every=samples_every, per_class=2 if runlocal else 10)
  c.mesh = dict(axes=('data', 'fsdp', 'tensor'), ici=(1, -1, 1), dcn=(1, 1, 1), num_devices=0)
  c.sharding_rules = DEFAULT_RULES
  c.ckpt = dict(every=ckpt_every, keep=2, async_save=True)
  c.resume_with_changes = False   # True: a resume may change keys other than the loop's
  return c


def add_alignment(c, *, lr: float, steps: int, runlocal: bool):
  """Sections every digits alignment config shares: AdamW at a constant lr (docs/algorithms.md
  §10 #29), judge samples and checkpoints every 50/100 steps, and the tiny runlocal variant."""
  c.total_steps = steps or (4 if runlocal else c.total_steps)
  c.optax = dict(lr=lr, schedule='constant', warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                 weight_decay=1e-4, grad_clip=1.0)
  add_runtime(c, samples_every=2 if runlocal else 50, ckpt_every=2 if runlocal else 100,
              runlocal=runlocal)
  if runlocal:
    c.log_every = 1
    c.model = model_preset('tiny')
    c.data.batch_size = 8
  return c
