"""Device mesh from config data (multi-process start-up: `parallel/distributed.py`).

A mesh is config data, never code (docs/design.md §3 rule 2):

  config.mesh.axes = ('data', 'fsdp', 'tensor')   # increasing communication intensity
  config.mesh.ici  = (1, -1, 1)                   # inside a slice; exactly one -1 is filled
  config.mesh.dcn  = (1, 1, 1)                    # across slices (multi-slice TPU); product = slices
  config.mesh.num_devices = 0                     # 0: all devices; N: the first N (tests, debugging)

Steps of `create_mesh`:
  1. Count the slices (1 + the largest `slice_index` on the devices; 1 on CPU/GPU).
  2. Resolve the single -1 in `ici` so that prod(ici) * prod(dcn) == number of devices; any mismatch is
     a one-line ValueError that states the sizes and the device count.
  3. Lay out devices with `mesh_utils.create_device_mesh` (one slice) or
     `create_hybrid_device_mesh` (several), so the innermost axes stay on the fastest links.
  4. Build `Mesh(grid, axes, axis_types=(AxisType.Auto,) * n)`; jax 0.10 `make_mesh` would default to
     Explicit axes, which the GSPMD-style logical sharding here does not use (docs/design.md §4.3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

DEFAULT_AXES = ('data', 'fsdp', 'tensor')


def _num_slices(devices: Sequence[jax.Device]) -> int:
  ids = [getattr(d, 'slice_index', 0) or 0 for d in devices]
  return 1 + max(ids)


def resolve_axis_sizes(sizes: Sequence[int], total: int, what: str = 'mesh.ici') -> tuple[int, ...]:
  """Fills the one -1 in `sizes` so their product is `total`; raises with the numbers otherwise."""
  sizes = tuple(int(s) for s in sizes)
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f'{what}={sizes}: at most one axis may be -1.')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'{what}={sizes}: axis sizes must be positive or -1.')
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if total % known:
      raise ValueError(
          f'{what}={sizes}: {total} devices are not divisible by the fixed axes (product {known}).')
    sizes = tuple(total // known if s == -1 else s for s in sizes)
  if math.prod(sizes) != total:
    raise ValueError(
        f'{what}={sizes} has {math.prod(sizes)} devices but {total} are available; '
        'set one axis to -1 or make the product match.')
  return sizes


def create_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh described by `mesh_cfg` (fields axes, ici, dcn) over `devices`."""
  devices = list(jax.devices() if devices is None else devices)
  limit = int(mesh_cfg.get('num_devices', 0) or 0)
  if limit:
    if limit > len(devices):
      raise ValueError(f'mesh.num_devices={limit} but only {len(devices)} devices are available.')
    devices = devices[:limit]
  axes = tuple(mesh_cfg.get('axes', DEFAULT_AXES))
  ici = tuple(mesh_cfg.get('ici', (1, -1, 1)))
  dcn = tuple(mesh_cfg.get('dcn', (1,) * len(axes)))
  if not len(axes) == len(ici) == len(dcn):
    raise ValueError(f'mesh.axes={axes}, mesh.ici={ici}, mesh.dcn={dcn} must have equal lengths.')
  if len(set(axes)) != len(axes):
    raise ValueError(f'mesh.axes={axes} has a repeated name.')
  slices = _num_slices(devices)
  dcn = resolve_axis_sizes(dcn, slices, 'mesh.dcn')
  ici = resolve_axis_sizes(ici, len(devices) // slices, 'mesh.ici')
  if slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices)
    except (ValueError, NotImplementedError, AssertionError):
      # Topology-aware placement is unavailable for some device sets (e.g. a subset of CPU
      # devices); a row-major layout is then correct, only possibly less link-efficient.
      grid = np.asarray(devices).reshape(ici)
  shape = tuple(i * d for i, d in zip(ici, dcn))
  mesh = Mesh(np.asarray(grid).reshape(shape), axes, axis_types=(AxisType.Auto,) * len(axes))
  logging.info('Mesh %s over %d devices (%d slice(s)).', dict(mesh.shape), len(devices), slices)
  return mesh

