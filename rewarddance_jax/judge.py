"""The independent digits judge: prompt-alignment accuracy of generated samples.

No reward model ever sees this classifier (docs/design.md §8, step 4); it only scores samples. It:

1. trains a scikit-learn `MLPClassifier` (one hidden ReLU layer, fixed `random_state`) on the real
   digits TRAIN split at 16x16, on pixels standardised per pixel with a floor on the std. The
   floor matters: border pixels are almost always 0 in real digits (std ~1e-3), so plain
   standardisation turns faint generator noise there into 100-sigma inputs and the judge
   collapses (held-out accuracy under N(0, 0.05) pixel noise drops from 98% to ~50%);
2. stores the learned arrays (scaler mean/scale, layer weights and biases) in an `.npz`, never a
   pickle, under a cache dir (argument, else `$RDJ_CACHE_DIR`, else `~/.cache/rewarddance_jax`),
   in a file keyed by a hash of the training data, the classifier settings and `JUDGE_VERSION`;
   any change to those trains a new judge instead of reusing a stale one;
3. predicts with numpy from those arrays (the same forward pass as scikit-learn's), resizing
   images of another size to 16x16 with the shared bilinear resize of `data/digits.py`;
4. scores a samples file (`data/samples.py`): accuracy of the predicted digit against the prompted
   label, overall and per prompted class.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
import zipfile
from typing import Any

import numpy as np

from rewarddance_jax.data import digits
from rewarddance_jax.data import samples as samples_lib

JUDGE_VERSION = 'digits-mlp-v1'
CACHE_ENV_VAR = 'RDJ_CACHE_DIR'
DEFAULT_CACHE_DIR = os.path.join('~', '.cache', 'rewarddance_jax')

# Classifier settings (part of the cache key). 98% held-out accuracy, ~1 s to train on 2 cores.
JUDGE_SETTINGS: dict[str, Any] = {
    'hidden_layer_sizes': [128],
    'alpha': 1e-2,
    'max_iter': 500,
    'random_state': 0,
    'std_floor': 0.2,
    'split_seed': 0,
    'image_size': digits.IMAGE_SIZE,
}


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> str:
  """Argument, else $RDJ_CACHE_DIR, else ~/.cache/rewarddance_jax."""
  if cache_dir:
    return os.path.expanduser(os.fspath(cache_dir))
  return os.path.expanduser(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR)


def _training_data() -> tuple[np.ndarray, np.ndarray]:
  data = digits.load_split('train', seed=JUDGE_SETTINGS['split_seed'])
  return data['images'].reshape(len(data['labels']), -1), data['labels']


def cache_key() -> str:
  """Hash of (version, settings, training pixels, training labels)."""
  x, y = _training_data()
  h = hashlib.sha256()
  h.update(JUDGE_VERSION.encode())
  h.update(json.dumps(JUDGE_SETTINGS, sort_keys=True).encode())
  h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
  h.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
  return h.hexdigest()[:20]


def train_sklearn() -> tuple[Any, dict[str, np.ndarray]]:
  """Fits the classifier; returns (the sklearn model, the arrays that define the judge)."""
  # Lazy: only the first run trains. threadpoolctl ships with scikit-learn.
  import threadpoolctl  # pylint: disable=g-import-not-at-top
  from sklearn import exceptions, neural_network  # pylint: disable=g-import-not-at-top

  x, y = _training_data()
  # float32 end to end: scikit-learn keeps the input dtype, so the stored arrays and the numpy
  # forward pass below reproduce its predictions exactly.
  x = x.astype(np.float32)
  mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
  scale = np.maximum(x.std(axis=0, dtype=np.float64), JUDGE_SETTINGS['std_floor']).astype(
      np.float32)
  clf = neural_network.MLPClassifier(
      hidden_layer_sizes=tuple(JUDGE_SETTINGS['hidden_layer_sizes']),
      alpha=JUDGE_SETTINGS['alpha'], max_iter=JUDGE_SETTINGS['max_iter'],
      random_state=JUDGE_SETTINGS['random_state'])
  # One BLAS thread: the matrices are tiny, and on a busy 2-core machine more threads made the
  # fit several times slower. The settings converge (83 epochs), so a ConvergenceWarning would
  # only be noise.
  with threadpoolctl.threadpool_limits(1), warnings.catch_warnings():
    warnings.simplefilter('ignore', exceptions.ConvergenceWarning)
    clf.fit((x - mean) / scale, y)
  if clf.out_activation_ != 'softmax' or clf.activation != 'relu':
    raise RuntimeError('judge expects a ReLU MLP with a softmax output')
  arrays = {'mean': mean, 'scale': scale, 'classes': clf.classes_.astype(np.int64)}
  for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
    arrays[f'coef_{i}'] = w
    arrays[f'intercept_{i}'] = b
  return clf, arrays


class DigitJudge:
  """A 16x16 digit classifier held as plain numpy arrays (no pickle, no scikit-learn at use)."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    n_layers = sum(1 for k in arrays if k.startswith('coef_'))
    if n_layers < 1:
      raise ValueError('judge arrays hold no layers')
    # float32, as trained: the numpy forward pass then matches scikit-learn's predictions.
    self.mean = np.asarray(arrays['mean'], dtype=np.float32)
    self.scale = np.asarray(arrays['scale'], dtype=np.float32)
    self.classes = np.asarray(arrays['classes'], dtype=np.int64)
    self.coefs = [np.asarray(arrays[f'coef_{i}'], dtype=np.float32) for i in range(n_layers)]
    self.intercepts = [np.asarray(arrays[f'intercept_{i}'], dtype=np.float32)
                       for i in range(n_layers)]
    n_pixels = digits.IMAGE_SIZE * digits.IMAGE_SIZE
    if self.mean.shape != (n_pixels,) or self.coefs[0].shape[0] != n_pixels:
      raise ValueError(f'judge arrays expect {self.coefs[0].shape[0]} inputs, not {n_pixels}')

  @classmethod
  def load_or_train(cls, cache_dir: str | os.PathLike[str] | None = None) -> 'DigitJudge':
    """Loads the cached judge for the current key, or trains and caches it."""
    directory = resolve_cache_dir(cache_dir)
    path = os.path.join(directory, f'judge-{JUDGE_VERSION}-{cache_key()}.npz')
    if os.path.isfile(path):
      try:
        with np.load(path, allow_pickle=False) as data:
          return cls({k: data[k] for k in data.files})
      except (ValueError, KeyError, OSError, zipfile.BadZipFile, EOFError) as e:
        # A damaged cache is only a cache: retrain and overwrite it.
        logging.warning('judge cache %s unreadable (%s); retraining', path, e)
    _, arrays = train_sklearn()
    judge = cls(arrays)
    try:
      os.makedirs(directory, exist_ok=True)
      fd, tmp_path = tempfile.mkstemp(suffix='.npz', dir=directory)
      try:
        with os.fdopen(fd, 'wb') as f:
          np.savez(f, **arrays)
        os.replace(tmp_path, path)  # Atomic: concurrent processes never read a partial file.
      finally:
        if os.path.exists(tmp_path):
          os.remove(tmp_path)
    except OSError as e:
      logging.warning('could not write judge cache %s (%s); using the in-memory judge', path, e)
    return judge

  def _features(self, images: Any) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4:
      raise ValueError(f'judge expects images shaped (N, H, W, 1), got shape {images.shape}')
    if images.shape[-1] != 1:
      raise ValueError(f'judge expects 1-channel (grey) images, got {images.shape[-1]} channels '
                       f'in shape {images.shape}')
    if images.size and not np.all(np.isfinite(images)):
      raise ValueError('judge got images with NaN or inf values')
    images = digits.resize_bilinear(images, digits.IMAGE_SIZE)
    x = images.reshape(images.shape[0], -1)
    return (x - self.mean) / self.scale

  def predict_proba(self, images: Any) -> np.ndarray:
    """Class probabilities (N, 10) for images (N, H, W, 1) in [0, 1]."""
    h = self._features(images)
    for i, (w, b) in enumerate(zip(self.coefs, self.intercepts)):
      h = h @ w + b
      if i < len(self.coefs) - 1:
        h = np.maximum(h, 0.0)
    h -= h.max(axis=1, keepdims=True)
    p = np.exp(h)
    return p / p.sum(axis=1, keepdims=True)

  def predict(self, images: Any) -> np.ndarray:
    """Predicted digit labels (N,) int64."""
    return self.classes[np.argmax(self.predict_proba(images), axis=1)]

  def accuracy(self, images: Any, labels: Any) -> float:
    """Fraction of images classified as their label."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) == 0:
      return float('nan')
    return float(np.mean(self.predict(images) == labels))


def evaluate_samples(path: str | os.PathLike[str],
                     cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
  """Scores a samples file: dict(accuracy, n, per_class {digit: accuracy}) over prompted labels."""
  data = samples_lib.load_samples(path)
  labels = data['labels']
  if len(labels) == 0:
    raise ValueError(f'{os.fspath(path)}: samples file holds no samples')
  try:
    predicted = DigitJudge.load_or_train(cache_dir).predict(data['images'])
  except ValueError as e:
    raise ValueError(f'{os.fspath(path)}: key "images": {e}') from e
  correct = predicted == labels
  per_class = {int(c): float(np.mean(correct[labels == c])) for c in np.unique(labels)}
  return {'accuracy': float(np.mean(correct)), 'n': int(len(labels)), 'per_class': per_class}
