"""Converted-weights cache: the first load converts safetensors and saves an Orbax checkpoint,
later loads restore it straight into the target shardings (any mesh).

Cache entry: `<cache_dir>/<family>-<key hash>/0/{params, meta}` (the project's `Checkpointer`).
The key (also stored as the `meta` JSON item and compared on every load) covers
  1. the family and the model id (the source directory, absolute),
  2. a fingerprint of the source files (name, size, mtime of every safetensors / config file),
  3. the param layout: every target path with its shape and dtype (param dtype and scan flag
     included), and the converter version.
Any mismatch means a fresh conversion; a stale entry in the same place is replaced.
`load_model(spec, mesh, rules, cache_dir=...)` is what the families call: through the cache when
`cache_dir` is set, else straight from safetensors (`loader.load_spec`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil

import jax
from absl import logging
from flax import nnx

from rewarddance_jax.checkpoint import Checkpointer
from rewarddance_jax.weights import loader
from rewarddance_jax.weights.spec import ModelSpec

VERSION = 1


def _fingerprint(source: str) -> list:
  root = source if os.path.isdir(source) else os.path.dirname(source)
  files = [source] if os.path.isfile(source) else sorted(
      glob.glob(os.path.join(root, '*.safetensors')) + glob.glob(os.path.join(root, '*.json')))
  return [[os.path.basename(f), os.path.getsize(f), int(os.path.getmtime(f))] for f in files]


def cache_meta(spec: ModelSpec, abstract: dict) -> dict:
  layout = sorted([loader.path_str(p), list(a.shape), str(a.dtype)]
                  for p, a in loader.flatten(abstract).items())
  return {'version': VERSION, 'family': spec.family, 'model_id': os.path.abspath(spec.source),
          'files': _fingerprint(spec.source), 'layout': layout}


def cache_path(cache_dir: str, spec: ModelSpec, meta: dict) -> str:
  digest = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
  return os.path.join(os.path.abspath(cache_dir), f'{spec.family}-{digest}')


def load_cached(spec: ModelSpec, mesh, sharding_rules, cache_dir: str, *,
                progress: bool = False) -> tuple[nnx.GraphDef, dict, bool]:
  """(graphdef, params, from_cache): restores the cache entry if valid, else converts + saves."""
  graphdef, abstract = loader.abstract_params(spec.factory, mesh, sharding_rules)
  meta = cache_meta(spec, abstract)
  path = cache_path(cache_dir, spec, meta)
  if os.path.isdir(path):
    try:
      with Checkpointer(path, max_to_keep=1, async_save=False) as ckpt:
        if ckpt.latest_step() == 0:
          saved = ckpt.restore(0, json=('meta',))['meta']
          if saved == meta:
            params = ckpt.restore(0, arrays={'params': abstract})['params']
            logging.info('weights cache hit: %s', path)
            return graphdef, params, True
          logging.warning('weights cache %s is stale (model id, files or layout changed).', path)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
      logging.warning('weights cache %s unreadable (%s); converting again.', path, e)
    shutil.rmtree(path)
  params = loader.load_spec(spec, abstract, progress=progress)
  with Checkpointer(path, max_to_keep=1, async_save=False) as ckpt:
    ckpt.save(0, arrays={'params': params}, json={'meta': meta}, force=True)
  jax.block_until_ready(params)
  return graphdef, params, False


def load_model(spec: ModelSpec, mesh, sharding_rules, *, cache_dir: str | None = None,
               progress: bool = False) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, params placed in their shardings) for `spec`; through the cache if `cache_dir`."""
  if cache_dir:
    graphdef, params, _ = load_cached(spec, mesh, sharding_rules, cache_dir, progress=progress)
    return graphdef, params
  graphdef, abstract = loader.abstract_params(spec.factory, mesh, sharding_rules)
  return graphdef, loader.load_spec(spec, abstract, progress=progress)
