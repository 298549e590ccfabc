"""The latent rewards of a `latent_reward` run (train/latent_reward.py): model pieces and loading.

`reward_config(config.reward)`: the checked `config.reward` section (`RewardConfig`);
`make_backbone(config)`: the generator's first `config.reward.num_blocks` blocks with the reward's
LoRA (models/backbone.py); `head_config` / `head_factory`: the Thurstone (rewards/thurstone.py) or
PAVRM (rewards/process.py) head of `config.reward.kind`; `load_reward(workdir)`: the run's newest
checkpoint as a `Reward` (rewards/base.py), what `config.rewards` kinds 'thurstone' and 'process'
build (rewards/registry.py).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from rewarddance_jax import checkpoint as ckpt_lib
from rewarddance_jax import config_lib
from rewarddance_jax import families
from rewarddance_jax.models.backbone import Backbone
from rewarddance_jax.models.backbone_sd3 import SD3_ATTENTION_TARGETS, SD3Backbone
from rewarddance_jax.nn import lora as lora_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.rewards import process as process_lib
from rewarddance_jax.rewards import thurstone as thurstone_lib


KINDS = ('thurstone', 'process')


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """`config.reward` of a latent_reward run; `head` holds the keys of the kind's HeadConfig."""
  kind: str
  num_blocks: int
  layers: tuple[int, ...]
  lora_rank: int
  lora_alpha: float
  loss: str
  base_workdir: str = ''
  base_item: str = 'params'
  lora_targets: str = lora_lib.ATTENTION_TARGETS
  head: Any = None
  sigma_sampler: str = 'uniform'
  shift: float = 1.0
  ensemble_sigmas: tuple[float, ...] = thurstone_lib.DEFAULT_ENSEMBLE
  ensemble_weight: float = 0.0

  RANGES = {'num_blocks': '[1, inf)', 'lora_rank': '[1, inf)', 'lora_alpha': '(0, inf)',
            'shift': '(0, inf)', 'ensemble_weight': '[0, inf)'}

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'config.reward.kind={self.kind!r} is not one of {KINDS}.')
    losses = thurstone_lib.LOSSES if self.kind == 'thurstone' else process_lib.LOSSES
    if self.loss not in losses:
      raise ValueError(f'config.reward.loss={self.loss!r} is not one of {losses} ({self.kind}).')
    if not all(0.0 <= s <= 1.0 for s in self.ensemble_sigmas):
      raise ValueError(f'config.reward.ensemble_sigmas={self.ensemble_sigmas} must lie in [0, 1].')


def reward_config(section) -> RewardConfig:
  return config_lib.section(RewardConfig, section, 'config.reward')


def make_backbone(config):
  """The reward's backbone over the generator of `config.family`: `SD3Backbone` for sd3 (its
  runs of blocks scanned with `config.model.scan_layers`; LoRA targets default to its attention
  projections), else the MMDiT `Backbone`."""
  r = reward_config(config.reward)
  model_cfg = families.from_config(config).model_config()
  kw = dict(num_blocks=r.num_blocks, layers=r.layers, lora_rank=r.lora_rank,
            lora_alpha=r.lora_alpha)
  if config.get('family', 'digits') == 'sd3':
    targets = (SD3_ATTENTION_TARGETS if r.lora_targets == lora_lib.ATTENTION_TARGETS
               else r.lora_targets)
    return SD3Backbone(model_cfg, lora_targets=targets,
                       scan=bool(config.model.get('scan_layers', False)), **kw)
  return Backbone(model_cfg, lora_targets=r.lora_targets, **kw)


def generator_factory(config, backbone, seed: int):
  """Builds the full generator the backbone is cut from (the base's source)."""
  model_cfg = backbone.cfg if isinstance(backbone, SD3Backbone) else backbone.gen_cfg
  return families.from_config(config).factory(model_cfg, seed)


def head_config(config, backbone: Backbone):
  r = reward_config(config.reward)
  lib = thurstone_lib if r.kind == 'thurstone' else process_lib
  fixed = {'width': backbone.width}
  if r.kind == 'thurstone':
    fixed['num_layers'] = len(backbone.layers)
  return config_lib.section(lib.HeadConfig, r.head, 'config.reward.head', **fixed)


def head_factory(config, hcfg, seed):
  """`() -> head`; `seed` is what `nnx.Rngs` takes: an int or a key."""
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
  _, (gen_abs,) = sharding_lib.abstract_state(generator_factory(config, backbone, 0), mesh, rules)
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
