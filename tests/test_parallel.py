"""Mesh construction, logical rules and sharded init (8 fake CPU devices)."""

import logging

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rewarddance_jax.models.generator import Generator, generator_config
from rewarddance_jax.models.presets import model_preset
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel import sharding as sharding_lib


def _mesh_cfg(ici, dcn=(1, 1, 1)):
  return ml_collections.ConfigDict(dict(axes=('data', 'fsdp', 'tensor'), ici=ici, dcn=dcn))


def test_mesh_fills_minus_one():
  mesh = mesh_lib.create_mesh(_mesh_cfg((2, -1, 1)))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize('ici,match', [
    ((2, 2, 1), '4 devices but 8 are available'),
    ((-1, -1, 1), 'at most one axis'),
    ((3, -1, 1), 'not divisible'),
    ((2, 0, 4), 'positive'),
])
def test_mesh_errors_name_the_sizes(ici, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.create_mesh(_mesh_cfg(ici))


def test_rules_must_name_mesh_axes():
  mesh = mesh_lib.create_mesh(_mesh_cfg((1, -1, 1)))
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    sharding_lib.check_rules((('embed', 'model'),), mesh)


def test_unknown_logical_name_is_an_error():
  with pytest.raises(ValueError, match="'heads' has no sharding rule"):
    sharding_lib.logical_to_spec(('embed', 'heads'), (('embed', 'fsdp'),))


@pytest.mark.parametrize('scan', [False, True])
def test_flux_bench_partition_specs_follow_names_and_rules(scan):
  """Every flux-bench weight gets the spec its names and the rules give (abstract, no memory)."""
  mesh = mesh_lib.create_mesh(_mesh_cfg((2, 2, 2)))
  rules = sharding_lib.DEFAULT_RULES
  cfg = generator_config(model_preset('flux-bench', scan_layers=scan))
  _, (state,) = sharding_lib.abstract_state(lambda: Generator(cfg, rngs=nnx.Rngs(0)), mesh, rules)
  shardings = nnx.to_flat_state(sharding_lib.state_shardings(state, mesh, rules))
  names = sharding_lib.param_logical_names(state)
  rule_map = dict(rules)
  n_params = 0
  assert len(shardings) == len(names) > 50
  for path, sh in shardings:
    logical = names[path]
    assert logical is not None, f'{path} has no logical names'
    var = dict(nnx.to_flat_state(state))[path]
    shape = var.get_value().shape
    n_params += int(np.prod(shape))
    assert len(logical) == len(shape)
    # The expected spec, written out independently of flax's mapping helper.
    expected = []
    for n in logical:
      axes = rule_map[n] if n is not None else None
      expected.append(axes)
    assert sh.get_value().spec == P(*expected), path
    if scan and path[1] in ('double_blocks', 'single_blocks'):
      assert logical[0] == 'layers'
  # flux-bench is the 0.955B-parameter peer config (guidance embedding included).
  assert abs(n_params - 0.955e9) / 0.955e9 < 0.01, n_params


def test_sharded_init_materialises_shards():
  mesh = mesh_lib.create_mesh(_mesh_cfg((2, 2, 2)))
  rules = sharding_lib.DEFAULT_RULES
  cfg = generator_config(model_preset('tiny'))
  _, (params,), (shardings,) = sharding_lib.sharded_init(
      lambda: Generator(cfg, rngs=nnx.Rngs(0)), mesh, rules)
  kernel = params['transformer']['double_blocks'][0]['img_mlp']['fc1']['kernel']
  assert kernel.sharding == NamedSharding(mesh, P('fsdp', 'tensor'))
  # Each device holds a quarter of the (embed, mlp) kernel.
  shard_shape = kernel.addressable_shards[0].data.shape
  assert shard_shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)
  assert jax.tree.structure(params) == jax.tree.structure(shardings)


def test_sharded_abstract_matches_sharded_init_without_running_it():
  mesh = mesh_lib.create_mesh(_mesh_cfg((2, 2, 2)))
  rules = sharding_lib.DEFAULT_RULES
  cfg = generator_config(model_preset('tiny'))
  factory = lambda: Generator(cfg, rngs=nnx.Rngs(0))
  gd_real, (params,), (shard_real,) = sharding_lib.sharded_init(factory, mesh, rules)
  gd, (abstract,), (shardings,) = sharding_lib.sharded_abstract(factory, mesh, rules,
                                                                cache_key=('tiny', cfg))
  assert gd == gd_real
  assert jax.tree.structure(abstract) == jax.tree.structure(params)
  for a, p, s, s_real in zip(jax.tree.leaves(abstract), jax.tree.leaves(params),
                             jax.tree.leaves(shardings), jax.tree.leaves(shard_real)):
    assert isinstance(a, jax.ShapeDtypeStruct)
    assert (a.shape, a.dtype, a.sharding) == (p.shape, p.dtype, p.sharding) and s == s_real
  # The key ignores the seed: a second build of the same model is the cached result.
  again = sharding_lib.sharded_abstract(lambda: Generator(cfg, rngs=nnx.Rngs(7)), mesh, rules,
                                        cache_key=('tiny', cfg))
  assert again[1] is sharding_lib.sharded_abstract(factory, mesh, rules, cache_key=('tiny', cfg))[1]


def test_indivisible_dimension_is_replicated_with_a_warning(caplog):
  """sharded_init of a 97-row table on a (2, 2, 2) mesh: vocab (-> tensor) replicated, embed
  still on fsdp; the warning names the param, the dimension and the axis."""
  mesh = mesh_lib.create_mesh(_mesh_cfg((2, 2, 2)))
  init = nnx.with_partitioning(nnx.initializers.normal(), ('vocab', 'embed'))
  factory = lambda: nnx.Embed(97, 8, embedding_init=init, rngs=nnx.Rngs(0))
  with caplog.at_level(logging.WARNING):
    _, (params,), _ = sharding_lib.sharded_init(factory, mesh, sharding_lib.DEFAULT_RULES)
  assert params['embedding'].sharding.spec == P(None, 'fsdp')
  assert params['embedding'].addressable_shards[0].data.shape == (97, 4)
  assert ("embedding: dimension 0 (vocab, 97) is not divisible by mesh axis 'tensor' (2)"
          in caplog.text)


def test_host_to_global_shards_the_batch():
  mesh = mesh_lib.create_mesh(_mesh_cfg((2, 4, 1)))
  batch = {'x': np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  out = sharding_lib.host_to_global(batch, mesh, sharding_lib.DEFAULT_RULES)
  assert out['x'].sharding.spec == P(('fsdp', 'data'), None)
  np.testing.assert_array_equal(np.asarray(out['x']), batch['x'])
  with pytest.raises(TypeError, match='string'):
    sharding_lib.host_to_global({'p': np.array(['a'] * 8)}, mesh, sharding_lib.DEFAULT_RULES)


def test_every_generator_param_has_logical_names():
  cfg = generator_config(model_preset('tiny'))
  mesh = mesh_lib.create_mesh(_mesh_cfg((1, -1, 1)))
  _, (state,) = sharding_lib.abstract_state(lambda: Generator(cfg, rngs=nnx.Rngs(0)), mesh,
                                            sharding_lib.DEFAULT_RULES)
  missing = [p for p, n in sharding_lib.param_logical_names(state).items() if n is None]
  assert not missing, missing
