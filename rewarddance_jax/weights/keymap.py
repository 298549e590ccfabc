"""Declarative key maps between a public safetensors layout and our NNX param tree.

A family's key map is a list of `Rule`s, each moving one source tensor (or one slice of it) into
one target param (or one layer of a stacked, scanned param):

  Rule(src='transformer_blocks.3.attn.to_q.weight', dst=('transformer', 'double_blocks', 'img_attn',
       'q', 'kernel'), layer=3, tf=LINEAR)

  1. `src_part=(axis, start, stop)` reads only src[start:stop] along `axis` (a fused tensor that
     we keep as several params, e.g. the FLUX single block's proj_out = [attn_out | mlp_out]).
  2. `tf` is one of a short list of invertible transforms (PyTorch [out, in] → [in, out], conv
     OIHW → HWIO, ...), each with its shape map, so a plan is checked from headers alone.
  3. `layer=i` writes the i-th slice of a stacked target (scanned layers, leading layer axis).
  4. `dst_part=(view, axis, index)` writes one of several source tensors into a target that we
     keep fused along its last axis: the target (or its layer) seen as `reshape(view)` receives
     the transformed tensor, of the target's shape with the last axis split by the parts, at
     `index` along `axis` (FLUX's to_q, to_k, to_v → one qkv kernel interleaved per head: view
     (D, H, 3, head_dim), axis 2, index 0/1/2). Every index of the axis must be filled once.
`check_plan` validates a map against the source header and the target's abstract tree and raises
ONE `WeightsMismatchError` listing every unmapped, missing, mis-shaped or unfilled key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Path = tuple


@dataclass(frozen=True)
class Transform:
  """fwd: source array → target array; inv: its inverse; shape: the source → target shape map."""
  name: str
  fwd: Callable[[np.ndarray], np.ndarray]
  inv: Callable[[np.ndarray], np.ndarray]
  shape: Callable[[tuple], tuple]


def _swap_halves(x: np.ndarray) -> np.ndarray:
  h = x.shape[0] // 2
  return np.concatenate([x[h:], x[:h]], axis=0)


IDENTITY = Transform('identity', lambda x: x, lambda y: y, lambda s: tuple(s))
# torch.nn.Linear weight [out, in] → kernel [in, out].
LINEAR = Transform('linear_T', lambda x: x.T, lambda y: y.T, lambda s: tuple(s[::-1]))
# torch Conv2d weight [O, I, kh, kw] → flax [kh, kw, I, O].
CONV2D = Transform('conv2d_hwio', lambda x: x.transpose(2, 3, 1, 0),
                   lambda y: y.transpose(3, 2, 0, 1), lambda s: (s[2], s[3], s[1], s[0]))
# diffusers AdaLayerNormContinuous stores (scale, shift); BFL FLUX and our model use (shift, scale).
SWAP_HALVES = Transform('swap_halves', _swap_halves, _swap_halves, lambda s: tuple(s))
LINEAR_SWAP_HALVES = Transform('linear_T_swap_halves', lambda x: _swap_halves(x).T,
                               lambda y: _swap_halves(y.T), lambda s: tuple(s[::-1]))


@dataclass(frozen=True)
class Rule:
  src: str
  dst: Path
  tf: Transform = IDENTITY
  layer: int | None = None
  src_part: tuple[int, int, int] | None = None   # (axis, start, stop) of the source tensor
  dst_part: tuple[tuple, int, int] | None = None  # (view shape, axis, index) of the target

  def part_shape(self, target: Sequence[int]) -> tuple:
    """The shape this rule writes: the target's (layer's) shape, its last axis split by the parts."""
    target = tuple(target)
    if self.dst_part is None:
      return target
    view, axis, _ = self.dst_part
    return target[:-1] + (target[-1] // view[axis],)

  def write(self, buf: np.ndarray, y: np.ndarray) -> None:
    """Writes `y` (shaped `part_shape`) into its part of the host buffer `buf` (target or layer)."""
    view, axis, index = self.dst_part
    np.moveaxis(buf.reshape(view), axis, 0)[index] = y.reshape(view[:axis] + view[axis + 1:])

  def read(self, host: np.ndarray) -> np.ndarray:
    """This rule's part of a whole target or layer (`host`), shaped `part_shape`."""
    if self.dst_part is None:
      return host
    view, axis, index = self.dst_part
    return np.take(host.reshape(view), index, axis=axis).reshape(self.part_shape(host.shape))

  def src_shape_part(self, shape: Sequence[int]) -> tuple:
    shape = tuple(shape)
    if self.src_part is None:
      return shape
    axis, start, stop = self.src_part
    return shape[:axis] + (stop - start,) + shape[axis + 1:]

  def read_index(self, ndim: int) -> tuple:
    if self.src_part is None:
      return (slice(None),) * ndim
    axis, start, stop = self.src_part
    return (slice(None),) * axis + (slice(start, stop),) + (slice(None),) * (ndim - axis - 1)


class WeightsMismatchError(ValueError):
  """A weights file and a key map / model disagree; the message lists every problem."""


def path_str(path: Path) -> str:
  return '/'.join(str(p) for p in path)


def _dst_str(rule: Rule) -> str:
  return path_str(rule.dst) + (f'[{rule.layer}]' if rule.layer is not None else '')


def check_plan(rules: Sequence[Rule], src_shapes: Mapping[str, tuple],
               dst_shapes: Mapping[Path, tuple], *, what: str = 'weights') -> None:
  """Raises one WeightsMismatchError naming every problem of moving `src_shapes` into `dst_shapes`.

  Problems: a source key no rule uses (unmapped), a key a rule needs that the source lacks
  (missing), a rule whose target is not a model param, a target shape mismatch, and a target
  param (or stacked layer) that no rule fills or that two rules fill.
  """
  problems = []
  used = {r.src for r in rules}
  unmapped = sorted(set(src_shapes) - used)
  if unmapped:
    problems.append(f'{len(unmapped)} unmapped source key(s): {", ".join(unmapped)}')
  missing = sorted({r.src for r in rules if r.src not in src_shapes})
  if missing:
    problems.append(f'{len(missing)} missing source key(s): {", ".join(missing)}')
  filled: dict[tuple, int] = {}
  parts: dict[tuple, list] = {}
  bad_shape, no_target = [], []
  for r in rules:
    if r.dst not in dst_shapes:
      no_target.append(f'{r.src} -> {_dst_str(r)}')
      continue
    key = (r.dst, r.layer)
    if r.dst_part is None or key not in parts:
      filled[key] = filled.get(key, 0) + 1
    if r.dst_part is not None:
      parts.setdefault(key, []).append(r.dst_part)
    if r.src not in src_shapes:
      continue
    target = tuple(dst_shapes[r.dst])
    if r.layer is not None:
      if not target or r.layer >= target[0]:
        bad_shape.append(f'{r.src} -> {_dst_str(r)}: target {target} has no layer {r.layer}')
        continue
      target = target[1:]
    src = tuple(src_shapes[r.src])
    if r.src_part is not None and (r.src_part[0] >= len(src) or r.src_part[2] > src[r.src_part[0]]):
      bad_shape.append(f'{r.src} {src}: part {r.src_part} is out of range')
      continue
    got = r.tf.shape(r.src_shape_part(src))
    if r.dst_part is not None and int(np.prod(r.dst_part[0])) != int(np.prod(target)):
      bad_shape.append(f'{r.src} -> {_dst_str(r)}: view {r.dst_part[0]} does not fit {target}')
      continue
    if got != r.part_shape(target):
      bad_shape.append(f'{r.src} {src} -> {_dst_str(r)}: gives {got}, model expects '
                       f'{r.part_shape(target)}')
  for (path, layer), ps in parts.items():
    view, axis = ps[0][0], ps[0][1]
    if sorted(p[2] for p in ps) != list(range(view[axis])) or any(
        (p[0], p[1]) != (view, axis) for p in ps):
      bad_shape.append(f'{path_str(path)}{"" if layer is None else f"[{layer}]"}: parts '
                       f'{sorted(p[2] for p in ps)} do not fill axis {axis} of view {view} once')
  if no_target:
    problems.append(f'{len(no_target)} rule(s) name no model param: {", ".join(no_target)}')
  if bad_shape:
    problems.append(f'{len(bad_shape)} shape mismatch(es): {"; ".join(bad_shape)}')
  unfilled, twice = [], []
  for path, shape in dst_shapes.items():
    layers = {r for (p, r) in filled if p == path}
    if layers == {None}:
      n = filled[(path, None)]
      if n > 1:
        twice.append(path_str(path))
      continue
    if None in layers:
      twice.append(f'{path_str(path)} (whole and per layer)')
      continue
    depth = shape[0] if shape else 0
    for i in range(depth) if layers else [None]:
      n = filled.get((path, i), 0)
      if n == 0:
        unfilled.append(path_str(path) + ('' if i is None else f'[{i}]'))
      elif n > 1:
        twice.append(f'{path_str(path)}[{i}]')
  if unfilled:
    problems.append(f'{len(unfilled)} model param(s) not filled: {", ".join(unfilled)}')
  if twice:
    problems.append(f'{len(twice)} model param(s) filled twice: {", ".join(twice)}')
  if problems:
    raise WeightsMismatchError(f'{what} do not match the model: ' + ' | '.join(problems))


def expand_blocks(n: int, src_prefix: str, dst_prefix: Path, table: Sequence[tuple],
                  scanned: bool) -> list[Rule]:
  """Rules for `n` identical blocks from a per-block table of
  (src_suffix, dst_suffix, tf[, src_part[, dst_part]]).

  Unscanned: block i lives at dst_prefix + (i,) + dst_suffix; scanned: at dst_prefix + dst_suffix
  with layer=i (the stacked leading axis).
  """
  out = []
  for i in range(n):
    for row in table:
      src_suffix, dst_suffix, tf = row[:3]
      part = row[3] if len(row) > 3 else None
      dst_part = row[4] if len(row) > 4 else None
      src = f'{src_prefix}.{i}.{src_suffix}'
      if scanned:
        out.append(Rule(src, tuple(dst_prefix) + tuple(dst_suffix), tf, i, part, dst_part))
      else:
        out.append(Rule(src, tuple(dst_prefix) + (i,) + tuple(dst_suffix), tf, None, part,
                        dst_part))
  return out
