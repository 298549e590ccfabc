"""Timestep selection for GRPO: shapes, ranges, the never-trained last step, windows."""

import jax
import numpy as np
import pytest

from rewarddance_jax.rl import timesteps


def _sel(**kw):
  return timesteps.TimestepSelection(**kw)


def test_fraction_is_a_per_sample_permutation_without_the_last_step():
  sel = _sel(kind='fraction', num_steps=16, fraction=0.6)
  assert sel.num_trained == 9                     # int(15·0.6), DanceGRPO's FLUX setting
  idx, mask = timesteps.select(sel, jax.random.key(0), 32)
  idx = np.asarray(idx)
  assert idx.shape == (32, 9) and np.asarray(mask).all()
  assert idx.min() >= 0 and idx.max() <= 14       # step 15 (σ → 0) is never trained
  assert all(len(set(row)) == 9 for row in idx)   # no repeats within a sample
  assert len({tuple(row) for row in idx}) > 1     # samples draw independently


def test_prefix_trains_the_first_steps_in_order():
  sel = _sel(kind='prefix', num_steps=10, fraction=0.99)
  idx, mask = timesteps.select(sel, jax.random.key(0), 4)
  np.testing.assert_array_equal(np.asarray(idx), np.tile(np.arange(9), (4, 1)))
  assert np.asarray(mask).all()


def test_window_is_shared_by_the_batch_and_sets_the_sde_mask():
  sel = _sel(kind='window', num_steps=10, window=3)   # start in {0, 1, 2} (range (0, N//2))
  starts = set()
  for seed in range(20):
    idx, mask = timesteps.select(sel, jax.random.key(seed), 5)
    idx, mask = np.asarray(idx), np.asarray(mask)
    assert (idx == idx[0]).all()
    start = idx[0, 0]
    np.testing.assert_array_equal(idx[0], start + np.arange(3))
    np.testing.assert_array_equal(np.flatnonzero(mask), start + np.arange(3))
    starts.add(int(start))
  assert starts == {0, 1, 2}


def test_sliding_window_advances_every_iters_per_group_and_rolls_back():
  sel = _sel(kind='sliding', num_steps=8, window=2, iters_per_group=3)  # starts 0..5
  got = [int(np.asarray(timesteps.select(sel, jax.random.key(0), 1, it)[0])[0, 0])
         for it in range(0, 21, 3)]
  assert got == [0, 1, 2, 3, 4, 5, 0]


def test_gather_steps_picks_per_sample_steps():
  stored = np.arange(5 * 3 * 2, dtype=np.float32).reshape(5, 3, 2)   # (N, B, D)
  idx = np.array([[0, 4], [2, 2], [3, 1]])
  out = np.asarray(timesteps.gather_steps(stored, idx))
  assert out.shape == (3, 2, 2)
  for b in range(3):
    for j in range(2):
      np.testing.assert_array_equal(out[b, j], stored[idx[b, j], b])


@pytest.mark.parametrize('kw, match', [
    (dict(kind='nope'), 'not one of'),
    (dict(kind='fraction', num_steps=3, fraction=0.1), 'trains no step'),
    (dict(kind='window', num_steps=6, window=6), 'does not fit'),
    (dict(kind='window', num_steps=10, window=3, window_range=(4, 5)), 'window_range'),
])
def test_bad_selections_are_rejected(kw, match):
  with pytest.raises(ValueError, match=match):
    _sel(**kw)
