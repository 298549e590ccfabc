"""Trainers on one shared loop; `get_trainer(name)` imports the one a config names."""

import importlib

TRAINERS = {
    'flow': 'rewarddance_jax.train.flow',
    'grpo': 'rewarddance_jax.train.grpo',
    'vlm_reward': 'rewarddance_jax.train.vlm_reward',
    'latent_reward': 'rewarddance_jax.train.latent_reward',
    'prfl': 'rewarddance_jax.train.prfl',
    'pipeline': 'rewarddance_jax.train.pipeline',
    'refl': 'rewarddance_jax.train.refl',
    'r0': 'rewarddance_jax.train.r0',
}


def get_trainer(name):
  if name not in TRAINERS:
    raise ValueError(f'config.trainer={name!r} is not one of {sorted(TRAINERS)}.')
  return importlib.import_module(TRAINERS[name]).train
