"""Tests for rewarddance_jax.data.digits: the 16x16 digits set, its split and its prompts."""

import jax
import numpy as np
import pytest

from rewarddance_jax.data import digits


def test_load_split_shapes_dtypes_and_range():
  train = digits.load_split('train')
  heldout = digits.load_split('heldout')
  assert train['images'].shape == (1437, 16, 16, 1) and train['images'].dtype == np.float32
  assert heldout['images'].shape == (360, 16, 16, 1)
  assert train['labels'].dtype == np.int32 and heldout['labels'].dtype == np.int32
  for split in (train, heldout):
    assert split['images'].min() >= 0.0 and split['images'].max() <= 1.0
    assert split['images'].max() > 0.9  # Really scaled from 0..16, not left at 0..1/16.


def test_split_is_stratified_disjoint_and_seeded():
  train, heldout = digits.load_split('train'), digits.load_split('heldout')
  counts = np.bincount(heldout['labels'], minlength=10)
  totals = counts + np.bincount(train['labels'], minlength=10)
  np.testing.assert_allclose(counts / totals, 0.2, atol=0.02)
  train_rows = {img.tobytes() for img in train['images']}
  assert not any(img.tobytes() in train_rows for img in heldout['images'][:50])
  again = digits.load_split('heldout', seed=0)
  np.testing.assert_array_equal(again['images'], heldout['images'])
  other = digits.load_split('heldout', seed=1)
  assert not np.array_equal(other['labels'], heldout['labels'])


def test_load_split_cached_and_read_only():
  a, b = digits.load_split('train'), digits.load_split('train')
  assert a['images'] is b['images']
  with pytest.raises(ValueError):
    a['images'][0, 0, 0, 0] = 1.0


def test_bad_split_names_it():
  with pytest.raises(ValueError, match='validation'):
    digits.load_split('validation')


def test_upsample_matches_jax_bilinear_and_accepts_shapes():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(3, 8, 8)).astype(np.float32)
  expected = np.asarray(jax.image.resize(x[..., None], (3, 16, 16, 1), 'linear'))
  np.testing.assert_allclose(digits.upsample_digits(x), np.clip(expected, 0, 1), atol=1e-6)
  np.testing.assert_array_equal(digits.upsample_digits(x.reshape(3, 64)), digits.upsample_digits(x))
  np.testing.assert_array_equal(digits.upsample_digits(x[..., None]), digits.upsample_digits(x))
  with pytest.raises(ValueError, match='divide raw digits by 16'):
    digits.upsample_digits(x * 16)
  with pytest.raises(ValueError, match='8x8'):
    digits.upsample_digits(np.zeros((2, 7, 7)))


def test_resize_bilinear_matches_jax_antialiased_downscale():
  x = np.random.default_rng(1).uniform(size=(2, 32, 24, 1)).astype(np.float32)
  expected = np.asarray(jax.image.resize(x, (2, 16, 16, 1), 'linear', antialias=True))
  np.testing.assert_allclose(digits.resize_bilinear(x, 16), expected, atol=1e-5)


def test_prompts_round_trip():
  assert digits.prompt_for_label(7) == 'a handwritten digit seven'
  assert digits.NUMBER_WORDS[0] == 'zero' and len(digits.NUMBER_WORDS) == 10
  for label in range(10):
    assert digits.label_from_prompt(digits.prompt_for_label(label)) == label
  assert digits.label_from_prompt('A clean handwritten digit NINE, please') == 9
  with pytest.raises(ValueError, match='a cat'):
    digits.label_from_prompt('a cat')
  with pytest.raises(ValueError):
    digits.prompt_for_label(10)
