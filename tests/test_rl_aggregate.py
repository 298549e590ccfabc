"""Tests for rewarddance_jax.rl.aggregate (docs/algorithms.md §3.6); expected values by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rewarddance_jax.rl import aggregate

# With G = 2 and the unbiased std, an unequal pair (x, y) normalises to ∓1/sqrt(2): x − mean =
# ±|x − y|/2 and std = |x − y|/sqrt(2).
S = 1 / math.sqrt(2)
# Group 1: the rewards disagree; group 2: reward 'a' is constant.
REWARDS = {'a': jnp.array([1.0, 2.0, 3.0, 3.0]), 'b': jnp.array([10.0, 0.0, 0.0, 4.0])}
WEIGHTS = {'a': 1.0, 'b': 0.5}


def test_advantage_aggregation_two_groups():
  adv = aggregate.advantage_aggregation(REWARDS, WEIGHTS, 2)
  # Group 1: A_a = (−s, s), A_b = (s, −s) -> 1·A_a + 0.5·A_b = (−s/2, s/2).
  # Group 2: A_a = (0, 0), A_b = (−s, s) -> (−s/2, s/2).
  np.testing.assert_allclose(adv, [-S / 2, S / 2, -S / 2, S / 2], rtol=1e-6)
  assert adv.dtype == jnp.float32


def test_reward_aggregation_two_groups():
  adv = aggregate.reward_aggregation(REWARDS, WEIGHTS, 2)
  # r = a + 0.5·b = (6, 2, 3, 5): group 1 (s, −s), group 2 (−s, s); the sign of group 1 differs
  # from advantage aggregation because b's raw scale dominates the sum.
  np.testing.assert_allclose(adv, [S, -S, -S, S], rtol=1e-6)


def test_per_reward_advantages_are_not_clipped_before_the_sum():
  # One group of 30 with an outlier: unclipped z = 29/sqrt(30) ≈ 5.29 for either reward.
  r = jnp.asarray(np.eye(1, 30, 0)[0], jnp.float32)
  z = 29 / math.sqrt(30)
  rewards = {'x': r, 'y': r}
  half = {'x': 0.5, 'y': 0.5}
  # Clipping each A_k at 5 first would give 0.5·5 + 0.5·5 = 5.
  adv = aggregate.advantage_aggregation(rewards, half, 30, clip=6.0)
  assert float(adv[0]) == pytest.approx(z, rel=1e-5)
  adv = aggregate.advantage_aggregation(rewards, half, 30, clip=None)
  assert float(adv[0]) == pytest.approx(z, rel=1e-5)
  # Then exactly one clip: weights 1 + 1 give 2z ≈ 10.6 -> 5.
  adv = aggregate.advantage_aggregation(rewards, {'x': 1.0, 'y': 1.0}, 30)
  assert float(adv[0]) == 5.0
  np.testing.assert_allclose(adv[1:], -2 / math.sqrt(30), rtol=1e-5)


def test_flow_grpo_mode_is_passed_through():
  rewards = {'a': jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])}
  adv = aggregate.advantage_aggregation(rewards, {'a': 2.0}, 4, mode='flow_grpo')
  expected = 2.0 * np.array([-1.5, -0.5, 0.5, 1.5]) / (math.sqrt(1.25) + 1e-4)
  np.testing.assert_allclose(adv[:4], expected, rtol=1e-6)
  np.testing.assert_array_equal(adv[4:], 0.0)


def test_normalize_weights():
  # Weights 1 and 3 become 1/4 and 3/4 (MixGRPO divides by their sum).
  adv = aggregate.advantage_aggregation(REWARDS, {'a': 1.0, 'b': 3.0}, 2, normalize_weights=True)
  # Group 1: 0.25·(−s, s) + 0.75·(s, −s) = (s/2, −s/2); group 2: 0.75·(−s, s).
  np.testing.assert_allclose(adv, [S / 2, -S / 2, -0.75 * S, 0.75 * S], rtol=1e-6)
  # Reward aggregation is scale-free: r = (a + 3b)/4 normalises like a + 3b = (31, 2, 3, 15).
  adv = aggregate.reward_aggregation(REWARDS, {'a': 1.0, 'b': 3.0}, 2, normalize_weights=True)
  np.testing.assert_allclose(adv, [S, -S, -S, S], rtol=1e-6)


def test_names_must_match():
  with pytest.raises(ValueError, match=r"without a weight \['b'\].*without a reward \['c'\]"):
    aggregate.advantage_aggregation(REWARDS, {'a': 1.0, 'c': 1.0}, 2)
  with pytest.raises(ValueError, match=r"without a weight \['b'\]"):
    aggregate.reward_aggregation(REWARDS, {'a': 1.0}, 2)
  with pytest.raises(ValueError, match='No rewards'):
    aggregate.reward_aggregation({}, {}, 2)


def test_jit():
  adv_fn = jax.jit(lambda r: aggregate.advantage_aggregation(r, WEIGHTS, 2))
  rew_fn = jax.jit(lambda r: aggregate.reward_aggregation(r, WEIGHTS, 2))
  np.testing.assert_allclose(adv_fn(REWARDS), [-S / 2, S / 2, -S / 2, S / 2], rtol=1e-6)
  np.testing.assert_allclose(rew_fn(REWARDS), [S, -S, -S, S], rtol=1e-6)
