"""Tests for rewarddance_jax.rl.extremes (training on each group's best and worst rollouts)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rewarddance_jax.rl import extremes


def test_keeps_each_groups_lowest_and_highest_in_ascending_order():
  # Group 0 (rows 0-5): order by advantage is rows 4, 1, 5, 0, 3, 2.
  # Group 1 (rows 6-11): order is rows 11, 10, 9, 8, 7, 6.
  adv = jnp.array([0.1, -1.0, 2.0, 0.5, -3.0, 0.0,
                   5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
  np.testing.assert_array_equal(extremes.extreme_rows(adv, 6, 2), [4, 2, 11, 6])
  np.testing.assert_array_equal(extremes.extreme_rows(adv, 6, 4), [4, 1, 3, 2, 11, 10, 7, 6])
  rows = extremes.extreme_rows(adv, 6, 6)  # keep = G: every row, sorted within its group.
  np.testing.assert_array_equal(rows, [4, 1, 5, 0, 3, 2, 11, 10, 9, 8, 7, 6])
  assert rows.dtype == jnp.int32


def test_ties_break_by_row_and_a_constant_group_keeps_its_ends():
  adv = jnp.zeros((8,))  # Two constant groups of 4 (their advantages are all 0).
  np.testing.assert_array_equal(extremes.extreme_rows(adv, 4, 2), [0, 3, 4, 7])


def test_jits_with_static_group_and_keep():
  adv = jax.random.normal(jax.random.key(0), (24,))
  rows = jax.jit(extremes.extreme_rows, static_argnums=(1, 2))(adv, 8, 4)
  assert rows.shape == (12,)
  for g in range(3):
    group = np.asarray(adv[8 * g:8 * g + 8])
    order = np.argsort(group) + 8 * g
    np.testing.assert_array_equal(rows[4 * g:4 * g + 4], np.r_[order[:2], order[-2:]])


@pytest.mark.parametrize('keep', [1, 3, 10, -2])
def test_bad_keep_is_one_clear_error(keep):
  with pytest.raises(ValueError, match=f'grpo.best_of={keep} must be 0'):
    extremes.extreme_rows(jnp.zeros((16,)), 8, keep)


def test_batch_not_made_of_groups_is_rejected():
  with pytest.raises(ValueError, match='multiple of G=4'):
    extremes.extreme_rows(jnp.zeros((6,)), 4, 2)
