"""`vlm_yes.native_projection`: the reward's view of an image at the data's native resolution."""

import numpy as np
import pytest

from rewarddance_jax.data import digits
from rewarddance_jax.rewards.vlm_yes import native_projection


def test_native_projection_keeps_upsampled_images_and_removes_finer_detail():
  rng = np.random.default_rng(0)
  small = rng.uniform(0.0, 1.0, (3, 8, 8)).astype(np.float32)
  up = digits.upsample_digits(small)                          # (3, 16, 16, 1), the data's form
  np.testing.assert_allclose(np.asarray(native_projection(up, 8)), up, atol=2e-6)
  # A checkerboard at the 16-pixel Nyquist frequency is invisible at 8x8: < 1% of its energy
  # survives (a little at the borders, where bilinear upsampling is not symmetric).
  board = (np.indices((16, 16)).sum(0) % 2 * 2.0 - 1.0).astype(np.float32)[None, ..., None]
  assert (np.asarray(native_projection(board, 8)) ** 2).sum() < 0.01 * (board ** 2).sum()
  # A projection: applying it twice changes nothing more; white noise keeps ~64/256 of its energy.
  noise = rng.normal(size=(4, 16, 16, 2)).astype(np.float32)
  once = np.asarray(native_projection(noise, 8))
  np.testing.assert_allclose(np.asarray(native_projection(once, 8)), once, atol=1e-5)
  assert 0.15 < (once ** 2).sum() / (noise ** 2).sum() < 0.35
  with pytest.raises(ValueError, match='square'):
    native_projection(np.zeros((1, 16, 8, 1), np.float32), 8)
