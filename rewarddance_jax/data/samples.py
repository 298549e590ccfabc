"""The samples file: generated images with the labels and prompts they were asked for.

Every trainer writes its samples in this format and the judge (`rewarddance_jax/judge.py`,
`launch/evaluate.py`) reads it. The format is a plain `.npz`:

1. `images`: float32 (N, H, W, C) with values in [0, 1];
2. `labels`: int64 (N,), the digit each prompt asked for;
3. `prompts`: a fixed-width unicode array (N,), never an object array, so that
   `np.load(path, allow_pickle=False)` always works and a samples file can execute no code.

`save_samples` checks the arrays before writing (so a bad run fails where the bug is) and
`load_samples` checks them again after reading; every failure is a one-line `ValueError` that names
the file and the key.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

SAMPLE_KEYS = ('images', 'labels', 'prompts')


def _check(path: str, images: np.ndarray, labels: np.ndarray, prompts: np.ndarray) -> None:
  """Raises a one-line ValueError naming `path` and the key on any malformed array."""
  if images.ndim != 4:
    raise ValueError(
        f'{path}: key "images" must have rank 4 (N, H, W, C), got shape {images.shape}')
  if labels.ndim != 1:
    raise ValueError(f'{path}: key "labels" must have rank 1 (N,), got shape {labels.shape}')
  if prompts.ndim != 1:
    raise ValueError(f'{path}: key "prompts" must have rank 1 (N,), got shape {prompts.shape}')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{path}: key "labels" must hold integers, got dtype {labels.dtype}')
  if prompts.dtype.kind != 'U':
    raise ValueError(f'{path}: key "prompts" must be a unicode string array, got dtype '
                     f'{prompts.dtype}')
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f'{path}: key "images" must be floating point, got dtype {images.dtype}')
  n = images.shape[0]
  if labels.shape[0] != n or prompts.shape[0] != n:
    raise ValueError(f'{path}: length mismatch: "images" has {n} rows, "labels" '
                     f'{labels.shape[0]}, "prompts" {prompts.shape[0]}')
  if images.size:
    if not np.all(np.isfinite(images)):
      raise ValueError(f'{path}: key "images" contains NaN or inf')
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
      raise ValueError(f'{path}: key "images" has values outside [0, 1] (min {lo:.4g}, '
                       f'max {hi:.4g}); clip and rescale before saving')


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f'{type(error).__name__}: {text.splitlines()[0]}' if text else type(error).__name__


def save_samples(path: str | os.PathLike[str], images: Any, labels: Any,
                 prompts: Sequence[str] | np.ndarray) -> str:
  """Writes a samples file and returns its path (".npz" is appended by numpy when missing)."""
  path = os.fspath(path)
  if not path.endswith('.npz'):
    path += '.npz'
  images = np.asarray(images, dtype=np.float32)
  labels = np.asarray(labels)
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{path}: key "labels" must hold integers, got dtype {labels.dtype}')
  labels = labels.astype(np.int64)
  # np.asarray(list_of_str) would give an object array for mixed input; force unicode.
  prompts = np.asarray([str(p) for p in prompts], dtype=np.str_)
  _check(path, images, labels, prompts)
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  # Write-then-rename so that a reader never sees a half-written file.
  tmp_path = path + '.tmp.npz'
  np.savez(tmp_path, images=images, labels=labels, prompts=prompts)
  os.replace(tmp_path, path)
  return path


def load_samples(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads and validates a samples file: dict(images f32, labels int64, prompts str)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: samples file not found')
  try:
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
      raise ValueError(f'{path}: not an .npz archive (found a single array; use save_samples)')
    with loaded as data:
      missing = [k for k in SAMPLE_KEYS if k not in data.files]
      if missing:
        raise ValueError(f'{path}: missing key "{missing[0]}" (found {sorted(data.files)})')
      arrays = {}
      for key in SAMPLE_KEYS:
        try:
          arrays[key] = data[key]
        except ValueError as e:
          # An object array (pickled Python objects) is refused rather than executed.
          raise ValueError(f'{path}: key "{key}" cannot be read without pickle ({_first_line(e)})'
                          ) from e
  except ValueError as e:
    if str(e).startswith(f'{path}:'):
      raise
    raise ValueError(f'{path}: not a valid samples .npz ({_first_line(e)})') from e
  except (OSError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f'{path}: not a valid samples .npz ({_first_line(e)})') from e
  images, labels, prompts = arrays['images'], arrays['labels'], arrays['prompts']
  _check(path, images, labels, prompts)
  return {'images': images.astype(np.float32, copy=False),
          'labels': labels.astype(np.int64, copy=False),
          'prompts': prompts}
