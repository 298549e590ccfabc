"""Reward-training augmentation (data/augment.py): identity at zero strength, the warp's centre,
stroke width on a hand-made image, noise scale, reproducibility, and the trainer's key check."""

import numpy as np
import pytest

from rewarddance_jax.data import augment, digits
from rewarddance_jax.train import vlm_reward

OFF = dict(rotate_deg=0.0, scale=0.0, shift=0.0, stroke_prob=0.0, blur_prob=0.0,
           blur_sigma_max=0.0, noise_max=0.0)


def _real(n=8):
  return digits.load_split('train')['images'][:n]


def _centre_of_mass(image):
  ys, xs = np.mgrid[:image.shape[0], :image.shape[1]]
  m = image.sum()
  return np.array([(ys * image).sum() / m, (xs * image).sum() / m])


def test_zero_strength_is_identity():
  images = _real()
  out = augment.digit_augment(np.random.default_rng(0), images, **OFF)
  np.testing.assert_allclose(out, images, atol=1e-6)
  assert out.dtype == np.float32


def test_rotation_and_zoom_turn_about_the_image_centre():
  # A 2×2 blob on pixels 7..8 is centred on (7.5, 7.5), the centre of a 16×16 image: any
  # rotation or zoom about that centre leaves its centre of mass there (a warp about pixel 8,
  # or about the corner, would move it).
  image = np.zeros((1, 16, 16, 1), np.float32)
  image[0, 7:9, 7:9, 0] = 1.0
  for kw in (dict(rotate_deg=45.0), dict(scale=0.3)):
    for seed in range(4):
      out = augment.digit_augment(np.random.default_rng(seed), image, **(OFF | kw))
      assert out.sum() > 0.5
      np.testing.assert_allclose(_centre_of_mass(out[0, ..., 0]), [7.5, 7.5], atol=1e-4)


def test_shift_moves_the_blob_by_at_most_shift_pixels():
  image = np.zeros((1, 16, 16, 1), np.float32)
  image[0, 7:9, 7:9, 0] = 1.0
  moved = []
  for seed in range(8):
    out = augment.digit_augment(np.random.default_rng(seed), image, **(OFF | dict(shift=1.0)))
    delta = _centre_of_mass(out[0, ..., 0]) - 7.5
    assert np.all(np.abs(delta) <= 1.0 + 1e-4)
    moved.append(np.abs(delta).max())
  assert max(moved) > 0.1


def test_stroke_width_dilates_or_erodes_a_single_pixel():
  # One lit pixel: a 2×2 dilation lights 4 pixels, a 2×2 erosion lights none.
  image = np.zeros((1, 16, 16, 1), np.float32)
  image[0, 5, 9, 0] = 1.0
  lit = set()
  for seed in range(12):
    out = augment.digit_augment(np.random.default_rng(seed), image, **(OFF | dict(stroke_prob=1.0)))
    lit.add(int((out > 0.5).sum()))
  assert lit == {0, 4}


def test_blur_spreads_mass_and_noise_has_the_drawn_scale():
  image = np.zeros((1, 16, 16, 1), np.float32)
  image[0, 8, 8, 0] = 1.0
  out = augment.digit_augment(np.random.default_rng(0), image,
                              **(OFF | dict(blur_prob=1.0, blur_sigma_max=0.8)))
  assert out[0, 8, 8, 0] < 1.0 and (out > 1e-3).sum() > 1
  np.testing.assert_allclose(out.sum(), 1.0, atol=1e-3)
  # Noise on a mid-grey image (no clipping): the pixel std is the drawn s ≤ noise_max.
  grey = np.full((64, 16, 16, 1), 0.5, np.float32)
  out = augment.digit_augment(np.random.default_rng(1), grey, **(OFF | dict(noise_max=0.15)))
  stds = out.reshape(64, -1).std(axis=1)
  assert stds.max() <= 0.15 * 1.1 and stds.min() < 0.05 and stds.max() > 0.1


def test_defaults_are_reproducible_and_in_range():
  images = _real(16)
  a = augment.digit_augment(np.random.default_rng(3), images)
  b = augment.digit_augment(np.random.default_rng(3), images)
  c = augment.digit_augment(np.random.default_rng(4), images)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.shape == images.shape and a.min() >= 0.0 and a.max() <= 1.0
  with pytest.raises(ValueError, match='N, H, W, 1'):
    augment.digit_augment(np.random.default_rng(0), images[..., 0])


def test_pair_batches_reject_an_unknown_augment_key():
  split = digits.load_split('train')
  prompters = {'pointwise': None}
  with pytest.raises(ValueError,
                     match=r"config.reward_model.augment has unknown key\(s\) \['rotation'\]"):
    vlm_reward.PairBatches(split['images'], split['labels'], prompters, batch_size=4, seed=0,
                           graded_fraction=0.0, augment={'rotation': 10.0})
