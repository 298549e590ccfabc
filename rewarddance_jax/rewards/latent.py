"""The latent rewards of a `latent_reward` run (train/latent_reward.py): model pieces and loading.

`make_backbone(config)`: the generator's first `config.reward.num_blocks` blocks with the reward's
LoRA (models/backbone.py); `head_config` / `head_factory`: the Thurstone (rewards/thurstone.py) or
PAVRM (rewards/process.py) head of `config.reward.kind`; `load_reward(workdir)`: the run's newest
checkpoint as a `Reward` (rewards/base.py), what `config.rewards` kinds 'thurstone' and 'process'
build (rewards/registry.py).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from rewarddance_jax import checkpoint as ckpt_lib
from rewarddance_jax.models.backbone import Backbone
from rewarddance_jax.models.generator import Generator, generator_config
from rewarddance_jax.nn import lora as lora_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.rewards import process as process_lib
from rewarddance_jax.rewards import thurstone as thurstone_lib


def make_backbone(config) -> Backbone:
  r = config.reward
  return Backbone(generator_config(config.model), num_blocks=int(r.num_blocks),
                  layers=tuple(int(l) for l in r.layers), lora_rank=int(r.lora_rank),
                  lora_alpha=float(r.lora_alpha),
                  lora_targets=str(r.get('lora_targets', lora_lib.ATTENTION_TARGETS)))


def head_config(config, backbone: Backbone):
  head = dict(config.reward.get('head', {}))
  if config.reward.kind == 'thurstone':
    return thurstone_lib.head_config(backbone, **head)
  return process_lib.head_config(backbone, **head)


def head_factory(config, hcfg, seed: int):
  if config.reward.kind == 'thurstone':
    return lambda: thurstone_lib.ThurstoneHead(hcfg, rngs=nnx.Rngs(seed))
  return lambda: process_lib.PAVRMHead(hcfg, rngs=nnx.Rngs(seed))


def load_reward(workdir: str, *, sigmas=None, output: str = 'sigmoid', name: str | None = None,
                mesh=None, rules=None):
  """The trained reward of a `latent_reward` run as a `Reward` (rewards/base.py), on `mesh`.

  Thurstone: reads samples['latents'], `sigmas` = noise levels (default (0.4,); several levels =
  the ensemble). Process: reads samples['noisy_latents'] + 'sigma'; `output` 'sigmoid' | 'logit'.
  The reward's params are its own frozen tree (base blocks + LoRA + head) from the checkpoint.
  """
  with ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False) as c:
    step = c.latest_step()
    if step is None:
      raise FileNotFoundError(f'{workdir} has no reward checkpoint.')
    config = ml_collections.ConfigDict(c.restore(step, json=('config',))['config'])
  if mesh is None:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                             ('data', 'fsdp', 'tensor'))
  rules = rules or sharding_lib.rules_from_config(config.sharding_rules)
  backbone = make_backbone(config)
  gen_cfg = backbone.gen_cfg
  _, (gen_abs,) = sharding_lib.abstract_state(lambda: Generator(gen_cfg, rngs=nnx.Rngs(0)), mesh,
                                              rules)
  base_shard = backbone.take(nnx.to_pure_dict(sharding_lib.state_shardings(gen_abs, mesh, rules)))
  base_abs = jax.eval_shape(backbone.take, nnx.to_pure_dict(gen_abs))
  head_gd, (head_abs,) = sharding_lib.abstract_state(
      head_factory(config, head_config(config, backbone), 0), mesh, rules)
  head_shard = nnx.to_pure_dict(sharding_lib.state_shardings(head_abs, mesh, rules))
  lora_abs = jax.eval_shape(lambda b: backbone.init_lora(b, jax.random.key(0)), base_abs)
  targets = {'params': ckpt_lib.abstract_like(
                 {'lora': lora_abs, 'head': nnx.to_pure_dict(head_abs)},
                 {'lora': backbone.lora_shardings(lora_abs, base_shard), 'head': head_shard}),
             'base': ckpt_lib.abstract_like(base_abs, base_shard)}
  with ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False) as c:
    restored = c.restore(step, arrays=targets)
  params, base = restored['params'], restored['base']
  if config.reward.kind == 'thurstone':
    return thurstone_lib.thurstone_reward(backbone, head_gd, base, params,
                                          sigmas=tuple(sigmas or (0.4,)),
                                          name=name or 'thurstone')
  return process_lib.process_reward(backbone, head_gd, base, params, output=output,
                                    name=name or 'pavrm')
