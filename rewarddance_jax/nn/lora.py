"""LoRA as a pure transform of parameter trees (any model, scanned stacks included).

A LoRA tree mirrors the selected kernels of a param tree (the pure dicts `nnx.to_pure_dict` gives):
for every kernel W whose '/'-joined path fully matches the `targets` regex it holds
`{'a': (..., in, r), 'b': (..., r, out)}` at W's path, leading (stacked-layer) axes kept. Then

    merge(params, lora, scale)  =  params with  W ← W + scale · a @ b        (Hu et al. 2021, Eq. 3)

with scale = alpha / rank (`lora_scale(rank, alpha)`), computed in fp32 and cast back to W's dtype.
Everything else in `params` passes through untouched (the same array objects). At init `a` is
Gaussian with std 1/rank (PEFT's "gaussian" init, as DiNa-LRM uses) and `b` is zero, so a fresh
LoRA leaves the model unchanged.

Usage (a trainer that tunes only the LoRA):

    lora = init_lora(params, rank=8, alpha=16, targets=ATTENTION_TARGETS, key=key)
    def loss_fn(lora, params, batch):               # differentiate w.r.t. the LoRA tree only
      model = nnx.merge(graphdef, merge(params, lora, lora_scale(8, 16)))
      ...
    grads = jax.grad(loss_fn)(lora, params, batch)  # params are a frozen input: no grads, no state

Sharding: `lora_shardings(lora, param_shardings)` gives NamedShardings that follow the base kernel
(a: (..., in-axis, None), b: (..., None, out-axis)); `lora_logical_names(lora, names)` gives the
logical names ('lora_rank' for r) from the base's, for the rules-based path. Build a sharded LoRA
directly with
`jax.jit(functools.partial(init_lora, ...), out_shardings=lora_shardings(...))(params)`.
`init_lora` reads only shapes and dtypes, so `params` may be `jax.ShapeDtypeStruct`s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

# Attention projections of the MMDiT blocks (both streams' q/k/v and output projections), the
# DiNa-LRM target set (to_q, to_k, to_v, to_out.0, add_{q,k,v}_proj, to_add_out in diffusers).
# FLUX blocks keep q/k/v fused in one `qkv` kernel (one LoRA over the three, as on BFL's fused
# checkpoints); SD3 blocks keep them apart.
ATTENTION_TARGETS = (r'.*blocks/.*((img_attn|txt_attn|attn)/(q|k|v|qkv)|img_out|txt_out|attn_out)'
                     r'/kernel')
# The attention projections and the MLPs of the MMDiT blocks (every block kernel but adaLN).
BLOCK_TARGETS = (r'.*blocks/.*((img_attn|txt_attn|attn)/(q|k|v|qkv)|img_out|txt_out|attn_out'
                 r'|mlp/fc1|mlp/fc2|mlp_in|mlp_out)/kernel')

LORA_KEYS = ('a', 'b')


def lora_scale(rank: int, alpha: float) -> float:
  """The LoRA scale alpha / rank."""
  return float(alpha) / float(rank)


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _keys(path) -> tuple:
  return tuple(getattr(k, 'key', getattr(k, 'idx', k)) for k in path)


def init_lora(params: Any, *, rank: int, alpha: float, targets: str, key: jax.Array,
              dtype=jnp.float32) -> dict:
  """The LoRA tree for the kernels of `params` whose path fully matches `targets`.

  `alpha` is not stored (pass `lora_scale(rank, alpha)` to `merge`); it is taken here so call sites
  state both numbers together. Raises if `targets` selects nothing or a leaf with < 2 axes.
  """
  del alpha
  if rank < 1:
    raise ValueError(f'LoRA rank must be >= 1, got {rank}.')
  pattern = re.compile(targets)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  chosen = [(path, leaf) for path, leaf in flat if pattern.fullmatch(_path_str(path))]
  if not chosen:
    raise ValueError(f'LoRA targets {targets!r} match no parameter path (e.g. '
                     f'{_path_str(flat[0][0]) if flat else "<empty tree>"}).')
  out: dict = {}
  for i, (path, leaf) in enumerate(chosen):
    shape = tuple(leaf.shape)
    if len(shape) < 2:
      raise ValueError(f'LoRA target {_path_str(path)} has shape {shape}; it needs (..., in, out).')
    *lead, d_in, d_out = shape
    a = jax.random.normal(jax.random.fold_in(key, i), (*lead, d_in, rank), dtype) / rank
    b = jnp.zeros((*lead, rank, d_out), dtype)
    _set(out, _keys(path), {'a': a, 'b': b})
  return out


def _lora_leaves(lora: Any) -> list[tuple[tuple, dict]]:
  """[(path to the kernel, {'a', 'b'})] of a LoRA tree."""
  out = []

  def walk(node, path):
    if isinstance(node, Mapping) and set(node) == set(LORA_KEYS) and not any(
        isinstance(v, Mapping) for v in node.values()):
      out.append((path, node))
      return
    if not isinstance(node, Mapping):
      raise ValueError(f'LoRA tree node {"/".join(map(str, path))} is not a dict of {{a, b}}.')
    for k, v in node.items():
      walk(v, path + (k,))

  walk(lora, ())
  return out


def _get(tree, path):
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      raise KeyError(f'LoRA path {"/".join(map(str, path))} is not in the param tree.')
    tree = tree[k]
  return tree


def _replace(tree, path, value):
  """A copy of the dict spine along `path` with the leaf replaced; every other node is shared."""
  if not path:
    return value
  new = dict(tree)
  new[path[0]] = _replace(tree[path[0]], path[1:], value)
  return new


def delta(ab: Mapping[str, jax.Array], s: float) -> jax.Array:
  """scale · a @ b in fp32, batched over leading axes."""
  return s * jnp.matmul(ab['a'].astype(jnp.float32), ab['b'].astype(jnp.float32))


def merge(params: Any, lora: Any, scale: float) -> Any:
  """params with W ← W + scale·a@b at every LoRA path (pure, jit-able; other leaves shared)."""
  out = params
  for path, ab in _lora_leaves(lora):
    w = _get(params, path)
    want_a = tuple(w.shape[:-1]) + (ab['a'].shape[-1],)
    if tuple(ab['a'].shape) != want_a or tuple(ab['b'].shape) != (
        tuple(w.shape[:-2]) + (ab['a'].shape[-1], w.shape[-1])):
      raise ValueError(f'LoRA at {"/".join(map(str, path))}: a {ab["a"].shape} / b '
                       f'{ab["b"].shape} do not fit kernel {w.shape}.')
    out = _replace(out, path, (w.astype(jnp.float32) + delta(ab, scale)).astype(w.dtype))
  return out


def lora_logical_names(lora: Any, base_names: Mapping[tuple, tuple | None]) -> dict[tuple, tuple]:
  """Flat {path+('a'|'b',): logical names} from the base's flat names.

  `base_names` is `sharding.param_logical_names(state)` of the base model (paths as key tuples):
  a kernel named (*lead, in, out) gives a (*lead, in, 'lora_rank') and b (*lead, 'lora_rank', out).
  """
  norm = {tuple(str(k) for k in p): n for p, n in base_names.items()}
  out = {}
  for path, _ in _lora_leaves(lora):
    names = norm.get(tuple(str(k) for k in path))
    if names is None:
      raise ValueError(f'base kernel {"/".join(map(str, path))} has no logical axis names.')
    *lead, n_in, n_out = names
    out[path + ('a',)] = (*lead, n_in, 'lora_rank')
    out[path + ('b',)] = (*lead, 'lora_rank', n_out)
  return out


def lora_shardings(lora: Any, param_shardings: Any) -> dict:
  """NamedShardings for `lora` following the base kernels': a (.., in, None), b (.., None, out)."""
  out: dict = {}
  for path, ab in _lora_leaves(lora):
    base = _get(param_shardings, path)
    if not isinstance(base, NamedSharding):
      raise ValueError(f'param_shardings at {"/".join(map(str, path))} is not a NamedSharding.')
    ndim = jnp.ndim(ab['a'])
    spec = tuple(base.spec) + (None,) * (ndim - len(base.spec))
    *lead, s_in, s_out = spec
    _set(out, path, {'a': NamedSharding(base.mesh, P(*lead, s_in, None)),
                     'b': NamedSharding(base.mesh, P(*lead, None, s_out))})
  return out
