"""Scan sharding layouts for a TPU topology on this (CPU) host, through libtpu's compiler.

  python -m launch.scan_sharding --config=configs/digits/flow.py:runlocal --topology=v5e:2x2 \
      [--layouts=default|"1,-1,1:full:scan;2,2,1:none:noscan"] \
      [--step=flow|grpo|grpo_rollout|grpo_update|reward|latent_reward] \
      [--out=FILE.md]
  python -m launch.scan_sharding --config=configs/flux/grpo_flux_dev.py --topology=v5p:4x4x4 \
      --step=grpo

  1. The topology's chip must be known (`scan/layouts.CHIPS`), the layouts must parse and
     libtpu must load; otherwise one `error: ...` line and a non-zero exit.
  2. Each layout (MESH:REMAT:scan|noscan[:STEP[:RULES]], MESH over `config.mesh.axes`, one size
     may be -1) is compiled by `scan/layouts.scan_layouts`; 'default' is the config's
     `scan.candidates` when it has them, else `scan/layouts.default_layouts` for the topology's
     device count. `--step` sets the step of every layout that names none.
  3. The markdown table (sorted by roofline estimate) is printed and, with --out, written.
"""

import os

from absl import flags
from ml_collections import config_flags

from launch import cli
from rewarddance_jax import logs

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config).',
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', None, "libtpu topology, e.g. 'v5e:2x2', 'v5p:4x4x4'.")
_LAYOUTS = flags.DEFINE_string('layouts', 'default',
                               "'default' or 'MESH:REMAT:scan|noscan[:STEP];...', e.g. "
                               "'1,-1,1:full:scan;2,2,1:none:noscan'.")
_STEP = flags.DEFINE_string('step', None, "Step of layouts that name none: 'flow', 'grpo', "
                            "'grpo_rollout', 'grpo_update', 'reward', 'latent_reward' "
                            "(default: flow).")
_OUT = flags.DEFINE_string('out', None, 'Markdown file to write the table to.')
flags.mark_flags_as_required(['config', 'topology'])


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_libraries()
  # pylint: disable=import-outside-toplevel  # after flag parsing: jax start-up is slow
  from rewarddance_jax.parallel import aot
  from rewarddance_jax.scan import layouts as scanner

  topology = _TOPOLOGY.value
  scanner.chip_specs(topology)
  layouts = (None if _LAYOUTS.value.strip() == 'default'
             else scanner.parse_layouts(_LAYOUTS.value))
  if _STEP.value is not None and _STEP.value not in scanner.STEP_BUILDERS:
    raise ValueError(f'--step={_STEP.value!r} is not one of {sorted(scanner.STEP_BUILDERS)}.')
  if not aot.libtpu_available():
    raise ValueError(f'libtpu cannot compile for TPU here: {aot.libtpu_unavailable_reason()}')
  try:
    num_devices = len(aot.tpu_devices(topology))
  except Exception as e:  # pylint: disable=broad-except  # libtpu's text for a bad topology
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    raise ValueError(f'--topology={topology}: {lines[0] if lines else type(e).__name__}') from e
  try:
    config = _CONFIG.value
    config.get('trainer', None)
  except OSError as e:  # config_flags defers a failed load until first use
    detail = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    raise ValueError(f'--config={flags.FLAGS["config"].serialize().split("=", 1)[-1]}: '
                     f'{detail}') from e
  if layouts is None:
    candidates = config.get('scan', {}).get('candidates', None)
    try:
      layouts = (scanner.parse_layouts(candidates) if candidates
                 else scanner.default_layouts(num_devices))
    except ValueError as e:
      raise ValueError(f'config scan.candidates: {e}') from e
  if _STEP.value is not None:
    layouts = [dict(l, step=l.get('step', _STEP.value)) for l in layouts]

  rows = scanner.scan_layouts(config, topology, layouts)
  table = scanner.format_table(rows)
  print(f'{topology} ({num_devices} chips), {len(rows)} layouts:\n{table}')
  for r in rows:
    if r.get('error') is None:
      print(f'{r["layout"]}: lowered in {r["lower_seconds"]:.0f} s, compiled in '
            f'{r["compile_seconds"]:.0f} s; StableHLO {r["hlo_kib"]:.0f} KiB with '
            f'{r["while_loops"]} while loops')
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, 'w') as f:
      f.write(f'# Sharding scan: {topology}\n\n{table}\n')


if __name__ == '__main__':
  cli.run(main)
