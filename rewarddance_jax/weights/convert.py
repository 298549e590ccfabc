"""Import / cache / export in one call (what `python -m launch.convert` runs).

`run(family, src | checkpoint=..., cache_dir=..., export=...)` → summary dict:
  1. import public safetensors through the family's key map (or the converted-weights cache), or
     restore a generator trained here from a launch.train checkpoint (EMA when present);
  2. optionally export to the diffusers layout (flux, sd3, vae) in any float dtype.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from rewarddance_jax import checkpoint as ckpt_lib
from rewarddance_jax.models.generator import Generator, generator_config
from rewarddance_jax.parallel.trees import count_params
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel.sharding import DEFAULT_RULES
from rewarddance_jax.weights import cache, flux, loader, sd3, text, vae

SPECS = {'flux': flux.spec, 'sd3': sd3.spec, 'vae': vae.spec, 't5': text.t5_spec,
         'clip': text.clip_spec}
EXPORTERS = {'flux': flux.export, 'sd3': sd3.export, 'vae': vae.export}
DTYPES = {'float32': np.float32, 'bfloat16': jax.numpy.bfloat16, 'float16': np.float16}


def default_mesh():
  return mesh_lib.create_mesh(ml_collections.ConfigDict({'ici': (1, -1, 1)}))


def run(family: str, src: str | None = None, *, checkpoint: str | None = None,
        step: int | None = None, cache_dir: str | None = None, export: str | None = None,
        export_dtype=np.float32, overrides: dict | None = None, mesh=None,
        max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> dict:
  """Import (or restore a trained checkpoint), optionally cache and export; returns a summary."""
  if family not in SPECS:
    raise ValueError(f'unknown family {family!r}; choose one of {sorted(SPECS)}.')
  if (src is None) == (checkpoint is None):
    raise ValueError('give exactly one of --src (public weights) or --checkpoint (trained here).')
  if export and family not in EXPORTERS:
    raise ValueError(f'--export supports {sorted(EXPORTERS)}, not {family!r}.')
  mesh = mesh or default_mesh()
  start = time.time()
  summary = {'family': family}
  if checkpoint:
    if family != 'flux':
      raise ValueError('--checkpoint export supports the flux family only.')
    params, cfg = restore_trained(checkpoint, step, mesh)
    summary['checkpoint'] = checkpoint
  else:
    spec = SPECS[family](src, **(overrides or {}))
    cfg = spec.cfg
    if cache_dir:
      _, params, hit = cache.load_cached(spec, mesh, DEFAULT_RULES, cache_dir, progress=progress)
      summary['cache'] = 'hit' if hit else 'written'
    else:
      _, params = cache.load_model(spec, mesh, DEFAULT_RULES, progress=progress)
    summary['src'] = src
  jax.block_until_ready(params)
  summary['params'] = count_params(params)
  summary['load_s'] = round(time.time() - start, 2)
  if export:
    kw = dict(dtype=export_dtype)
    if family in ('flux', 'sd3'):
      kw['max_shard_bytes'] = max_shard_bytes
    files = EXPORTERS[family](params, cfg, export, **kw)
    summary['export'] = [os.path.basename(f) for f in files]
  return summary


def restore_trained(ckpt_dir: str, step: int | None, mesh):
  with ckpt_lib.Checkpointer(ckpt_dir, async_save=False) as ckpt:
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.all_steps():
      raise ValueError(f'no checkpoint step {step} in {ckpt_dir} (have {ckpt.all_steps()}).')
    config = ckpt.restore(step, json=('config',))['config']
    cfg = generator_config(config['model'])
    _, abstract = loader.abstract_params(lambda: Generator(cfg, rngs=nnx.Rngs(0)), mesh,
                                         DEFAULT_RULES)
    item = 'ema' if os.path.isdir(os.path.join(str(ckpt.step_directory(step)), 'ema')) else 'params'
    params = ckpt.restore(step, arrays={item: abstract})[item]
  return params, cfg
