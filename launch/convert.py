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
The work is `rewarddance_jax.weights.convert.run`.
"""

from __future__ import annotations

import json

from absl import flags

from launch import cli
from rewarddance_jax import logs
from rewarddance_jax.weights import convert

_FAMILY = flags.DEFINE_enum('family', None, sorted(convert.SPECS), 'Model family.')
_SRC = flags.DEFINE_string('src', None, 'diffusers / transformers model directory.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'launch.train checkpoints/ directory to export (flux only).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
_CACHE = flags.DEFINE_string('cache_dir', None, 'Converted-weights cache directory.')
_EXPORT = flags.DEFINE_string('export', None, 'Write the diffusers layout here.')
_EXPORT_DTYPE = flags.DEFINE_enum('export_dtype', 'float32', sorted(convert.DTYPES),
                                  'Exported dtype.')
_SCAN = flags.DEFINE_boolean('scan_layers', None, 'flux: stack layers for lax.scan.')
_PARAM_DTYPE = flags.DEFINE_string('param_dtype', None, 'Param dtype of the imported model.')
_SHARD_GB = flags.DEFINE_float('max_shard_gb', 5.0, 'Export shard size (GiB).')


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments {argv[1:]}')
  logs.quiet_libraries()
  overrides = {}
  if _SCAN.value is not None:
    if _FAMILY.value != 'flux':
      raise ValueError('--scan_layers applies to --family=flux only.')
    overrides['scan_layers'] = _SCAN.value
  if _PARAM_DTYPE.value:
    overrides['param_dtype'] = _PARAM_DTYPE.value
  summary = convert.run(_FAMILY.value, _SRC.value, checkpoint=_CHECKPOINT.value,
                        step=_STEP.value, cache_dir=_CACHE.value, export=_EXPORT.value,
                        export_dtype=convert.DTYPES[_EXPORT_DTYPE.value], overrides=overrides,
                        max_shard_bytes=int(_SHARD_GB.value * 2**30))
  print(json.dumps(summary))


if __name__ == '__main__':
  flags.mark_flags_as_required(['family'])
  cli.run(main)
