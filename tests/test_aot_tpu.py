"""AOT compilation for a TPU topology (v5e:2x2) on this CPU host, through libtpu.

  1. The tiny-config flow-matching train step is built fully abstractly (no parameter is ever
     materialised): abstract params and their NamedShardings on the TPU mesh, the AdamW state
     from `jax.eval_shape`, batch and key as ShapeDtypeStructs. It is jitted as the training loop
     jits it (state donated) and compiled; memory analysis must report real numbers.
  2. `attention(impl='flash')` forward and backward is compiled for (B=4, L=256, H=4, D=128) bf16
     over a (1, 4, 1) mesh, proving that the Pallas TPU kernels lower under `shard_map`.
Skipped (with libtpu's error text) only when libtpu cannot be loaded or initialised.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.digits import flow as flow_config
from rewarddance_jax.nn import attention as attention_lib
from rewarddance_jax.parallel import aot
from rewarddance_jax.scan import flow as scan_flow
from rewarddance_jax.train import common

pytestmark = [
    pytest.mark.tpu_aot,
    # conftest enables the persistent compilation cache; a TPU executable compiled on this host
    # is written there but cannot be read back without a TPU client, so a rerun warns once and
    # simply compiles again.
    pytest.mark.filterwarnings('ignore:Error reading persistent compilation cache entry'),
]

TOPOLOGY = 'v5e:2x2'


@pytest.fixture(autouse=True)
def _require_libtpu():
  if not aot.libtpu_available():
    pytest.skip(f'libtpu cannot be loaded/initialised: {aot.libtpu_unavailable_reason()}')


def _nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_topology_mesh_fills_and_checks_shape():
  mesh = aot.tpu_topology_mesh(TOPOLOGY, (2, -1, 1))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert {d.platform for d in mesh.devices.flat} == {'tpu'}
  with pytest.raises(ValueError, match=r'\(3, 1, 1\).*4'):
    aot.tpu_topology_mesh(TOPOLOGY, (3, 1, 1))


@pytest.mark.slow  # test_scan_sharding.py compiles the same step for v5e:2x2
def test_flow_train_step_compiles_for_v5e():
  config = flow_config.get_config('runlocal')
  mesh = aot.tpu_topology_mesh(TOPOLOGY, (1, -1, 1))
  # Shape-only build (params, AdamW state, batch, key), jitted as `train/loop.py` jits it.
  step = scan_flow.abstract_flow_train_step(config, mesh)
  train_state, batch, _ = step.args
  report = step.compile_report()

  print(f'{TOPOLOGY} flow step (tiny): {aot.format_report(report)}')
  state_bytes = _nbytes(train_state)
  assert report['argument_bytes'] > 0
  # FSDP over 4 chips: each holds less than the whole state, but at least its quarter.
  assert state_bytes / 4 <= report['argument_bytes'] < state_bytes + _nbytes(batch)
  assert report['alias_bytes'] > 0  # the donated state is updated in place
  assert report['total_bytes'] > 0
  assert report['flops'] > 0
  assert report['compile_seconds'] > 0


def test_flash_attention_compiles_for_v5e():
  mesh = aot.tpu_topology_mesh(TOPOLOGY, (1, 4, 1))
  rules = (('act_batch', ('data', 'fsdp')), ('act_heads', 'tensor'))
  spec = NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor', None))
  x = jax.ShapeDtypeStruct((4, 256, 4, 128), jnp.bfloat16, sharding=spec)

  def forward(q, k, v):
    return attention_lib.attention(q, k, v, impl='flash')

  def loss(q, k, v):
    return forward(q, k, v).astype(jnp.float32).sum()

  grad = jax.grad(loss, argnums=(0, 1, 2))
  with common.mesh_context(mesh, rules):
    fwd_report = aot.compile_report(jax.jit(forward), x, x, x)
    bwd_report = aot.compile_report(jax.jit(grad), x, x, x)
    bwd_hlo = jax.jit(grad).lower(x, x, x).as_text()

  print(f'{TOPOLOGY} flash fwd: {aot.format_report(fwd_report)}')
  print(f'{TOPOLOGY} flash fwd+bwd: {aot.format_report(bwd_report)}')
  # The Pallas kernels, not an XLA fallback: forward, dK/dV and dQ are TPU custom calls.
  for kernel in ('_flash_attention_kernel', '_flash_attention_dkv_kernel',
                 '_flash_attention_dq_kernel'):
    assert kernel in bwd_hlo
  # Per chip: one batch row of q, k, v (1·256·4·128 bf16 = 256 KiB each).
  assert fwd_report['argument_bytes'] == 3 * 256 * 4 * 128 * 2
  assert fwd_report['flops'] > 0 and bwd_report['total_bytes'] > 0
