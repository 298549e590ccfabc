"""safetensors on disk: header index, per-file streaming reads, sharded writes with an index json.

A source is a `.safetensors` file or a directory holding either one `*.safetensors` file or a
sharded checkpoint (`<name>.safetensors.index.json` with a `weight_map` key → file name). Only
headers are read to index it; tensors are read one at a time (optionally one slice) with
`safe_open(framework='numpy')`, so no torch and no pickle. bf16 arrives as ml_dtypes.bfloat16.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from rewarddance_jax.weights import json_file


@dataclass(frozen=True)
class TensorInfo:
  file: str
  shape: tuple
  dtype: str


def open_file(path: str, framework: str = 'numpy'):
  """`safe_open(path)`; a file that is not safetensors (a garbled header, a truncated file)
  raises one line naming it."""
  try:
    return safe_open(path, framework=framework)
  except SafetensorError as e:
    raise ValueError(f'{path}: not a readable safetensors file ({e}).') from None


def read_all(path: str) -> dict[str, np.ndarray]:
  """Every tensor of one safetensors file, as NumPy arrays."""
  with open_file(path) as f:
    return {key: f.get_tensor(key) for key in f.keys()}


def _files_of(source: str, prefer: str | None = None) -> list[str]:
  """The safetensors files of `source` (a file, or a directory; `prefer` picks a file stem)."""
  if os.path.isfile(source):
    if not source.endswith('.safetensors'):
      raise ValueError(f'{source} is not a .safetensors file (weights load from safetensors only).')
    return [source]
  if not os.path.isdir(source):
    raise FileNotFoundError(f'weights source {source} does not exist.')
  indexes = sorted(glob.glob(os.path.join(source, '*.safetensors.index.json')))
  if prefer:
    indexes = [p for p in indexes if os.path.basename(p).startswith(prefer)] or indexes
  if len(indexes) > 1:
    raise ValueError(f'{source} holds several index files {[os.path.basename(p) for p in indexes]}.')
  if indexes:
    weight_map = json_file.read(indexes[0]).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ValueError(f'{indexes[0]} has no "weight_map" object.')
    files = sorted(set(weight_map.values()))
    paths = [os.path.join(source, name) for name in files]
    absent = [p for p in paths if not os.path.isfile(p)]
    if absent:
      raise FileNotFoundError(f'{indexes[0]} names missing shard file(s): {absent}')
    return paths
  files = sorted(glob.glob(os.path.join(source, '*.safetensors')))
  if prefer:
    files = [p for p in files if os.path.basename(p).startswith(prefer)] or files
  if not files:
    raise FileNotFoundError(f'{source} holds no .safetensors file (pickle .bin is not read).')
  if len(files) > 1:
    raise ValueError(f'{source} holds several .safetensors files and no index json: '
                     f'{[os.path.basename(p) for p in files]}')
  return files


def index(source: str, prefer: str | None = None) -> dict[str, TensorInfo]:
  """{key: TensorInfo} from the headers of every file of `source` (no tensor data is read)."""
  out: dict[str, TensorInfo] = {}
  for path in _files_of(source, prefer):
    with open_file(path) as f:
      for key in f.keys():
        if key in out:
          raise ValueError(f'key {key} appears in both {out[key].file} and {path}.')
        s = f.get_slice(key)
        out[key] = TensorInfo(path, tuple(s.get_shape()), s.get_dtype())
  return out


def stream(infos: Mapping[str, TensorInfo], wanted: Mapping[str, list]
           ) -> Iterator[tuple[str, object, list]]:
  """Yields (key, slice_reader, wanted[key]) file by file; `slice_reader[idx]` reads a numpy slice.

  Only one file is open at a time; callers read what they need and drop it before the next key.
  """
  by_file: dict[str, list[str]] = {}
  for key in wanted:
    by_file.setdefault(infos[key].file, []).append(key)
  for path in sorted(by_file):
    with open_file(path) as f:
      for key in sorted(by_file[path]):
        yield key, f.get_slice(key), wanted[key]


def write(tensors: Iterator[tuple[str, np.ndarray]], out_dir: str, name: str,
          max_shard_bytes: int = 5 * 2**30, metadata: Mapping[str, str] | None = None) -> list[str]:
  """Writes (key, array) pairs as `name.safetensors` or `name-0000i-of-0000n.safetensors` shards.

  Arrays are consumed in order and flushed as soon as a shard is full, so at most one shard is
  held in host memory. More than one shard gets `name.safetensors.index.json`.
  """
  os.makedirs(out_dir, exist_ok=True)
  meta = {'format': 'pt', **dict(metadata or {})}
  current: dict[str, np.ndarray] = {}
  size, total = 0, 0
  tmp_names = []

  def flush():
    nonlocal current, size
    if current:
      tmp = os.path.join(out_dir, f'{name}.part{len(tmp_names):05d}.safetensors')
      save_file(current, tmp, metadata=meta)
      tmp_names.append((tmp, list(current)))
      current, size = {}, 0

  for key, arr in tensors:
    arr = np.ascontiguousarray(arr)
    if key in current or any(key in keys for _, keys in tmp_names):
      raise ValueError(f'export wrote key {key} twice.')
    if current and size + arr.nbytes > max_shard_bytes:
      flush()
    current[key] = arr
    size += arr.nbytes
    total += arr.nbytes
  flush()
  n = len(tmp_names)
  if n == 1:
    final = os.path.join(out_dir, f'{name}.safetensors')
    os.replace(tmp_names[0][0], final)
    return [final]
  weight_map, finals = {}, []
  for i, (tmp, keys) in enumerate(tmp_names):
    final = os.path.join(out_dir, f'{name}-{i + 1:05d}-of-{n:05d}.safetensors')
    os.replace(tmp, final)
    finals.append(final)
    weight_map.update({k: os.path.basename(final) for k in keys})
  with open(os.path.join(out_dir, f'{name}.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  return finals
