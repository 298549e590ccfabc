"""Tests for rewarddance_jax.judge and launch/evaluate.py: the independent digits judge."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rewarddance_jax import judge as judge_lib
from rewarddance_jax.data import digits
from rewarddance_jax.data import samples

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('judge_cache'))


@pytest.fixture(scope='module')
def judge(cache_dir):
  return judge_lib.DigitJudge.load_or_train(cache_dir)


@pytest.fixture(scope='module')
def heldout():
  return digits.load_split('heldout')


def _write_samples(path, images, labels):
  return samples.save_samples(path, images, labels, [digits.prompt_for_label(l) for l in labels])


def test_heldout_accuracy(judge, heldout):
  assert judge.accuracy(heldout['images'], heldout['labels']) >= 0.95
  proba = judge.predict_proba(heldout['images'])
  assert proba.shape == (len(heldout['labels']), 10)
  np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)


def test_robust_to_faint_noise(judge, heldout):
  # Border pixels are ~0 in real digits; a std floor keeps faint generator noise harmless.
  noise = np.random.default_rng(0).normal(0, 0.05, heldout['images'].shape)
  noisy = np.clip(heldout['images'] + noise, 0, 1)
  assert judge.accuracy(noisy, heldout['labels']) >= 0.9


def test_numpy_prediction_equals_sklearn(heldout):
  clf, arrays = judge_lib.train_sklearn()
  x = heldout['images'].reshape(len(heldout['labels']), -1)
  x = (x - arrays['mean']) / arrays['scale']
  numpy_judge = judge_lib.DigitJudge(arrays)
  np.testing.assert_array_equal(numpy_judge.predict(heldout['images']), clf.predict(x))
  np.testing.assert_allclose(numpy_judge.predict_proba(heldout['images']), clf.predict_proba(x),
                             atol=1e-5)


def test_cache_round_trip_without_pickle(judge, cache_dir, heldout):
  files = [f for f in os.listdir(cache_dir) if f.endswith('.npz')]
  assert files == [f'judge-{judge_lib.JUDGE_VERSION}-{judge_lib.cache_key()}.npz']
  with np.load(os.path.join(cache_dir, files[0]), allow_pickle=False) as data:
    assert {'mean', 'scale', 'classes', 'coef_0', 'intercept_0'} <= set(data.files)
  reloaded = judge_lib.DigitJudge.load_or_train(cache_dir)
  np.testing.assert_array_equal(reloaded.predict_proba(heldout['images']),
                                judge.predict_proba(heldout['images']))


def test_corrupt_cache_is_retrained(judge, monkeypatch, tmp_path):
  path = tmp_path / f'judge-{judge_lib.JUDGE_VERSION}-{judge_lib.cache_key()}.npz'
  path.write_bytes(b'garbage')
  arrays = {'mean': judge.mean, 'scale': judge.scale, 'classes': judge.classes}
  for i, (w, b) in enumerate(zip(judge.coefs, judge.intercepts)):
    arrays[f'coef_{i}'], arrays[f'intercept_{i}'] = w, b
  # Stand-in for the real fit (tested above) to keep the test fast.
  monkeypatch.setattr(judge_lib, 'train_sklearn', lambda: (None, arrays))
  retrained = judge_lib.DigitJudge.load_or_train(tmp_path)
  np.testing.assert_array_equal(retrained.coefs[0], judge.coefs[0])
  with np.load(path, allow_pickle=False) as data:  # Overwritten with a valid cache.
    np.testing.assert_array_equal(data['coef_0'], judge.coefs[0])
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # No temporary files left.


def test_cache_dir_from_env(monkeypatch, tmp_path):
  monkeypatch.setenv(judge_lib.CACHE_ENV_VAR, str(tmp_path / 'env'))
  assert judge_lib.resolve_cache_dir() == str(tmp_path / 'env')
  assert judge_lib.resolve_cache_dir(tmp_path / 'arg') == str(tmp_path / 'arg')
  monkeypatch.delenv(judge_lib.CACHE_ENV_VAR)
  assert judge_lib.resolve_cache_dir() == os.path.expanduser('~/.cache/rewarddance_jax')


def test_other_sizes_resized_and_channels_checked(judge, heldout):
  images = heldout['images'][:64]
  big = digits.resize_bilinear(images, 32)
  assert np.mean(judge.predict(big) == judge.predict(images)) >= 0.9
  with pytest.raises(ValueError, match='1-channel'):
    judge.predict(np.repeat(images, 3, axis=-1))


def test_evaluate_samples(judge, cache_dir, heldout, tmp_path):
  path = _write_samples(tmp_path / 's.npz', heldout['images'], heldout['labels'])
  result = judge_lib.evaluate_samples(path, cache_dir=cache_dir)
  assert result['n'] == len(heldout['labels'])
  assert result['accuracy'] == pytest.approx(judge.accuracy(heldout['images'], heldout['labels']))
  assert sorted(result['per_class']) == list(range(10))


def _run_evaluate(*args, cache_dir):
  env = dict(os.environ, RDJ_CACHE_DIR=cache_dir)
  return subprocess.run([sys.executable, '-m', 'launch.evaluate', *args], cwd=_REPO, env=env,
                        capture_output=True, text=True, timeout=120, check=False)


def test_launch_evaluate_real_shuffled_and_bad(cache_dir, heldout, tmp_path, judge):
  del judge  # Trains the cached judge once, before the subprocesses.
  real = _write_samples(tmp_path / 'real.npz', heldout['images'], heldout['labels'])
  shuffled_labels = np.random.default_rng(0).permutation(heldout['labels'])
  shuffled = _write_samples(tmp_path / 'shuffled.npz', heldout['images'], shuffled_labels)

  json_out = tmp_path / 'result.json'
  proc = _run_evaluate(f'--samples={real}', f'--json_out={json_out}', cache_dir=cache_dir)
  assert proc.returncode == 0, proc.stderr
  assert 'accuracy=' in proc.stdout
  result = json.loads(json_out.read_text())
  assert result['accuracy'] >= 0.95 and result['n'] == len(heldout['labels'])
  assert len(result['per_class']) == 10

  proc = _run_evaluate(f'--samples={shuffled}', f'--json_out={json_out}', cache_dir=cache_dir)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(json_out.read_text())['accuracy'] < 0.3

  bad = tmp_path / 'bad.npz'
  np.savez(bad, images=heldout['images'][:4], labels=np.arange(4))
  proc = _run_evaluate(f'--samples={bad}', cache_dir=cache_dir)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'bad.npz' in lines[0] and 'prompts' in lines[0], proc.stderr
