"""Tests for rewarddance_jax.rewards.base: the Reward protocol and WeightedRewards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rewarddance_jax.rewards import base


def _sum_reward(name='sum', scale=1.0, differentiable=True):
  """r = scale * Σ pixels; scale is the params, so it travels as a pytree leaf."""

  def fn(params, samples, batch, key):
    del batch, key
    return params * jnp.sum(samples['pixels'], axis=(1, 2, 3))

  return base.Reward(name=name, fn=fn, inputs='pixels', differentiable=differentiable,
                     params=jnp.float32(scale))


def _noise_reward(name='noise'):
  """r = one standard normal per sample, from the key: shows which key each reward got."""

  def fn(params, samples, batch, key):
    del params, batch
    return jax.random.normal(key, (samples['pixels'].shape[0],), jnp.float32)

  return base.Reward(name=name, fn=fn, inputs='pixels', differentiable=False)


def _pixels():
  # Two 1x2x1 images: sums 0.5 + 0.25 = 0.75 and 1.0 + 0.0 = 1.0.
  return jnp.array([[[[0.5], [0.25]]], [[[1.0], [0.0]]]], jnp.float32)


def test_reward_call_hand_computed():
  reward = _sum_reward(scale=2.0)
  out = reward({'pixels': _pixels()}, {}, None)
  np.testing.assert_allclose(out, [1.5, 2.0])
  assert out.dtype == jnp.float32 and reward.required_keys == ('pixels',)


def test_required_keys_per_input_kind():
  fn = lambda p, s, b, k: jnp.zeros((s['noisy_latents'].shape[0],), jnp.float32)
  process = base.Reward(name='process', fn=fn, inputs='noisy_latents', differentiable=True)
  assert process.required_keys == ('noisy_latents', 'sigma')
  out = process({'noisy_latents': jnp.ones((3, 2, 2, 4)), 'sigma': jnp.ones((3,))}, {})
  assert out.shape == (3,)
  with pytest.raises(KeyError, match=r"'process'.*'sigma'"):
    process({'noisy_latents': jnp.ones((3, 2, 2, 4))}, {})


def test_missing_sample_key_names_reward_and_key():
  with pytest.raises(KeyError, match=r"reward 'sum'.*samples\['pixels'\]"):
    _sum_reward()({'latents': _pixels()}, {})


@pytest.mark.parametrize('bad_out', [
    lambda x: jnp.sum(x, axis=(1, 2)),                         # (B, C): not one per sample.
    lambda x: jnp.sum(x),                                      # scalar
    lambda x: jnp.sum(x, axis=(1, 2, 3)).astype(jnp.bfloat16),  # wrong dtype
])
def test_wrong_output_shape_or_dtype_names_reward(bad_out):
  reward = base.Reward(name='bad', fn=lambda p, s, b, k: bad_out(s['pixels']), inputs='pixels',
                       differentiable=True)
  with pytest.raises(ValueError, match=r"reward 'bad' must return a \(2,\) float32"):
    reward({'pixels': _pixels()}, {})


def test_bad_metadata_rejected():
  fn = lambda p, s, b, k: s['pixels']
  with pytest.raises(ValueError, match='inputs must be one of'):
    base.Reward(name='x', fn=fn, inputs='images', differentiable=True)
  with pytest.raises(TypeError, match='differentiable must be a bool'):
    base.Reward(name='x', fn=fn, inputs='pixels', differentiable='yes')
  with pytest.raises(ValueError, match='non-empty string'):
    base.Reward(name='', fn=fn, inputs='pixels', differentiable=True)


def test_weighted_total_is_weighted_sum_and_jits():
  rewards = base.WeightedRewards([(_sum_reward('a', 1.0), 0.5), (_sum_reward('b', 3.0), -2.0)])
  samples, key = {'pixels': _pixels()}, jax.random.key(0)
  per = jax.jit(rewards.per_reward)(samples, {}, key)
  assert list(per) == ['a', 'b']
  np.testing.assert_allclose(per['a'], [0.75, 1.0])
  np.testing.assert_allclose(per['b'], [2.25, 3.0])
  total = jax.jit(rewards.total)(samples, {}, key)
  # 0.5 * 0.75 - 2 * 2.25 = -4.125 ; 0.5 * 1.0 - 2 * 3.0 = -5.5
  np.testing.assert_allclose(total, [-4.125, -5.5], rtol=1e-6)
  np.testing.assert_allclose(rewards.combine(per), total, rtol=1e-6)
  assert rewards.weights == {'a': 0.5, 'b': -2.0}


def test_weighted_rewards_is_a_pytree_of_params():
  rewards = base.WeightedRewards([(_sum_reward('a', 1.0), 1.0), (_noise_reward(), 1.0)])
  leaves = jax.tree.leaves(rewards)
  assert len(leaves) == 1 and float(leaves[0]) == 1.0  # Only the params; metadata is static.
  # Params are a jit argument (shardable), not a baked-in constant: new params, no retrace.
  traces = []

  @jax.jit
  def total(r, samples):
    traces.append(1)
    return r.total(samples, {}, jax.random.key(1))

  samples = {'pixels': _pixels()}
  first = total(rewards, samples)
  doubled = jax.tree.map(lambda p: 2 * p, rewards)
  second = total(doubled, samples)
  assert len(traces) == 1
  np.testing.assert_allclose(second - first, [0.75, 1.0], rtol=1e-6)
  assert doubled.names == ('a', 'noise') and doubled.weights == rewards.weights


def test_keys_fold_in_by_index():
  rewards = base.WeightedRewards([(_noise_reward('n0'), 1.0), (_noise_reward('n1'), 1.0)])
  key = jax.random.key(3)
  per = rewards.per_reward({'pixels': _pixels()}, {}, key)
  for index, name in enumerate(('n0', 'n1')):
    expected = jax.random.normal(jax.random.fold_in(key, index), (2,), jnp.float32)
    np.testing.assert_array_equal(per[name], expected)
  assert not np.allclose(per['n0'], per['n1'])


def test_metadata_summaries():
  mixed = base.WeightedRewards([(_sum_reward('a'), 1.0), (_noise_reward(), 1.0)])
  assert not mixed.differentiable and mixed.inputs == frozenset({'pixels'})
  assert base.WeightedRewards([(_sum_reward('a'), 1.0)]).differentiable
  latent = base.Reward(name='lat', fn=lambda p, s, b, k: jnp.zeros(s['latents'].shape[:1]),
                       inputs='latents', differentiable=True)
  assert base.WeightedRewards([(_sum_reward('a'), 1.0), (latent, 1.0)]).inputs == {
      'pixels', 'latents'}


def test_non_differentiable_reward_has_zero_gradient():
  # The fn itself is differentiable; the metadata says not to trust it, so the gradient stops.
  reward = _sum_reward('a', differentiable=False)
  grad = jax.grad(lambda x: jnp.sum(reward({'pixels': x}, {})))(_pixels())
  np.testing.assert_array_equal(grad, np.zeros_like(grad))
  grad = jax.grad(lambda x: jnp.sum(_sum_reward('a')({'pixels': x}, {})))(_pixels())
  np.testing.assert_array_equal(grad, np.ones_like(grad))


def test_construction_errors():
  with pytest.raises(ValueError, match=r"unique.*\['a'\]"):
    base.WeightedRewards([(_sum_reward('a'), 1.0), (_sum_reward('a', 2.0), 1.0)])
  with pytest.raises(ValueError, match='at least one'):
    base.WeightedRewards([])
  with pytest.raises(ValueError, match="reward 'a': weight must be a finite"):
    base.WeightedRewards([(_sum_reward('a'), float('nan'))])
  with pytest.raises(TypeError, match='pairs'):
    base.WeightedRewards([_sum_reward('a')])
