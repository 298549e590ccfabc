"""The scanner compiles the trainer's program: its abstract state (tree, shapes, dtypes,
shardings) is what the trainer's own builder creates, on an 8-device mesh: GRPO (full
fine-tuning with EMA and KL reference; a bf16-base LoRA), the flow step (with EMA) and the
latent-reward step (Thurstone and PAVRM)."""

import jax
import ml_collections
import pytest

from configs.digits import flow as flow_config, grpo as grpo_config
from configs.digits import reward_process, reward_thurstone
from rewarddance_jax.models.presets import model_preset
from rewarddance_jax.nn import lora as lora_lib
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.scan import flow as scan_flow, grpo as scan_grpo
from rewarddance_jax.scan import latent_reward as scan_latent
from rewarddance_jax.train import flow as flow_trainer, grpo as grpo_trainer
from rewarddance_jax.train import latent_reward as latent_trainer


def _config(lora: bool):
  c = grpo_config.get_config('runlocal')
  c.model = model_preset('tiny')
  c.data.batch_size = 8
  c.grpo.update(group_size=2, num_steps=3, minibatches=2, kl_beta=0.0 if lora else 0.1,
                ema_decay=0.0 if lora else 0.9, selection=dict(kind='prefix', fraction=1.0))
  if lora:
    c.grpo.lora = dict(rank=2, alpha=4.0, targets=lora_lib.BLOCK_TARGETS, base_dtype='bfloat16')
  return c


def _mesh():
  return mesh_lib.create_mesh(ml_collections.ConfigDict(
      dict(axes=('data', 'fsdp', 'tensor'), ici=(2, 2, 2))), jax.devices())


def _structs(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), tree)


@pytest.mark.parametrize('lora', [False, True], ids=['full', 'lora'])
def test_scanner_state_is_the_trainers(lora):
  c = _config(lora)
  mesh = _mesh()
  rules = sharding_lib.rules_from_config(c.sharding_rules)
  real = grpo_trainer.build_policy(c, mesh, rules)
  scanned = scan_grpo.abstract_policy(c, mesh, rules)
  assert _structs(scanned.state) == _structs(real.state)
  assert _structs(scanned.frozen) == _structs(real.frozen)
  assert scanned.shardings == real.shardings
  if lora:
    assert {a.dtype.name for a in jax.tree.leaves(real.frozen['base'])} == {'bfloat16'}
    assert real.frozen['ref'] is None
  else:
    assert 'ema' in real.state and real.frozen['ref'] is not None


def test_flow_scanner_state_is_the_trainers():
  c = flow_config.get_config('runlocal')
  c.ema_decay = 0.99
  mesh = _mesh()
  rules = sharding_lib.rules_from_config(c.sharding_rules)
  real = flow_trainer.build_state(c, mesh, rules)[1]
  scanned = scan_flow.abstract_flow_train_step(c, mesh).args[0]
  assert _structs(scanned) == _structs(real) and 'ema' in real


@pytest.mark.parametrize('module', [reward_thurstone, reward_process], ids=['thurstone', 'pavrm'])
def test_latent_reward_scanner_state_is_the_trainers(module):
  c = module.get_config('runlocal')
  mesh = _mesh()
  rules = sharding_lib.rules_from_config(c.sharding_rules)
  real = latent_trainer.build_state(c, mesh, rules)[2]
  scanned = scan_latent.abstract_latent_reward_step(c, mesh).args[0]
  assert _structs(scanned) == _structs(real)
