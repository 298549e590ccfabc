"""Convert weights: import public safetensors, build the converted-weights cache, export back.

  # import (checks every key and shape), cache it as Orbax beside the workdir, print a summary:
  python -m launch.convert --family=flux --src=/models/FLUX.1-dev --cache_dir=/work/converted
  # import and export again (diffusers layout + config.json), e.g. to re-shard or to bf16:
  python -m launch.convert --family=flux --src=/models/FLUX.1-dev --export=/tmp/flux_out \
      --export_dtype=bfloat16
  # export a generator trained here (launch.train workdir; EMA params when the run kept them):
  python -m launch.convert --family=flux --checkpoint=/work/run/checkpoints --export=/tmp/aligned

Families: flux, sd3 (transformer), vae, t5, clip (text encoders; import/cache only). `--src` is a
model directory or a pipeline root (flux/sd3/vae pick their sub-folder). Progress bars on stderr.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from rewarddance_jax import checkpoint as ckpt_lib
from rewarddance_jax import logs
from rewarddance_jax.models.generator import Generator, generator_config
from rewarddance_jax.models.mmdit import param_count
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel.sharding import DEFAULT_RULES
from rewarddance_jax.weights import flux, loader, sd3, text, vae

SPECS = {'flux': flux.spec, 'sd3': sd3.spec, 'vae': vae.spec, 't5': text.t5_spec,
         'clip': text.clip_spec}
EXPORTERS = {'flux': flux.export, 'sd3': sd3.export, 'vae': vae.export}
DTYPES = {'float32': np.float32, 'bfloat16': jax.numpy.bfloat16, 'float16': np.float16}

_FAMILY = flags.DEFINE_enum('family', None, sorted(SPECS), 'Model family.')
_SRC = flags.DEFINE_string('src', None, 'diffusers / transformers model directory.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'launch.train checkpoints/ directory to export (flux only).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
_CACHE = flags.DEFINE_string('cache_dir', None, 'Converted-weights cache directory.')
_EXPORT = flags.DEFINE_string('export', None, 'Write the diffusers layout here.')
_EXPORT_DTYPE = flags.DEFINE_enum('export_dtype', 'float32', sorted(DTYPES), 'Exported dtype.')
_SCAN = flags.DEFINE_boolean('scan_layers', None, 'flux: stack layers for lax.scan.')
_PARAM_DTYPE = flags.DEFINE_string('param_dtype', None, 'Param dtype of the imported model.')
_SHARD_GB = flags.DEFINE_float('max_shard_gb', 5.0, 'Export shard size (GiB).')


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
    params, cfg = _restore_trained(checkpoint, step, mesh)
    summary['checkpoint'] = checkpoint
  else:
    spec = SPECS[family](src, **(overrides or {}))
    cfg = spec.cfg
    if cache_dir:
      from rewarddance_jax.weights import cache  # pylint: disable=g-import-not-at-top
      _, params, hit = cache.load_cached(spec, mesh, DEFAULT_RULES, cache_dir, progress=progress)
      summary['cache'] = 'hit' if hit else 'written'
    else:
      _, params = loader.load_model(spec, mesh, DEFAULT_RULES, progress=progress)
    summary['src'] = src
  jax.block_until_ready(params)
  summary['params'] = param_count(params)
  summary['load_s'] = round(time.time() - start, 2)
  if export:
    kw = dict(dtype=export_dtype)
    if family in ('flux', 'sd3'):
      kw['max_shard_bytes'] = max_shard_bytes
    files = EXPORTERS[family](params, cfg, export, **kw)
    summary['export'] = [os.path.basename(f) for f in files]
  return summary


def _restore_trained(ckpt_dir: str, step: int | None, mesh):
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  logs.quiet_libraries()
  overrides = {}
  if _SCAN.value is not None:
    if _FAMILY.value != 'flux':
      raise app.UsageError('--scan_layers applies to --family=flux only.')
    overrides['scan_layers'] = _SCAN.value
  if _PARAM_DTYPE.value:
    overrides['param_dtype'] = _PARAM_DTYPE.value
  try:
    summary = run(_FAMILY.value, _SRC.value, checkpoint=_CHECKPOINT.value, step=_STEP.value,
                  cache_dir=_CACHE.value, export=_EXPORT.value,
                  export_dtype=DTYPES[_EXPORT_DTYPE.value], overrides=overrides,
                  max_shard_bytes=int(_SHARD_GB.value * 2**30))
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  print(json.dumps(summary))


if __name__ == '__main__':
  flags.mark_flags_as_required(['family'])
  app.run(main)
