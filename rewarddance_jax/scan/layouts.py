"""Scans sharding layouts of a jitted step for a TPU topology, on a CPU host (issue 8, item 1).

For each layout (mesh shape, remat policy, scan on/off) the step is built fully abstractly on the
compile-only devices of the topology, compiled through libtpu, and summarised as one table row:

  1. A step builder `STEP_BUILDERS[name](config, mesh) -> AbstractStep` (scan/step.py), the
     name a layout's 'step' key selects: 'flow' (the flow-matching train step, scan/flow.py),
     'grpo' (the whole GRPO iteration: rollout + reward + update), 'grpo_rollout' /
     'grpo_update' (the iteration's rollout and update alone, from the same functions the fused
     step composes) and 'reward' (the reward forward), all in scan/grpo.py, and 'latent_reward'
     (the DiNa-LRM / PAVRM train step, scan/latent_reward.py). Every argument is a sharded
     `jax.ShapeDtypeStruct`; the step is jitted as the trainer's loop jits it (state donated).
  2. `scan_layouts(config, topology, layouts)`: applies each layout's overrides to a copy of the
     config (`mesh` → the topology mesh, `remat` / `scan_layers` → `config.model`, `rules` → a
     `RULE_SETS` override of `config.sharding_rules`), builds the step
     on `aot.tpu_topology_mesh`, and compiles it with `aot.compile_report`. Any failure (a mesh that
     does not divide the device count, a compile error) becomes a row with the error's first line.
  3. Each row has per-chip memory (argument / temp / total GiB) against the chip's HBM (`CHIPS`),
     `resident` GiB (arrays of the iteration on the chips during a step that are not its
     arguments, `AbstractStep.resident`; 0 for a self-contained step), `fits` (total + resident
     ≤ 90% of HBM), XLA's `flops` and `bytes_accessed`, an analytic `model_flops`
     and a roofline estimate `max(model_flops / peak, bytes_accessed / bandwidth)` in ms. XLA's
     `cost_analysis` counts a `scan` body once, so with `scan_layers=True` its flops are about
     1/depth of the real ones; the roofline therefore uses the analytic model FLOPs per chip,
     6 · params · tokens / chips for a train step (attention's L² term is not counted). Bytes
     accessed are XLA's and are undercounted the same way for scanned layers; the estimate is a
     lower bound for ranking layouts, not a step time.
  4. Rows are sorted by estimate (error rows last); `format_table(rows)` renders markdown.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from rewarddance_jax import config_lib
from rewarddance_jax.parallel import aot
from rewarddance_jax.scan import flow, grpo, latent_reward
from rewarddance_jax.scan.step import AbstractStep

GIB = 2**30
HEADROOM = 0.9  # a layout fits when its per-chip total is at most this fraction of HBM

# Per-chip HBM (GiB), peak dense bf16 TFLOP/s and HBM bandwidth (GB/s), from the public Cloud TPU
# system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): v4 32 GiB,
# 275 TFLOP/s, 1200 GB/s; v5e 16 GiB, 197 TFLOP/s, 819 GB/s; v5p 95 GiB, 459 TFLOP/s,
# 2765 GB/s; v6e (Trillium) 32 GiB, 918 TFLOP/s, 1640 GB/s.
CHIPS = {
    'v4': dict(hbm_gib=32.0, peak_tflops=275.0, hbm_gbps=1200.0),
    'v5e': dict(hbm_gib=16.0, peak_tflops=197.0, hbm_gbps=819.0),
    'v5p': dict(hbm_gib=95.0, peak_tflops=459.0, hbm_gbps=2765.0),
    'v6e': dict(hbm_gib=32.0, peak_tflops=918.0, hbm_gbps=1640.0),
}
_CHIP_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6litepod': 'v6e', 'v6lite': 'v6e'}

LAYOUT_KEYS = ('mesh', 'remat', 'scan_layers', 'step', 'rules')

# Rule sets a layout may name ('rules' key): overrides of the config's sharding rules.
#   config: the config's rules unchanged.
#   fsdp_all: weights (embed / conv_out) sharded over data × fsdp, i.e. ZeRO-3 over every chip
#     of a data × fsdp mesh instead of replicating the weights over the data axis.
RULE_SETS = {
    'config': {},
    'fsdp_all': {'embed': ('fsdp', 'data'), 'conv_out': ('fsdp', 'data')},
}


# name -> builder(config, mesh) -> AbstractStep: the flow train step, the whole GRPO iteration
# (rollout + reward + update, `train/grpo_step.py`), its rollout and update alone (the same
# functions the fused step composes), the reward forward (scan/grpo.py) and the latent-reward
# train step (scan/latent_reward.py).
STEP_BUILDERS: dict[str, Callable[[Any, Any], AbstractStep]] = {
    'flow': flow.abstract_flow_train_step,
    'grpo': grpo.abstract_grpo_step,
    'grpo_rollout': grpo.abstract_grpo_rollout_step,
    'grpo_update': grpo.abstract_grpo_update_step,
    'reward': grpo.abstract_reward_step,
    'latent_reward': latent_reward.abstract_latent_reward_step,
}


def chip_specs(topology: str) -> dict[str, float]:
  """HBM GiB, peak bf16 TFLOP/s and HBM GB/s of one chip of `topology` (e.g. 'v5e:2x2')."""
  gen = topology.split(':', 1)[0].strip().lower()
  gen = _CHIP_ALIASES.get(gen, gen)
  if gen not in CHIPS:
    raise ValueError(f'topology {topology!r}: unknown TPU generation {gen!r}; '
                     f'known: {sorted(CHIPS)}.')
  return dict(CHIPS[gen], chip=gen)


def layout_label(layout: dict) -> str:
  """'1,-1,1:full:scan' style label (the launcher's `--layouts` syntax)."""
  mesh = ','.join(str(s) for s in layout.get('mesh', (1, -1, 1)))
  label = (f'{mesh}:{layout.get("remat", "none")}:'
           f'{"scan" if layout.get("scan_layers", False) else "noscan"}')
  step = layout.get('step', 'flow')
  rules = layout.get('rules', 'config')
  if rules != 'config':
    return f'{label}:{step}:{rules}'
  return label if step == 'flow' else f'{label}:{step}'


def parse_layouts(text: str) -> list[dict]:
  """Parses 'default' or 'MESH:REMAT:scan|noscan[:STEP[:RULES]];...' (MESH comma-separated
  sizes, STEP a `STEP_BUILDERS` key, RULES a `RULE_SETS` key)."""
  text = text.strip()
  if text == 'default':
    return default_layouts()
  layouts = []
  for item in filter(None, (s.strip() for s in text.split(';'))):
    parts = item.split(':')
    if len(parts) not in (3, 4, 5):
      raise ValueError(f'layout {item!r}: expected MESH:REMAT:scan|noscan[:STEP[:RULES]], e.g. '
                       '"1,-1,1:full:scan".')
    try:
      mesh = tuple(int(s) for s in parts[0].split(','))
    except ValueError:
      raise ValueError(f'layout {item!r}: mesh {parts[0]!r} must be comma-separated integers.'
                       ) from None
    if parts[2] not in ('scan', 'noscan'):
      raise ValueError(f'layout {item!r}: third field must be "scan" or "noscan".')
    layout = {'mesh': mesh, 'remat': parts[1], 'scan_layers': parts[2] == 'scan'}
    if len(parts) >= 4:
      if parts[3] not in STEP_BUILDERS:
        raise ValueError(f'layout {item!r}: unknown step {parts[3]!r}; '
                         f'known: {sorted(STEP_BUILDERS)}.')
      layout['step'] = parts[3]
    if len(parts) == 5:
      if parts[4] not in RULE_SETS:
        raise ValueError(f'layout {item!r}: unknown rule set {parts[4]!r}; '
                         f'known: {sorted(RULE_SETS)}.')
      layout['rules'] = parts[4]
    layouts.append(layout)
  if not layouts:
    raise ValueError(f'--layouts={text!r} names no layout.')
  return layouts


def default_layouts(num_devices: int | None = None) -> list[dict]:
  """Data / fsdp / tensor splits × remat none/full × scan on/off.

  With `num_devices`, meshes whose fixed axes do not divide it are dropped.
  """
  meshes = [(-1, 1, 1), (1, -1, 1), (2, -1, 1), (1, -1, 2)]
  out = []
  for mesh in meshes:
    fixed = math.prod(s for s in mesh if s != -1)
    if num_devices is not None and num_devices % fixed:
      continue
    for remat in ('none', 'full'):
      for scan in (False, True):
        out.append({'mesh': mesh, 'remat': remat, 'scan_layers': scan})
  return out


def _apply_layout(config, layout: dict):
  config_lib.check_keys(layout, LAYOUT_KEYS, 'layout')
  cfg = ml_collections.ConfigDict(config.to_dict())
  if 'remat' in layout:
    cfg.model.remat = layout['remat']
  if 'scan_layers' in layout:
    cfg.model.scan_layers = bool(layout['scan_layers'])
  rule_set = layout.get('rules', 'config')
  if rule_set not in RULE_SETS:
    raise ValueError(f'layout rules={rule_set!r} is not one of {sorted(RULE_SETS)}.')
  if RULE_SETS[rule_set]:
    override = RULE_SETS[rule_set]
    cfg.sharding_rules = tuple((name, override.get(name, axes))
                               for name, axes in cfg.sharding_rules)
  return cfg


def _first_line(e: Exception) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return f'{type(e).__name__}: {lines[0] if lines else ""}'.strip()


def scan_layout(config, topology: str, layout: dict) -> dict[str, Any]:
  """One row of `scan_layouts` (see there); never raises for a bad layout or compile error."""
  chip = chip_specs(topology)
  row: dict[str, Any] = {'layout': layout_label(layout), 'step': layout.get('step', 'flow'),
                         'chip': chip['chip'], 'hbm_gib': chip['hbm_gib'], 'error': None}
  try:
    cfg = _apply_layout(config, layout)
    builder = STEP_BUILDERS[row['step']]
    mesh = aot.tpu_topology_mesh(topology, tuple(layout.get('mesh', (1, -1, 1))),
                                 tuple(cfg.mesh.axes))
    step = builder(cfg, mesh)
    report = step.compile_report()
    resident = step.resident_bytes   # shards the resident state: may fail for this layout too
  except Exception as e:  # pylint: disable=broad-except  # a failed layout is a table row
    row.update(error=_first_line(e), fits=False, estimate_ms=math.inf)
    return row
  n = mesh.devices.size
  model_flops = step.model_flops / n
  bytes_accessed = report['bytes_accessed'] or 0.0
  compute_ms = model_flops / (chip['peak_tflops'] * 1e12) * 1e3
  memory_ms = bytes_accessed / (chip['hbm_gbps'] * 1e9) * 1e3
  total = report['total_bytes']
  row.update(
      mesh=dict(mesh.shape), num_devices=n,
      argument_gib=report['argument_bytes'] / GIB, temp_gib=report['temp_bytes'] / GIB,
      total_gib=total / GIB, resident_gib=resident / GIB,
      fits=total + resident <= HEADROOM * chip['hbm_gib'] * GIB,
      flops=report['flops'], model_flops=model_flops, bytes_accessed=bytes_accessed,
      estimate_ms=max(compute_ms, memory_ms),
      bound='compute' if compute_ms >= memory_ms else 'memory',
      compile_seconds=report['compile_seconds'], lower_seconds=report['lower_seconds'],
      hlo_kib=report.get('hlo_kib'), while_loops=report.get('while_loops'))
  return row


def scan_layouts(config, topology: str, layouts: Sequence[dict]) -> list[dict[str, Any]]:
  """Compiles the step of each layout for `topology`; rows sorted by roofline estimate.

  Args:
    config: a training config (ConfigDict); it is copied, never modified.
    topology: a libtpu topology such as 'v5e:2x2' or 'v5p:4x4x4'.
    layouts: dicts with optional keys 'mesh' (sizes of `config.mesh.axes`, one may be -1),
      'remat' (a `nn.stack.REMAT_POLICIES` key), 'scan_layers' (bool), 'step' (a
      `STEP_BUILDERS` key, default 'flow'), 'rules' (a `RULE_SETS` key, default 'config').

  Returns:
    One dict per layout: layout, step, chip, hbm_gib, mesh, num_devices, argument_gib, temp_gib,
    total_gib (per chip), fits, flops and bytes_accessed (XLA's, per chip; a scan body counted
    once), model_flops (analytic, per chip), estimate_ms, bound, compile_seconds, error (None, or
    the failure's first line; such rows carry only layout/step/chip/hbm_gib/fits/estimate_ms).

  Raises:
    ValueError: `topology` names an unknown TPU generation.
  """
  chip_specs(topology)  # an unknown chip is the caller's error, not a row
  rows = [scan_layout(config, topology, layout) for layout in layouts]
  return sorted(rows, key=lambda r: (r['error'] is not None, r['estimate_ms']))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """Markdown table: a header, a separator and one line per row."""
  header = ('| layout | mesh | args GiB | temp GiB | total GiB | resident GiB | HBM GiB | fits '
            '| XLA GFLOP | model GFLOP | GB accessed | estimate ms | bound | compile s |')
  lines = [header, '|' + '---|' * (header.count('|') - 1)]
  for r in rows:
    if r.get('error'):
      err = r['error'].replace('|', '\\|')
      lines.append(f'| {r["layout"]} | error: {err} | | | | | {r["hbm_gib"]:.0f} | no | | | | | | |')
      continue
    mesh = 'x'.join(str(v) for v in r['mesh'].values())
    flops = 'n/a' if r['flops'] is None else f'{r["flops"] / 1e9:.3f}'
    lines.append(
        f'| {r["layout"]} | {mesh} | {r["argument_gib"]:.4f} | {r["temp_gib"]:.4f} '
        f'| {r["total_gib"]:.4f} | {r.get("resident_gib", 0.0):.4f} | {r["hbm_gib"]:.0f} '
        f'| {"yes" if r["fits"] else "NO"} '
        f'| {flops} | {r["model_flops"] / 1e9:.3f} | {r["bytes_accessed"] / 1e9:.4f} '
        f'| {r["estimate_ms"]:.4f} | {r["bound"]} | {r.get("compile_seconds", 0.0):.0f} |')
  return '\n'.join(lines)
