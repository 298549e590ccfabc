"""Tests for rewarddance_jax.data.samples: the samples .npz format shared by trainers and judge."""

import numpy as np
import pytest

from rewarddance_jax.data import samples


def _arrays(n=4, size=16):
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(n, size, size, 1)).astype(np.float32)
  labels = np.arange(n) % 10
  prompts = [f'a handwritten digit {i}' for i in range(n)]
  return images, labels, prompts


def test_round_trip_without_pickle(tmp_path):
  images, labels, prompts = _arrays()
  path = samples.save_samples(tmp_path / 'out' / 's.npz', images, labels, prompts)
  with np.load(path, allow_pickle=False) as raw:
    assert raw['images'].dtype == np.float32 and raw['labels'].dtype == np.int64
    assert raw['prompts'].dtype.kind == 'U'
  loaded = samples.load_samples(path)
  np.testing.assert_array_equal(loaded['images'], images)
  np.testing.assert_array_equal(loaded['labels'], labels)
  assert loaded['prompts'].tolist() == prompts


def test_save_appends_extension_and_rejects_bad_range(tmp_path):
  images, labels, prompts = _arrays()
  assert samples.save_samples(tmp_path / 's', images, labels, prompts).endswith('s.npz')
  with pytest.raises(ValueError, match=r'bad.npz: key "images" has values outside \[0, 1\]'):
    samples.save_samples(tmp_path / 'bad.npz', images * 2 - 1, labels, prompts)
  assert not (tmp_path / 'bad.npz').exists()


def _raw(path, **arrays):
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize('case,match', [
    ('missing_key', r'missing key "prompts"'),
    ('rank', r'key "images" must have rank 4'),
    ('range', r'key "images" has values outside \[0, 1\]'),
    ('nan', r'key "images" contains NaN'),
    ('length', r'length mismatch'),
    ('labels_float', r'key "labels" must hold integers'),
    ('object', r'key "prompts" cannot be read without pickle'),
])
def test_load_errors_name_file_and_key(tmp_path, case, match):
  images, labels, prompts = _arrays()
  prompts = np.asarray(prompts)
  arrays = {'images': images, 'labels': labels, 'prompts': prompts}
  if case == 'missing_key':
    del arrays['prompts']
  elif case == 'rank':
    arrays['images'] = images[..., 0]
  elif case == 'range':
    arrays['images'] = images + 1.0
  elif case == 'nan':
    arrays['images'] = np.where(images > 0.5, np.nan, images).astype(np.float32)
  elif case == 'length':
    arrays['labels'] = labels[:3]
  elif case == 'labels_float':
    arrays['labels'] = labels.astype(np.float32)
  elif case == 'object':
    arrays['prompts'] = np.asarray(list(prompts), dtype=object)
  path = _raw(tmp_path / f'{case}.npz', **arrays)
  with pytest.raises(ValueError, match=match) as info:
    samples.load_samples(path)
  assert f'{case}.npz' in str(info.value) and '\n' not in str(info.value)


def test_load_missing_and_not_npz(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothing.npz'):
    samples.load_samples(tmp_path / 'nothing.npz')
  junk = tmp_path / 'junk.npz'
  junk.write_bytes(b'not a zip at all')
  with pytest.raises(ValueError, match='junk.npz: not a valid samples .npz'):
    samples.load_samples(junk)
  single = tmp_path / 'single.npy'
  np.save(single, np.zeros(3))
  with pytest.raises(ValueError, match='single.npy: not an .npz archive'):
    samples.load_samples(single)
