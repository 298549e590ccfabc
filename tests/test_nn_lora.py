"""LoRA on param trees: identity at init, hand merge and grads, scanned MMDiT, shardings."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rewarddance_jax.models.generator import Generator, generator_config
from rewarddance_jax.models.presets import model_preset
from rewarddance_jax.nn import lora as lora_lib
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.parallel.trees import count_params



def _normal(shape, seed, scale=1.0):
  """numpy-drawn values (no eager JAX random ops: nothing to compile)."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _toy():
  return {'enc': {'attn': {'q': {'kernel': _normal((4, 6), 0), 'bias': jnp.zeros(6)},
                           'out': {'kernel': _normal((6, 4), 1)}},
                  'mlp': {'kernel': _normal((4, 4), 2)}}}


def _randomise_b(lora, seed):
  leaves = jax.tree_util.tree_flatten_with_path(lora)[0]
  return jax.tree.unflatten(jax.tree.structure(lora), [
      _normal(x.shape, seed + i) if path[-1].key == 'b' else x
      for i, (path, x) in enumerate(leaves)])


def test_init_is_identity_and_merge_matches_hand_computation():
  params = _toy()
  lora = lora_lib.init_lora(params, rank=2, alpha=4, targets=r'.*attn.*kernel',
                            key=jax.random.key(1))
  assert set(lora['enc']['attn']) == {'q', 'out'} and 'mlp' not in lora['enc']
  assert lora['enc']['attn']['q']['kernel']['a'].shape == (4, 2)
  assert lora['enc']['attn']['q']['kernel']['b'].shape == (2, 6)
  merged = lora_lib.merge(params, lora, lora_lib.lora_scale(2, 4))
  jax.tree.map(np.testing.assert_array_equal, merged, params)
  assert merged['enc']['mlp']['kernel'] is params['enc']['mlp']['kernel']   # untouched: shared
  lora = _randomise_b(lora, 20)
  merged = lora_lib.merge(params, lora, 2.0)
  ab = lora['enc']['attn']['out']['kernel']
  a, b = np.asarray(ab['a']), np.asarray(ab['b'])
  want = np.asarray(params['enc']['attn']['out']['kernel']) + 2.0 * a @ b
  np.testing.assert_allclose(merged['enc']['attn']['out']['kernel'], want, rtol=1e-6, atol=1e-6)
  assert merged['enc']['attn']['q']['bias'] is params['enc']['attn']['q']['bias']


def test_grads_reach_a_and_b_only():
  params = _toy()
  lora = _randomise_b(lora_lib.init_lora(params, rank=3, alpha=3, targets=r'.*q/kernel',
                                         key=jax.random.key(1)), 20)
  c = _normal((4, 6), 3)

  def loss(lora, params):   # linear in the merged kernel: dL/dW = c
    return jnp.sum(lora_lib.merge(params, lora, 0.5)['enc']['attn']['q']['kernel'] * c)

  grads = jax.jit(jax.grad(loss))(lora, params)
  a, b = (np.asarray(lora['enc']['attn']['q']['kernel'][k]) for k in 'ab')
  g = grads['enc']['attn']['q']['kernel']
  np.testing.assert_allclose(g['a'], 0.5 * np.asarray(c) @ b.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g['b'], 0.5 * a.T @ np.asarray(c), rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(lora)


def _generator(scan):
  cfg = generator_config(model_preset('tiny', depth_double=2, depth_single=2, scan_layers=scan))
  with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Generator(cfg, rngs=nnx.Rngs(0))))
  leaves, tree = jax.tree.flatten(nnx.to_pure_dict(state))
  return graphdef, jax.tree.unflatten(tree, [_normal(x.shape, i, 0.2)
                                             for i, x in enumerate(leaves)])


def test_scanned_mmdit_tree():
  graphdef, params = _generator(scan=True)
  lora = lora_lib.init_lora(params, rank=4, alpha=8, targets=lora_lib.ATTENTION_TARGETS,
                            key=jax.random.key(2))
  blocks = lora['transformer']
  assert set(blocks) == {'double_blocks', 'single_blocks'}
  assert blocks['double_blocks']['img_attn']['qkv']['kernel']['a'].shape == (2, 32, 4)
  assert blocks['double_blocks']['img_attn']['qkv']['kernel']['b'].shape == (2, 4, 3 * 32)
  assert blocks['double_blocks']['txt_out']['kernel']['b'].shape == (2, 4, 32)
  assert set(blocks['single_blocks']) == {'attn', 'attn_out'}       # not mlp_in / mlp_out
  # Per layer: double = 2 streams × (qkv 4·(32 + 96) + out 4·(32 + 32)), single = qkv + out.
  assert count_params(lora) == 2 * 2 * 4 * (128 + 64) + 2 * 4 * (128 + 64)
  x = _normal((2, 16, 16, 1), 99)
  cond = {'tokens': jnp.arange(12).reshape(2, 6) % 40, 'mask': jnp.ones((2, 6), bool)}
  run = jax.jit(lambda p, lo: nnx.merge(graphdef, lora_lib.merge(p, lo, 2.0))(x, 0.4, cond))
  zeros = jax.tree.map(jnp.zeros_like, lora)    # one compiled function for every comparison
  base = run(params, zeros)
  np.testing.assert_array_equal(run(params, lora), base)
  lora = _randomise_b(lora, 40)
  # Hand-merge layer 1's image qkv kernel only: the output must move, and match the tree merge.
  one = jax.tree.map(jnp.zeros_like, lora)
  one['transformer']['double_blocks']['img_attn']['qkv']['kernel'] = lora['transformer'][
      'double_blocks']['img_attn']['qkv']['kernel']
  ab = one['transformer']['double_blocks']['img_attn']['qkv']['kernel']
  hand = jax.tree.map(lambda v: v, params)
  hand['transformer']['double_blocks']['img_attn']['qkv']['kernel'] = (
      params['transformer']['double_blocks']['img_attn']['qkv']['kernel']
      + 2.0 * jnp.einsum('lir,lro->lio', ab['a'], ab['b']))
  out = run(params, one)
  np.testing.assert_allclose(out, run(hand, zeros), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(out - base).max()) > 1e-3


def test_shardings_follow_the_base_kernel_and_errors():
  cfg = generator_config(model_preset('tiny', scan_layers=True))
  mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(
      dict(axes=('data', 'fsdp', 'tensor'), ici=(2, 2, 2))), jax.devices())
  rules = sharding_lib.DEFAULT_RULES
  _, (state,) = sharding_lib.abstract_state(lambda: Generator(cfg, rngs=nnx.Rngs(0)), mesh, rules)
  shardings = nnx.to_pure_dict(sharding_lib.state_shardings(state, mesh, rules))
  params = nnx.to_pure_dict(state)                                # shapes only: nothing allocated
  lora = jax.eval_shape(lambda: lora_lib.init_lora(
      params, rank=4, alpha=4, targets=lora_lib.ATTENTION_TARGETS, key=jax.random.key(0)))
  lshard = lora_lib.lora_shardings(lora, shardings)
  q = lshard['transformer']['double_blocks']['img_attn']['qkv']['kernel']
  assert q['a'].spec == P(None, 'fsdp', None) and q['b'].spec == P(None, None, 'tensor')
  out = lshard['transformer']['double_blocks']['img_out']['kernel']
  assert out['a'].spec == P(None, 'tensor', None) and out['b'].spec == P(None, None, 'fsdp')
  real = jax.jit(lambda: lora_lib.init_lora(params, rank=4, alpha=4,
                                            targets=lora_lib.ATTENTION_TARGETS,
                                            key=jax.random.key(0)), out_shardings=lshard)()
  assert real['transformer']['double_blocks']['img_attn']['qkv']['kernel']['a'].sharding == q['a']
  names = lora_lib.lora_logical_names(lora, sharding_lib.param_logical_names(state))
  assert names[('transformer', 'double_blocks', 'img_attn', 'qkv', 'kernel', 'a')] == (
      'layers', 'embed', 'lora_rank')
  assert names[('transformer', 'double_blocks', 'img_attn', 'qkv', 'kernel', 'b')] == (
      'layers', 'lora_rank', 'heads')
  assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(lshard))
  with pytest.raises(ValueError, match='nothing_here'):
    lora_lib.init_lora(params, rank=2, alpha=2, targets='nothing_here', key=jax.random.key(0))
  with pytest.raises(ValueError, match='bias'):
    lora_lib.init_lora(params, rank=2, alpha=2, targets=r'.*img_in/bias', key=jax.random.key(0))
