"""Import a safetensors source into a sharded param tree through a key map; export back.

Import (`load`):
  1. Index the source headers and check the whole plan (`keymap.check_plan`): one error lists
     every unmapped / missing / mis-shaped / unfilled key before any tensor is read.
  2. Stream file by file, tensor by tensor: read (a slice of) the tensor, transform it on the host,
     cast to the target dtype and place it straight into its target NamedSharding
     (`jax.make_array_from_callback`: each device receives only its own shard).
  3. Stacked (scanned) targets start as zeros in their final sharding and receive layer i through
     a jitted, donated `dynamic_update_index_in_dim`, so the host never holds more than one source
     tensor (one fused target while its parts arrive, `Rule.dst_part`) and the device never holds
     two copies of a param.
Export (`export`) runs the rules backwards: param (layer) → host → inverse transform → source key,
re-assembling split source tensors, and writes (sharded) safetensors with an index json, and the
family's config.json when given one.

Trees are pure nested dicts (`nnx.to_pure_dict`), keys str or int; abstract trees hold
`jax.ShapeDtypeStruct`s with a sharding (see `abstract_params`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.weights import safetensors_io as st
from rewarddance_jax.weights.keymap import Rule, check_plan, path_str
from rewarddance_jax.weights.spec import ModelSpec


def flatten(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
  """Nested dict → {path tuple: leaf}."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def unflatten(flat: dict[tuple, Any]) -> dict:
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return out


@contextlib.contextmanager
def fast_abstract_tracing():
  """Makes shape-only model builds linear instead of quadratic in the number of params.

  jax 0.10.2: every `getattr(tracer, 'sharding', None)` (flax does one per RNG draw in
  `Variable.set_value`) builds an error message whose `_origin_msg` scans the whole trace so far;
  for a 57-block unscanned FLUX that is ~80 s of a ~4 s trace. Inside this context the message
  omits its origin line; nothing else changes.
  """
  from jax._src.interpreters import partial_eval as pe  # pylint: disable=g-import-not-at-top
  tracer = getattr(pe, 'DynamicJaxprTracer', None)
  original = getattr(tracer, '_origin_msg', None)
  if original is None:
    yield
    return
  tracer._origin_msg = lambda self: ''
  try:
    yield
  finally:
    tracer._origin_msg = original


def abstract_params(factory: Callable[[], nnx.Module], mesh, rules) -> tuple[nnx.GraphDef, dict]:
  """graphdef + pure-dict tree of ShapeDtypeStruct(shape, dtype, sharding) for `factory()`."""
  with fast_abstract_tracing():
    graphdef, (state,) = sharding_lib.abstract_state(factory, mesh, rules)
  shardings = nnx.to_pure_dict(sharding_lib.state_shardings(state, mesh, rules))
  shapes = nnx.to_pure_dict(state)
  tree = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, shardings)
  return graphdef, tree


def _place(x: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jax.device_put(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _layer_sharding(sharding, ndim: int):
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  return NamedSharding(sharding.mesh, P(*spec[1:]))


def _zeros(shape, dtype, sharding) -> jax.Array:
  # A zero-strided host view: each device copies only its own (zero) shard, nothing is compiled.
  return _place(np.broadcast_to(np.zeros((), dtype), shape), sharding)


@functools.lru_cache(maxsize=None)
def _set_layer_fn(sharding):
  def set_layer(buf, x, i):
    return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0)
  return jax.jit(set_layer, donate_argnums=0, out_shardings=sharding)


def load(source: str, rules: Sequence[Rule], abstract: dict, *, prefer: str | None = None,
         progress: bool = False, what: str | None = None, ignore: Sequence[str] = (),
         infos: dict | None = None) -> dict:
  """Reads `source` (file or directory) into a tree shaped like `abstract` (see module doc).

  `ignore`: source keys known to be redundant (tied copies, non-persistent buffers), skipped.
  """
  infos = dict(infos or st.index(source, prefer))
  for key in ignore:
    infos.pop(key, None)
  flat_abs = flatten(abstract)
  check_plan(rules, {k: i.shape for k, i in infos.items()},
             {p: tuple(a.shape) for p, a in flat_abs.items()}, what=what or f'weights {source}')
  wanted: dict[str, list[Rule]] = {}
  for r in rules:
    wanted.setdefault(r.src, []).append(r)
  out: dict[tuple, jax.Array] = {}
  # Fused targets filled part by part (`Rule.dst_part`) gather on the host until complete.
  pending: dict[tuple, list] = {}
  bar = tqdm(total=len(wanted), desc=f'load {what or source}', unit='tensor', disable=not progress)
  for key, reader, key_rules in st.stream(infos, wanted):
    ndim = len(infos[key].shape)
    for r in key_rules:
      target = flat_abs[r.dst]
      sharding = getattr(target, 'sharding', None)
      y = np.asarray(r.tf.fwd(reader[r.read_index(ndim)]), dtype=target.dtype)
      if r.dst_part is not None:
        key_ = (r.dst, r.layer)
        if key_ not in pending:
          shape = tuple(target.shape)[0 if r.layer is None else 1:]
          pending[key_] = [np.empty(shape, target.dtype), 0]
        r.write(pending[key_][0], y)
        pending[key_][1] += 1
        view, axis, _ = r.dst_part
        if pending[key_][1] < view[axis]:
          continue
        y = pending.pop(key_)[0]
      if r.layer is None:
        out[r.dst] = _place(y, sharding)
        continue
      if r.dst not in out:
        out[r.dst] = _zeros(tuple(target.shape), target.dtype, sharding)
      part = _place(y, _layer_sharding(sharding, len(target.shape)))
      out[r.dst] = _set_layer_fn(sharding)(out[r.dst], part, r.layer)
      del part
    bar.update(1)
  bar.close()
  return unflatten({p: out[p] for p in flat_abs})


def load_spec(spec: ModelSpec, abstract: dict, *, progress: bool = False) -> dict:
  """`load` for a family's ModelSpec into an abstract tree from `abstract_params`."""
  return load(spec.source, spec.rules, abstract, prefer=spec.prefer, ignore=spec.ignore,
              progress=progress, what=f'{spec.family} weights {spec.source}')


def _assemble(src: str, pieces: list[tuple[tuple | None, np.ndarray]]) -> np.ndarray:
  if len(pieces) == 1 and pieces[0][0] is None:
    return pieces[0][1]
  if any(part is None for part, _ in pieces) or len({p[0] for p, _ in pieces}) != 1:
    raise ValueError(f'export: key {src} is written by incompatible rules.')
  pieces = sorted(pieces, key=lambda p: p[0][1])
  axis, pos = pieces[0][0][0], 0
  for (_, start, stop), x in pieces:
    if start != pos or x.shape[axis] != stop - start:
      raise ValueError(f'export: the parts of key {src} do not tile it (gap or overlap at {pos}).')
    pos = stop
  return np.concatenate([x for _, x in pieces], axis=axis)


def export_tensors(params: dict, rules: Sequence[Rule], dtype=np.float32):
  """Yields (source key, numpy array) for every source key of `rules`, from our `params` tree.

  Params are fetched to the host one at a time (a stacked param whole, then sliced per layer).
  """
  flat = flatten(params)
  missing = sorted({path_str(r.dst) for r in rules if r.dst not in flat})
  if missing:
    raise ValueError(f'export: the param tree lacks {len(missing)} param(s): {", ".join(missing)}')
  groups: dict[str, list[Rule]] = {}
  for r in rules:
    groups.setdefault(r.src, []).append(r)
  order = sorted(groups, key=lambda k: (path_str(groups[k][0].dst), groups[k][0].layer or 0))
  cache: dict[tuple, np.ndarray] = {}
  for src in order:
    pieces = []
    for r in groups[src]:
      if r.dst not in cache:
        if len(cache) >= 3:
          cache.pop(next(iter(cache)))
        cache[r.dst] = np.asarray(jax.device_get(flat[r.dst]), dtype=np.float32)
      host = cache[r.dst] if r.layer is None else cache[r.dst][r.layer]
      pieces.append((r.src_part, r.tf.inv(r.read(host))))
    yield src, np.ascontiguousarray(_assemble(src, pieces)).astype(dtype)


def export(params: dict, rules: Sequence[Rule], out_dir: str, name: str, *, dtype=np.float32,
           max_shard_bytes: int = 5 * 2**30, progress: bool = False,
           config: dict | None = None) -> list[str]:
  """Writes `params` in the source layout of `rules` under `out_dir/name[-i-of-n].safetensors`,
  and `config` (a diffusers / transformers config dict) as `out_dir/config.json`."""
  if config is not None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2)
  n = len({r.src for r in rules})
  tensors = tqdm(export_tensors(params, rules, dtype), total=n, desc=f'export {name}',
                 unit='tensor', disable=not progress)
  return st.write(tensors, out_dir, name, max_shard_bytes)
