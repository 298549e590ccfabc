"""Tests for rewarddance_jax.rewards.rules: the simple pixel rule rewards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rewarddance_jax.data import digits
from rewarddance_jax.rewards import base
from rewarddance_jax.rewards import rules


def _pixels():
  # Two 2x2x1 images: [[0, 1], [0.25, 0.75]] and all 0.5.
  return jnp.array([[[[0.0], [1.0]], [[0.25], [0.75]]],
                    [[[0.5], [0.5]], [[0.5], [0.5]]]], jnp.float32)


def test_mean_intensity_hand_computed():
  out = rules.mean_intensity()({'pixels': _pixels()}, {})
  np.testing.assert_allclose(out, [0.5, 0.5])
  out = rules.mean_intensity()({'pixels': _pixels().astype(jnp.bfloat16)}, {})
  assert out.dtype == jnp.float32  # Rewards are computed in float32 whatever the input dtype.


def test_target_l2_hand_computed():
  target = np.zeros((2, 2, 1), np.float32)
  out = rules.target_l2(target)({'pixels': _pixels()}, {})
  # -(0 + 1 + 0.0625 + 0.5625) / 4 = -0.40625 ; -(4 * 0.25) / 4 = -0.25
  np.testing.assert_allclose(out, [-0.40625, -0.25])
  with pytest.raises(ValueError, match='do not match the target'):
    rules.target_l2(np.zeros((3, 3, 1)))({'pixels': _pixels()}, {})
  with pytest.raises(ValueError, match='one \\(H, W, C\\) image'):
    rules.target_l2(np.zeros((2, 2)))


def test_ink_fraction_hand_computed_and_not_differentiable():
  reward = rules.ink_fraction(0.5)
  out = reward({'pixels': _pixels()}, {})
  np.testing.assert_allclose(out, [0.5, 0.0])  # 1.0 and 0.75 are above; 0.5 is not (strict).
  assert not reward.differentiable
  grad = jax.grad(lambda x: jnp.sum(reward({'pixels': x}, {})))(_pixels())
  np.testing.assert_array_equal(grad, np.zeros_like(grad))


def test_digit_prototype_hand_computed():
  reward = rules.digit_prototype()
  protos = np.asarray(reward.params)
  assert protos.shape == (10, 16, 16, 1) and protos.dtype == np.float32
  train = digits.load_split('train')
  np.testing.assert_allclose(protos[3], train['images'][train['labels'] == 3].mean(0), atol=1e-6)
  pixels = jnp.stack([jnp.asarray(protos[3]), jnp.zeros((16, 16, 1))])
  out = reward({'pixels': pixels}, {'labels': jnp.array([3, 7])})
  np.testing.assert_allclose(out, [0.0, -np.mean(protos[7] ** 2)], rtol=1e-6, atol=1e-7)
  with pytest.raises(KeyError, match=r"digit_prototype.*needs batch\[.*labels"):
    reward({'pixels': pixels}, {'ids': jnp.array([0, 1])})


@pytest.mark.parametrize('make', [
    rules.mean_intensity, lambda: rules.target_l2(np.full((16, 16, 1), 0.3, np.float32)),
    rules.digit_prototype], ids=['mean_intensity', 'target_l2', 'digit_prototype'])
def test_differentiable_rule_gradient_finite_and_nonzero(make):
  reward = make()  # Built in the test, not at collection: digit_prototype loads the data set.
  x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 1))
  batch = {'labels': jnp.array([0, 1, 2, 3])}
  grad = jax.grad(lambda p: jnp.sum(reward({'pixels': p}, batch)))(x)
  assert reward.differentiable
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_digit_prototype_ranks_heldout_digits():
  reward = rules.digit_prototype()
  heldout = digits.load_split('heldout')
  labels = jnp.asarray(heldout['labels'])
  # A random wrong label per digit: shift the true one by 1..9 (mod 10).
  shift = jax.random.randint(jax.random.key(0), labels.shape, 1, 10)
  wrong = (labels + shift) % 10
  score = jax.jit(reward.__call__)
  samples = {'pixels': jnp.asarray(heldout['images'])}
  right_r = score(samples, {'labels': labels})
  wrong_r = score(samples, {'labels': wrong})
  accuracy = float(jnp.mean(right_r > wrong_r))
  assert accuracy >= 0.8, accuracy
  assert float(jnp.mean(right_r)) > float(jnp.mean(wrong_r))


def test_rules_combine_under_jit():
  rewards = base.WeightedRewards([(rules.digit_prototype(), 1.0), (rules.mean_intensity(), 2.0),
                                  (rules.ink_fraction(), 0.5)])
  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1))
  samples, batch = {'pixels': x}, {'labels': jnp.array([0, 1, 2, 3])}
  per = jax.jit(rewards.per_reward)(samples, batch, jax.random.key(0))
  total = jax.jit(lambda r, s, b: r.total(s, b, None))(rewards, samples, batch)
  expected = per['digit_prototype'] + 2.0 * per['mean_intensity'] + 0.5 * per['ink_fraction']
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  assert not rewards.differentiable and rewards.inputs == {'pixels'}


@pytest.mark.parametrize('axis_type', [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_sharded_scoring_matches_single_device(axis_type):
  # Samples and labels sharded on the batch over 8 fake devices, prototypes replicated.
  mesh = jax.make_mesh((8,), ('data',), axis_types=(axis_type,))
  on_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rewards = base.WeightedRewards([(rules.digit_prototype(), 1.0), (rules.ink_fraction(), 0.5)])
  heldout = digits.load_split('heldout')
  samples = {'pixels': jnp.asarray(heldout['images'][:16])}
  batch = {'labels': jnp.asarray(heldout['labels'][:16])}
  total = jax.jit(lambda r, s, b: r.total(s, b, None))
  expected = total(rewards, samples, batch)
  out = total(jax.device_put(rewards, replicated), jax.device_put(samples, on_batch),
              jax.device_put(batch, on_batch))
  assert out.sharding.is_equivalent_to(on_batch, 1)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
