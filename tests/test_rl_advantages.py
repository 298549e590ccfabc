"""Tests for rewarddance_jax.rl.advantages (docs/algorithms.md §3.2); expected values by hand."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rewarddance_jax.rl import advantages

# Two groups of G = 4: the first spread out, the second constant (std 0).
TWO_GROUPS = [1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0]
DEVIATIONS = np.array([-1.5, -0.5, 0.5, 1.5])  # First group minus its mean 2.5.


def test_dance_two_groups():
  adv = advantages.group_advantages(jnp.array(TWO_GROUPS), 4, mode='dance')
  # Unbiased std of the first group: sqrt((2.25 + 0.25 + 0.25 + 2.25)/3) = sqrt(5/3).
  expected = np.concatenate([DEVIATIONS / (math.sqrt(5.0 / 3.0) + 1e-8), np.zeros(4)])
  assert adv.dtype == jnp.float32 and adv.shape == (8,)
  np.testing.assert_allclose(adv, expected, rtol=1e-6, atol=0)
  np.testing.assert_array_equal(adv[4:], 0.0)
  assert float(advantages.zero_std_fraction(jnp.array(TWO_GROUPS), 4)) == 0.5


def test_flow_grpo_two_groups():
  adv = advantages.group_advantages(jnp.array(TWO_GROUPS), 4, mode='flow_grpo')
  # Population std of the first group: sqrt(5/4).
  expected = np.concatenate([DEVIATIONS / (math.sqrt(1.25) + 1e-4), np.zeros(4)])
  np.testing.assert_allclose(adv, expected, rtol=1e-6, atol=0)
  np.testing.assert_array_equal(adv[4:], 0.0)


def test_flow_grpo_global_std():
  adv = advantages.group_advantages(jnp.array(TWO_GROUPS), 4, mode='flow_grpo', global_std=True)
  # Batch mean 3.75; squared deviations 2.75², 1.75², 0.75², 0.25² and 4 × 1.25² sum to 17.5.
  global_std = math.sqrt(17.5 / 8)
  expected = np.concatenate([DEVIATIONS / (global_std + 1e-4), np.zeros(4)])
  np.testing.assert_allclose(adv, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize('sign', [1.0, -1.0])
def test_outlier_is_clipped_at_five(sign):
  # One group of 30: a single 1 among 29 zeros. Mean 1/30; unbiased std sqrt(1/30), so the
  # outlier's z-score is (29/30)/sqrt(1/30) = 29/sqrt(30) ≈ 5.29 and the others' −1/sqrt(30).
  rewards = sign * np.eye(1, 30, 0)[0]
  raw = advantages.group_advantages(jnp.array(rewards), 30, mode='dance', clip=None)
  clipped = advantages.group_advantages(jnp.array(rewards), 30, mode='dance')
  assert abs(float(raw[0])) == pytest.approx(29 / math.sqrt(30), rel=1e-5)
  assert float(clipped[0]) == sign * 5.0
  np.testing.assert_allclose(clipped[1:], -sign / math.sqrt(30), rtol=1e-5)
  # Population std sqrt(29)/30: z = sqrt(29) ≈ 5.39, others −1/sqrt(29).
  fg = advantages.group_advantages(jnp.array(rewards), 30, mode='flow_grpo', clip=None)
  assert float(fg[0]) == pytest.approx(sign * 29 / (math.sqrt(29) + 30e-4), rel=1e-5)
  fg_clipped = advantages.group_advantages(jnp.array(rewards), 30, mode='flow_grpo')
  assert float(fg_clipped[0]) == sign * 5.0


def test_equal_rewards_give_exact_zero_despite_rounding():
  # 0.1 is not exact in float32 and its 3-sample mean rounds; the advantage must still be exactly 0
  # (not rounding/1e-8).
  rewards = jnp.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], jnp.float32)
  for mode in advantages.ADVANTAGE_MODES:
    adv = advantages.group_advantages(rewards, 3, mode=mode)
    np.testing.assert_array_equal(adv, 0.0)
  assert float(advantages.zero_std_fraction(rewards, 3)) == 1.0


def test_groups_are_adjacent_rows():
  # [a, a, b, b] with G = 2 has constant groups; interleaved grouping would not.
  rewards = jnp.array([1.0, 1.0, 3.0, 3.0])
  np.testing.assert_array_equal(advantages.group_advantages(rewards, 2), 0.0)
  adv = advantages.group_advantages(jnp.array([1.0, 3.0, 1.0, 3.0]), 2)
  s = 1 / math.sqrt(2)  # (x − mean)/unbiased std for any unequal pair.
  np.testing.assert_allclose(adv, [-s, s, -s, s], rtol=1e-6)


def test_bad_shapes_and_modes():
  with pytest.raises(ValueError, match=r'B=6.*G=4'):
    advantages.group_advantages(jnp.zeros(6), 4)
  with pytest.raises(ValueError, match=r'B=6.*G=4'):
    advantages.zero_std_fraction(jnp.zeros(6), 4)
  with pytest.raises(ValueError, match='mode'):
    advantages.group_advantages(jnp.zeros(4), 2, mode='ppo')
  with pytest.raises(ValueError, match='global_std'):
    advantages.group_advantages(jnp.zeros(4), 2, mode='dance', global_std=True)
  with pytest.raises(ValueError, match='G >= 2'):
    advantages.group_advantages(jnp.zeros(4), 1, mode='dance')
  with pytest.raises(ValueError, match=r'\(B,\)'):
    advantages.group_advantages(jnp.zeros((2, 2)), 2)


def test_nonzero_advantage_mask():
  mask = advantages.nonzero_advantage_mask(jnp.array([0.0, 1.2, -0.3, 0.0]))
  assert mask.dtype == jnp.float32
  np.testing.assert_array_equal(mask, [0.0, 1.0, 1.0, 0.0])


def test_jit_and_bf16_input():
  rewards = jnp.array(TWO_GROUPS, jnp.bfloat16)  # All exact in bfloat16.
  for mode, global_std in (('dance', False), ('flow_grpo', False), ('flow_grpo', True)):
    fn = functools.partial(advantages.group_advantages, group_size=4, mode=mode,
                           global_std=global_std)
    eager = fn(jnp.array(TWO_GROUPS))
    jitted = jax.jit(fn)(rewards)
    assert jitted.dtype == jnp.float32
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
  frac = jax.jit(advantages.zero_std_fraction, static_argnums=1)(rewards, 4)
  assert float(frac) == 0.5
  mask = jax.jit(advantages.nonzero_advantage_mask)(jnp.array([0.0, 2.0]))
  np.testing.assert_array_equal(mask, [0.0, 1.0])
