"""Logical axis rules -> shardings; sharded init from abstract state; host batch -> global array.

Every weight carries logical axis names (`nnx.with_partitioning(init, ('embed', 'mlp'))`, stored as
the Param's `out_sharding` metadata); the mapping to mesh axes is a list of rules in the config:

  config.sharding_rules = (('act_batch', ('fsdp', 'data')), ('embed', 'fsdp'), ('mlp', 'tensor'), ...)

Sharded initialisation (docs/design.md §4.2), as `sharded_init` does it:
  1. Build the module abstractly with `nnx.eval_shape` under `jax.set_mesh(mesh)` and the rules.
  2. Read each Param's logical names and map them through the rules (`logical_to_mesh_axes`), with
     the stacked-layer axis of scanned blocks included; a name that no rule mentions is an error,
     so a typo in a model or a config never silently replicates a 12B weight. A dimension that its
     mesh axes do not divide (a 97-token vocabulary on tensor=2) is replicated, with a warning.
  3. `jax.jit(init, out_shardings=...)()`: each device materialises only its own shard.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = tuple[tuple[str, Any], ...]

# Default rules (docs/design.md §4.1). Weights: embed, mlp, heads, kv, vocab, conv_in, conv_out,
# layers, lora_rank, norm; activations: act_batch, act_len, act_embed, act_heads.
# `act_batch` lists fsdp before data. Both orders put the same rows on a device group; with
# ('data', 'fsdp') the CPU backend (jax 0.10.2) computed a wrong double-block text stream on a
# (2, 2, 2) mesh (rows of devices (data 0, fsdp 1) and (data 1, fsdp 0) swapped inside the text
# output projection), while ('fsdp', 'data') matches one device to float rounding on every mesh
# (tests/test_train_flow.py). Data-parallel reductions are the same either way.
DEFAULT_RULES: Rules = (
    ('act_batch', ('fsdp', 'data')),
    ('act_len', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('conv_out', 'fsdp'),
    ('kv', None),
    ('conv_in', None),
    ('layers', None),
    ('lora_rank', None),
    ('norm', None),
)


def rules_from_config(rules) -> Rules:
  """Normalises config rules (lists from ml_collections) into a hashable tuple of pairs."""
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise ValueError(f'sharding_rules[{i}]={rule!r}: each rule is (logical_name, mesh_axes).')
    name, axes = rule
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((str(name), axes))
  return tuple(out)


def check_rules(rules: Rules, mesh: Mesh) -> None:
  """Every mesh axis a rule names must exist in the mesh."""
  for name, axes in rules:
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in mesh.axis_names:
        raise ValueError(
            f'sharding rule {name!r} -> {axes!r} names mesh axis {axis!r}, '
            f'but the mesh has axes {mesh.axis_names}.')


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> P:
  """Maps logical axis names to a PartitionSpec; unknown names are an error (not replication)."""
  known = {n for n, _ in rules}
  for n in names:
    if n is not None and n not in known:
      raise ValueError(f'logical axis {n!r} has no sharding rule (rules cover {sorted(known)}).')
  return nn.logical_to_mesh_axes(tuple(names), rules)


def param_logical_names(state: nnx.State) -> dict[tuple, tuple]:
  """Flat {path: logical names} of every variable in `state` (None when a variable has none)."""
  out = {}
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata().get('out_sharding') if isinstance(var, nnx.Variable) else None
    out[path] = tuple(names) if names is not None else None
  return out


def _replicate_indivisible(spec: P, shape: tuple, names: Sequence[str | None], mesh: Mesh,
                           what: str) -> P:
  """`spec` with every dimension that its mesh axes do not divide replicated, with a warning."""
  out = []
  for dim, (axes, size) in enumerate(zip(spec, shape)):
    group = axes if isinstance(axes, tuple) else (axes,)
    if all(isinstance(a, str) for a in group):
      n = math.prod(mesh.shape[a] for a in group)
      if size % n:
        logging.warning('param %s: dimension %d (%s, %d) is not divisible by mesh axis %r (%d); '
                        'it is replicated.', what, dim, names[dim], size, axes, n)
        axes = None
    out.append(axes)
  return P(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules,
                    require_names: bool = True) -> nnx.State:
  """A tree like `state` whose leaves are the NamedShardings its logical names and the rules give.

  `require_names`: raise on any Param without logical names (the project rule: every weight
  carries them). Non-Param variables without names (counters, caches) are replicated. A dimension
  that its mesh axes do not divide is replicated, with a warning.
  """
  flat = []
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata().get('out_sharding')
    shape = np.shape(var.get_value())
    what = '/'.join(map(str, path))
    if names is None:
      if require_names and isinstance(var, nnx.Param):
        raise ValueError(f'param {what} {shape} has no logical axis names.')
      spec = P()
    else:
      if len(names) != len(shape):
        raise ValueError(f'param {what}: names {names} do not match shape {shape}.')
      spec = _replicate_indivisible(logical_to_spec(names, rules), shape, names, mesh, what)
    flat.append((path, var.replace(NamedSharding(mesh, spec))))
  return nnx.from_flat_state(flat)


# (cache_key, mesh, rules, filters) -> (graphdef, shardings, jitted init); see sharded_init.
_INIT_CACHE: dict = {}


def sharded_init(factory: Callable[[], nnx.Module], mesh: Mesh, rules: Rules, *filters,
                 cache_key: Hashable | None = None
                 ) -> tuple[nnx.GraphDef, tuple[dict, ...], tuple[dict, ...]]:
  """Builds `factory()` with every array created directly in its final sharding.

  Returns (graphdef, trees, shardings): `trees` are the pure-dict states that
  `nnx.split(model, *filters)` gives (default: one tree with everything; `nnx.merge(graphdef,
  *trees)` rebuilds the module), `shardings` the matching NamedSharding trees.

  `cache_key` (hashable, e.g. the model's frozen config and seed) names what `factory` builds: the
  shape pass and the jitted init are then kept for the process, and a second call with the same
  key, mesh, rules and filters only runs the compiled init (fresh arrays each time). Trainers and
  pipeline stages that rebuild one generator skip ~3 s of tracing and a compile each.
  """
  filters = filters or (...,)
  key = None if cache_key is None else (cache_key, mesh, rules, filters)
  if key is not None and key in _INIT_CACHE:
    graphdef, shardings, init = _INIT_CACHE[key]
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      return graphdef, init(), shardings
  graphdef, _, shardings = sharded_abstract(factory, mesh, rules, *filters)

  def init_fn():
    return tuple(nnx.to_pure_dict(s) for s in nnx.split(factory(), *filters)[1:])

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    init = jax.jit(init_fn, out_shardings=shardings)
    trees = init()
  if key is not None:
    _INIT_CACHE[key] = (graphdef, shardings, init)
  return graphdef, trees, shardings


# (cache_key, mesh, rules, filters) -> (graphdef, abstract trees, shardings); see sharded_abstract.
_ABSTRACT_CACHE: dict = {}


def sharded_abstract(factory: Callable[[], nnx.Module], mesh: Mesh, rules: Rules, *filters,
                     cache_key: Hashable | None = None
                     ) -> tuple[nnx.GraphDef, tuple[dict, ...], tuple[dict, ...]]:
  """`sharded_init` without the arrays: (graphdef, trees of `jax.ShapeDtypeStruct` carrying
  their shardings, shardings). The target for params that are restored from a checkpoint anyway:
  no random init is traced, compiled or run (a pipeline stage or an evaluation that starts from
  a checkpoint saves a compile of several seconds). `cache_key` names what `factory` builds,
  whatever its seed (shapes only): a second call with the same key, mesh, rules and filters
  returns the first result."""
  filters = filters or (...,)
  key = None if cache_key is None else (cache_key, mesh, rules, filters)
  if key is not None and key in _ABSTRACT_CACHE:
    return _ABSTRACT_CACHE[key]
  graphdef, abstract_states = abstract_state(factory, mesh, rules, *filters)
  shardings = tuple(nnx.to_pure_dict(state_shardings(s, mesh, rules)) for s in abstract_states)
  trees = tuple(
      jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                   nnx.to_pure_dict(state), shard)
      for state, shard in zip(abstract_states, shardings))
  result = (graphdef, trees, shardings)
  if key is not None:
    _ABSTRACT_CACHE[key] = result
  return result


def abstract_state(factory: Callable[[], nnx.Module], mesh: Mesh, rules: Rules,
                   *filters) -> tuple[nnx.GraphDef, tuple[nnx.State, ...]]:
  """Shape-only build of `factory()` (no memory): graphdef and abstract states with metadata."""
  filters = filters or (...,)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(factory)
    graphdef, *states = nnx.split(abstract, *filters)
  return graphdef, tuple(states)


def data_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Batch-major sharding for an `ndim` array: the leading axis follows the `act_batch` rule."""
  return NamedSharding(mesh, logical_to_spec(('act_batch',) + (None,) * (ndim - 1), rules))


@functools.lru_cache(maxsize=64)
def _holds_own_block(sharding: NamedSharding, local_rows: int) -> bool:
  """Whether this process's devices hold exactly rows [h * b, (h + 1) * b) of the global batch
  (h = process index, b = `local_rows`): the block the data pipelines give host h."""
  h, total = jax.process_index(), jax.process_count() * local_rows
  held = set()
  for index in sharding.addressable_devices_indices_map((total,)).values():
    held.update(range(*index[0].indices(total)))
  return held == set(range(h * local_rows, (h + 1) * local_rows))


@functools.lru_cache(maxsize=64)
def _process_major(mesh: Mesh, ndim: int) -> NamedSharding:
  """Rows split over the mesh's devices in process order: host h's block on host h."""
  devices = sorted(mesh.devices.flat, key=lambda d: (d.process_index, d.id))
  return NamedSharding(Mesh(np.asarray(devices), ('rows',)), P('rows', *(None,) * (ndim - 1)))


def host_to_global(batch: Any, mesh: Mesh, rules: Rules) -> Any:
  """Turns this process's numpy batch (a pytree) into global jax Arrays sharded on the batch axis.

  Each process passes its block of the global batch: process h of n, with b rows, passes global
  rows [h * b, (h + 1) * b) (`data/pipeline.py`). Where the mesh puts other rows on its devices
  (a batch axis whose mesh axes do not run in process order, e.g. `data` across hosts after
  `fsdp`), the rows move there through the devices. Strings stay on the host and must be
  removed by the caller first.
  """
  def put(x):
    x = np.asarray(x)
    if x.dtype.kind in 'OUS':
      raise TypeError('host_to_global got a string array; keep prompts on the host.')
    target = data_sharding(mesh, rules, x.ndim)
    if _holds_own_block(target, x.shape[0]):
      return jax.make_array_from_process_local_data(target, x)
    blocks = jax.make_array_from_process_local_data(_process_major(mesh, x.ndim), x)
    return jax.device_put(blocks, target)

  return jax.tree.map(put, batch)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names under the active rules (no-op without a mesh)."""
  return nn.with_logical_constraint(x, tuple(names))


def materialize(fn: Callable, *args, out_shardings, abstract: bool = False):
  """`fn(*args)` placed in `out_shardings`; with `abstract`, its `jax.ShapeDtypeStruct`s carrying
  those shardings instead (nothing runs). State builders go through it, so the layout scanner
  builds exactly the trainer's state."""
  if abstract:
    out = jax.eval_shape(fn, *args)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), out,
                        out_shardings)
  return jax.jit(fn, out_shardings=out_shardings)(*args)
