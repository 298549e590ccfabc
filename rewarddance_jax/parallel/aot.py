"""Ahead-of-time compilation for TPU topologies on a host without a TPU (docs/design.md §7).

With libtpu installed (`pip install "jax[tpu]"`), XLA's TPU compiler runs on any x86 host: a
topology description yields compile-only TPU devices that can be put in a mesh and compiled
for, but never executed on. That shows per-chip HBM use and compile errors (e.g. a Pallas
kernel that does not lower) before a TPU is booked.

  1. `tpu_topology_mesh(topology, mesh_shape)`: `get_topology_desc(topology, platform='tpu')`
     gives the compile-only devices of e.g. 'v5e:2x2' or 'v5p:4x4x4'; the single -1 in
     `mesh_shape` is filled from the device count, the devices are laid out topology-aware
     (`mesh_utils.create_device_mesh`), and the mesh gets `AxisType.Auto` axes, as the
     training meshes do (`parallel/mesh.py`).
  2. The caller builds `jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, ...))`
     leaves for every argument (params, optimizer state, batch): nothing is materialised.
  3. `compile_report(jitted_fn, *abstract_args)`: `.lower(*args).compile()` under a timer, then
     per-device byte counts from `memory_analysis()` and flops / bytes accessed from
     `cost_analysis()`, returned as a plain dict.
  4. `libtpu_available()`: whether step 1 can work at all here (libtpu importable and its
     compiler initialisable); tests skip on it, with `libtpu_unavailable_reason()` as the reason.
  5. `format_report(report)`: the report as one log line (MiB and GFLOP per device).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh

from rewarddance_jax.parallel import mesh as mesh_lib

DEFAULT_AXES = mesh_lib.DEFAULT_AXES

# Fields of `CompiledMemoryStats`, reported per device, as (report key, attribute).
_MEMORY_FIELDS = (
    ('argument_bytes', 'argument_size_in_bytes'),
    ('output_bytes', 'output_size_in_bytes'),
    ('temp_bytes', 'temp_size_in_bytes'),
    ('alias_bytes', 'alias_size_in_bytes'),
    ('generated_code_bytes', 'generated_code_size_in_bytes'),
)

# A topology every libtpu release knows; only used to probe whether libtpu works at all.
_PROBE_TOPOLOGY = 'v5e:2x2'


def tpu_devices(topology: str) -> list[jax.Device]:
  """The compile-only TPU devices of `topology` (e.g. 'v5e:2x2', 'v5p:4x4x4')."""
  return list(topologies.get_topology_desc(topology_name=topology, platform='tpu').devices)


def tpu_topology_mesh(topology: str, mesh_shape: Sequence[int],
                      axis_names: Sequence[str] = DEFAULT_AXES) -> Mesh:
  """A mesh over the compile-only devices of a TPU `topology`; use it only to lower/compile.

  Args:
    topology: a libtpu topology name, '<generation>:<chips>' such as 'v5e:2x2' or 'v5p:4x4x4'.
    mesh_shape: one size per axis; at most one may be -1 and is filled from the device count.
    axis_names: mesh axis names, as many as `mesh_shape` has entries.

  Returns:
    A `Mesh` with `AxisType.Auto` axes (GSPMD-style logical sharding, as in training).

  Raises:
    ValueError: the shape does not match the topology's device count, or lengths differ.
  """
  axis_names = tuple(axis_names)
  if len(axis_names) != len(mesh_shape):
    raise ValueError(f'mesh_shape={tuple(mesh_shape)} and axis_names={axis_names} must have '
                     'equal lengths.')
  devices = tpu_devices(topology)
  shape = mesh_lib.resolve_axis_sizes(mesh_shape, len(devices), f'mesh_shape for {topology}')
  # Topology-aware placement keeps the innermost (most communicating) axes on neighbouring
  # chips; compile-time collective costs then match what the real slice would see.
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Some shapes have no physical-ring assignment (e.g. an axis that splits a torus dimension
    # unevenly); row-major order still compiles, only collectives may be costed less favourably.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(np.asarray(grid), axis_names, axis_types=(AxisType.Auto,) * len(axis_names))


def _first_cost(cost: Any) -> dict:
  # `cost_analysis()` is a dict in current jax, a one-element list (one per program) in older
  # releases, and may be None when the backend offers no analysis.
  if cost is None:
    return {}
  if isinstance(cost, (list, tuple)):
    return dict(cost[0]) if cost else {}
  return dict(cost)


def compile_report(jitted_fn, *abstract_args) -> dict[str, Any]:
  """Lowers and compiles `jitted_fn` for `abstract_args`; returns memory, cost and timing.

  `abstract_args` are `jax.ShapeDtypeStruct`s (with `sharding=`) or arrays. Byte counts are per
  device, as XLA reports them for one SPMD partition:
    argument_bytes, output_bytes, temp_bytes, alias_bytes, generated_code_bytes, and
    total_bytes = argument + output + temp + generated code − alias (donated outputs reuse
    their argument buffers, so aliased bytes are counted once).
  `flops` and `bytes_accessed` come from `cost_analysis()` and are also per device. They count
  the body of a `scan` / while loop ONCE, not once per iteration, so a scanned-layer model
  reports roughly (1 / depth) of its real FLOPs; multiply by trip counts or count model FLOPs
  analytically before any roofline estimate. Pallas kernels (custom calls) contribute only what
  their `cost_estimate` declares: the Pallas TPU flash-attention backward kernels declare none,
  so a flash-attention gradient reports about the forward's FLOPs. `lower_seconds` and
  `compile_seconds` are wall time on this host. `hlo_kib` / `while_loops`: size of the lowered
  StableHLO text and its number of while loops (scans).
  """
  t0 = time.perf_counter()
  lowered = jitted_fn.lower(*abstract_args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()

  report: dict[str, Any] = {'lower_seconds': t1 - t0, 'compile_seconds': t2 - t1}
  # Size of the lowered program and its loops: scanned layers and a scanned sampler keep both
  # small (a model unrolled N times shows up as N× the text and no `while`).
  text = lowered.as_text()
  report['hlo_kib'] = len(text) / 1024
  report['while_loops'] = text.count('stablehlo.while')
  mem = compiled.memory_analysis()
  for key, attr in _MEMORY_FIELDS:
    report[key] = int(getattr(mem, attr, 0) or 0) if mem is not None else None
  if mem is not None:
    report['total_bytes'] = (report['argument_bytes'] + report['output_bytes']
                             + report['temp_bytes'] + report['generated_code_bytes']
                             - report['alias_bytes'])
  else:
    report['total_bytes'] = None
  cost = _first_cost(compiled.cost_analysis())
  report['flops'] = float(cost['flops']) if 'flops' in cost else None
  report['bytes_accessed'] = (float(cost['bytes accessed']) if 'bytes accessed' in cost
                              else None)
  return report


@functools.cache
def _libtpu_error() -> str | None:
  # Cached: loading libtpu's plugin either works or fails once per process, and the probe
  # is called by every AOT test.
  try:
    tpu_devices(_PROBE_TOPOLOGY)
  except Exception as e:  # pylint: disable=broad-except  # any failure means "no libtpu here"
    return f'{type(e).__name__}: {e}'
  return None


def libtpu_available() -> bool:
  """Whether TPU topologies can be compiled for here (libtpu importable and initialisable)."""
  return _libtpu_error() is None


def libtpu_unavailable_reason() -> str | None:
  """The error text of the failed libtpu probe, or None when `libtpu_available()`."""
  return _libtpu_error()


def format_report(report: dict[str, Any]) -> str:
  """One line for logs: per-device MiB and GFLOP."""
  def mib(b):
    return 'n/a' if b is None else f'{b / 2**20:.2f} MiB'

  flops = report.get('flops')
  return (f'args {mib(report.get("argument_bytes"))}, out {mib(report.get("output_bytes"))}, '
          f'temp {mib(report.get("temp_bytes"))}, total {mib(report.get("total_bytes"))}, '
          f'{"n/a" if flops is None else f"{flops / 1e9:.3f} GFLOP"} per device, compiled in '
          f'{report["compile_seconds"]:.1f} s')

