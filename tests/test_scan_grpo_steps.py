"""The scanner's 'grpo_rollout' / 'grpo_update' steps (full and LoRA) and per-chip residency.

  1. `per_chip_bytes` of hand-made sharded structs equals the hand-computed shard sizes.
  2. The abstract LoRA policy of the tiny GRPO config (no compile): base in bf16, only the LoRA
     tree trainable and in AdamW (mu / nu have the LoRA's leaves), LoRA size counted by hand from
     the selected kernels (in + out)·r, base sharded like full fine-tuning's params.
  3. The rollout and update of the tiny LoRA config AOT-compile for v5e:2x2: no error, fits, the
     analytic FLOPs equal 2·P·S·B·N (rollout) and 6·P·S·B·T (update) over 4 chips, and the
     rollout's resident bytes are those of the AdamW state + rl counters + reward params
     (`per_chip_bytes` of the abstract policy).
Skipped (with libtpu's error text) only when libtpu cannot be loaded or initialised.
"""

import math
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.digits import grpo as grpo_config
from rewarddance_jax.models.presets import model_preset
from rewarddance_jax.nn import lora as lora_lib
from rewarddance_jax.parallel import aot
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.parallel.trees import count_params
from rewarddance_jax.scan import grpo as scan_grpo
from rewarddance_jax.scan import layouts as scanner
from rewarddance_jax.scan.step import per_chip_bytes

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.filterwarnings('ignore:Error reading persistent compilation cache entry'),
]

TOPOLOGY = 'v5e:2x2'
RANK = 2


@pytest.fixture(autouse=True)
def _require_libtpu():
  if not aot.libtpu_available():
    pytest.skip(f'libtpu cannot be loaded/initialised: {aot.libtpu_unavailable_reason()}')


def _config(lora: bool):
  c = grpo_config.get_config('runlocal')
  c.model = model_preset('tiny')
  c.data.batch_size = 4
  c.grpo.update(group_size=2, num_steps=3, minibatches=1,
                selection=dict(kind='prefix', fraction=1.0))
  if lora:
    c.grpo.lora = dict(rank=RANK, alpha=2.0 * RANK, targets=lora_lib.BLOCK_TARGETS,
                       base_dtype='bfloat16')
  return c


def test_per_chip_bytes_by_hand():
  mesh = aot.tpu_topology_mesh(TOPOLOGY, (1, 4, 1))
  tree = {'a': jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=NamedSharding(mesh, P('fsdp'))),
          'b': jax.ShapeDtypeStruct((5,), jnp.bfloat16, sharding=NamedSharding(mesh, P()))}
  assert per_chip_bytes(tree) == 2 * 6 * 4 + 5 * 2


def test_lora_policy_is_lora_only():
  config = _config(lora=True)
  mesh = aot.tpu_topology_mesh(TOPOLOGY, (1, 4, 1))
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  pol = scan_grpo.abstract_policy(config, mesh, rules)
  full = scan_grpo.abstract_policy(_config(lora=False), mesh, rules)
  base = pol.frozen['base']
  assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
  assert jax.tree.map(lambda x: x.sharding.spec, base) == jax.tree.map(
      lambda x: x.sharding.spec, full.state['params'])
  pattern = re.compile(lora_lib.BLOCK_TARGETS)
  flat = jax.tree_util.tree_flatten_with_path(full.state['params'])[0]
  want = sum(math.prod(x.shape[:-2]) * (x.shape[-2] + x.shape[-1]) * RANK
             for path, x in flat if pattern.fullmatch(lora_lib._path_str(path)))  # pylint: disable=protected-access
  assert want > 0 and count_params(pol.state['params']) == want
  adam = [s for s in jax.tree.leaves(pol.state['opt_state'], is_leaf=lambda s: hasattr(s, 'mu'))
          if hasattr(s, 'mu')]
  assert len(adam) == 1
  assert jax.tree.structure(adam[0].mu) == jax.tree.structure(pol.state['params'])
  assert pol.num_params == full.num_params


def test_rollout_and_update_steps_compile_with_lora():
  config = _config(lora=True)
  rows = scanner.scan_layouts(config, TOPOLOGY, [{'mesh': (1, -1, 1), 'step': s}
                                              for s in ('grpo_rollout', 'grpo_update')])
  by_step = {r['step']: r for r in rows}
  for r in rows:
    assert r['error'] is None, r['error']
    assert r['fits'] and r['argument_gib'] > 0 and r['num_devices'] == 4
  mesh = aot.tpu_topology_mesh(TOPOLOGY, (1, 4, 1))
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  pol = scan_grpo.abstract_policy(config, mesh, rules)
  b, n, t = 4, 3, 2
  s = (16 // 4) ** 2 + config.data.max_text_len
  p = pol.num_params
  assert by_step['grpo_rollout']['model_flops'] == pytest.approx(2 * p * s * b * n / 4)
  assert by_step['grpo_update']['model_flops'] == pytest.approx(6 * p * s * b * t / 4)
  rewards, _, _ = scan_grpo.abstract_rewards(config, mesh, rules)
  resident = per_chip_bytes(
      [pol.state['opt_state'], pol.state['rl'], rewards])
  assert resident > 0
  assert by_step['grpo_rollout']['resident_gib'] * scanner.GIB == pytest.approx(resident)
  assert by_step['grpo_update']['resident_gib'] * scanner.GIB == pytest.approx(
      per_chip_bytes(rewards))
  # Memory analysis read back: every row's total exceeds its arguments (outputs, program); the
  # tiny update step may keep all its temporaries on chip (libtpu reports temp 0 for it).
  for r in rows:
    assert r['temp_gib'] >= 0 and r['total_gib'] > r['argument_gib'], r
  assert by_step['grpo_rollout']['temp_gib'] > 0
