"""The one training loop every trainer runs on.

A trainer supplies a pure step `step_fn(state, batch, key) -> (state, metrics)` over a dict of
pytrees (`params`, `opt_state`, optional `ema`, ...), the state's shardings, a data iterator with
`get_state`/`set_state`, and hooks (sampling, evaluation). The loop:
  1. jits the step once with in/out shardings and the state donated; the step's `metrics` must
     include `loss` and `skipped` (1 when the update was dropped for a non-finite loss/grad).
     Inside the jitted program the loop then checks the returned state (one scalar, `all_finite`);
     if it holds a NaN or an infinity the old state is kept (bitwise) and `skipped` is 1, whatever
     the trainer's own check saw (Adam with eps = 0 turns finite gradients into NaN params).
     With a `step_key` the jitted step is kept (the last `STEP_CACHE_SIZE` keys): a trainer run
     again in the same process with the same key (a resume, a pipeline re-run) reuses the traced,
     lowered and compiled step instead of repeating seconds of tracing and lowering;
  2. resumes from the newest checkpoint in `workdir/checkpoints` if there is one: state (onto the
     current mesh, whatever mesh saved it), the step, the base key and the data-iterator state,
     so a resumed run continues the same key stream and batches (bitwise-identical losses).
     A corrupt checkpoint is set aside with a warning and the previous one restored instead.
     First it compares the config saved with that checkpoint to the current one, leaving out
     LOOP_ONLY_KEYS and LAYOUT_KEYS: a changed entry is refused with a one-line ValueError that
     lists each as `a.b: old -> new`, unless `resume_with_changes` (then it is logged and written
     to the metrics log as a `config_changes` line; later checkpoints hold the new config);
  3. per step: next host batch → global arrays → step with key fold_in(base_key, step);
  4. every `log_every` steps: metrics to JSONL/TensorBoard and the progress bar (ETA); lines of
     steps after the one it starts from (a resume, or 0) are dropped first, so a rerun never
     duplicates them;
  5. halts with a one-line error naming the newest checkpoint after `max_nonfinite` consecutive
     skipped steps; every checkpoint is finite (1, and `Checkpointer.save` refuses otherwise);
  6. checkpoints every `ckpt_every` steps and at the end (async), keeping the newest `keep` (so
     always the last); on SIGTERM it saves at the next step boundary, records the step in
     `SIGTERM_STOPS` and returns cleanly (launch/train.py then exits with status 143);
  7. runs each hook `(every, fn(state, step))` when `step % every == 0` and at the end; what a hook
     returns is logged: scalars, and uint8 images (H, W[, C]) to TensorBoard.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from rewarddance_jax import checkpoint as ckpt_lib
from rewarddance_jax import config_lib
from rewarddance_jax import metrics as metrics_lib
from rewarddance_jax.errors import InputError

StepFn = Callable[[dict, Any, jax.Array], tuple[dict, dict]]
Hook = tuple[int, Callable[[dict, int], dict | None]]


STEP_CACHE_SIZE = 4
_STEP_CACHE: collections.OrderedDict = collections.OrderedDict()


def clear_step_cache() -> None:
  """Forgets every kept jitted step (see `run`'s `step_key`)."""
  _STEP_CACHE.clear()


def _jit_step(step_key, make: Callable[[], Callable]) -> Callable:
  """`make()` (a jitted step), or the one kept for `step_key` (LRU of STEP_CACHE_SIZE)."""
  if step_key is None:
    return make()
  if step_key in _STEP_CACHE:
    _STEP_CACHE.move_to_end(step_key)
    return _STEP_CACHE[step_key]
  fn = _STEP_CACHE[step_key] = make()
  while len(_STEP_CACHE) > STEP_CACHE_SIZE:
    _STEP_CACHE.popitem(last=False)
  return fn


@dataclasses.dataclass(frozen=True)
class SplitStep:
  """A step run as two jitted programs, for one too big to compile as a whole (or with host work
  between them): `first(state, batch, key, consts) -> carry` (no donation), then
  `second(state, carry, batch, key, consts) -> (state, metrics)` (state donated, guarded as a
  fused step is). `fused` is their composition in one program."""
  first: Callable
  second: Callable

  def fused(self, state, batch, key, consts=None):
    return self.second(state, self.first(state, batch, key, consts), batch, key, consts)


def _jit_split(split: SplitStep, state_shardings) -> Callable:
  first = jax.jit(split.first)
  second = jax.jit(guard_step(lambda st, b, k, carry, consts: split.second(st, carry, b, k, consts)),
                   in_shardings=(state_shardings, None, None, None, None),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))
  return lambda s, b, k, consts=None: second(s, b, k, first(s, b, k, consts), consts)


class NonFiniteError(InputError, RuntimeError):
  """Raised after too many consecutive non-finite steps (a bad config value, most often)."""


# Config entries that steer the loop, its hooks and checkpoints, never the step function: left
# out of `common.step_cache_key`, and free to change on a resume.
LOOP_ONLY_KEYS = ('total_steps', 'log_every', 'max_nonfinite', 'ckpt', 'samples', 'eval',
                  'resume_with_changes')
# Entries that shape the compiled step but not its math (where arrays live): a resume may change
# them too, since the state restores onto any mesh.
LAYOUT_KEYS = ('mesh', 'sharding_rules')


@dataclasses.dataclass
class LoopConfig:
  """The loop's settings; each count must be an integer >= 1 (a one-line error names the config
  key of a bad one, see `CONFIG_KEYS`)."""
  total_steps: int
  log_every: int = 50
  ckpt_every: int = 500
  keep: int = 3
  async_save: bool = True
  max_nonfinite: int = 10
  progress: bool = True
  desc: str = 'train'
  resume_with_changes: bool = False

  CONFIG_KEYS = {'total_steps': 'total_steps', 'log_every': 'log_every',
                 'ckpt_every': 'ckpt.every', 'keep': 'ckpt.keep', 'max_nonfinite': 'max_nonfinite'}

  def __post_init__(self):
    for name, key in self.CONFIG_KEYS.items():
      config_lib.check_number(getattr(self, name), int, '[1, inf)', f'config.{key}')

  @classmethod
  def from_config(cls, config, **overrides) -> 'LoopConfig':
    ck = config.get('ckpt', {})
    kw = dict(total_steps=config.total_steps, log_every=config.get('log_every', 50),
              ckpt_every=ck.get('every', 500), keep=ck.get('keep', 3),
              async_save=bool(ck.get('async_save', True)),
              max_nonfinite=config.get('max_nonfinite', 10),
              resume_with_changes=bool(config.get('resume_with_changes', False)))
    kw.update(overrides)
    return cls(**kw)


def config_changes(saved: dict, current: dict) -> list[str]:
  """`a.b: old -> new` for each entry of two config dicts that differs, in key order, leaving out
  LOOP_ONLY_KEYS and LAYOUT_KEYS. Values compare as canonical JSON text (a tuple equals its list,
  NaN equals NaN, as they round-trip through a checkpoint); a missing entry shows as <absent>."""
  def flat(tree: dict, prefix: str = '') -> dict:
    out = {}
    for k, v in tree.items():
      if prefix or k not in LOOP_ONLY_KEYS + LAYOUT_KEYS:
        if isinstance(v, dict) and v:
          out.update(flat(v, f'{prefix}{k}.'))
        else:
          out[f'{prefix}{k}'] = json.dumps(v, sort_keys=True, default=repr)
    return out
  old, new = flat(saved), flat(current)
  return [f'{k}: {old.get(k, "<absent>")} -> {new.get(k, "<absent>")}'
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def all_finite(tree: Any) -> jax.Array:
  """True iff every float leaf of `tree` is finite. One scalar: the global norm of the leaves
  scaled by 2**-64 (exact), NaN or inf iff an entry is, unless the entries come within a few
  decades of the float maximum (unscaled, Adam's second moments above 1e19 would overflow it).
  The norm's sqrt matters: XLA copies cheap scalar chains into every leaf's select fusion, not
  an expensive op; without it (a squared norm, a count of non-finite entries, a sum of |x|) the
  digits step's compile time doubled (measured)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.isfinite(optax.tree.norm([x * 2.0**-64 for x in leaves]))


def guard_step(step_fn: StepFn) -> StepFn:
  """`step_fn` that keeps the old state (bitwise) and reports `skipped` = 1 when the state it
  returns holds a NaN or an infinity (`all_finite`)."""
  def guarded(state, batch, key, *consts):
    new, metrics = step_fn(state, batch, key, *consts)
    ok = all_finite(new)
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    skipped = jnp.maximum(jnp.asarray(metrics.get('skipped', 0), jnp.int32),
                          (~ok).astype(jnp.int32))
    return new, {**metrics, 'skipped': skipped}
  return guarded


def finite_or_skip(state: dict, new_state: dict, loss: jax.Array, grads: Any) -> tuple[dict,
                                                                                       jax.Array]:
  """Keeps `state` unchanged when the loss or any gradient is non-finite; returns (state, skipped).

  One scalar decides: the global gradient norm is finite iff every gradient entry is (it also
  overflows for a norm above ~1e19, a step worth dropping too). The norm is shared with the
  `grad_norm` metric and the clip; a per-leaf `all(isfinite)` chain instead gets copied by XLA
  into every leaf's select fusion (9k scalar ops, +25% compile time on the digits step).
  """
  ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
  chosen = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
  return chosen, (~ok).astype(jnp.int32)


def _changed_config(ckpt: ckpt_lib.Checkpointer, step: int, config_json: dict | None,
                    loop: LoopConfig) -> str:
  """The `config_changes` from the config checkpoint `step` was saved with to `config_json`, as
  one line ('' when either is empty or none is saved); raises unless `loop.resume_with_changes`."""
  step_dir = ckpt.step_directory(step)
  if not config_json or not (step_dir / 'config').is_dir():
    return ''
  saved = ckpt.restore(step, json=('config',))['config']
  changes = '; '.join(config_changes(saved, config_json)) if saved else ''
  if changes and not loop.resume_with_changes:
    raise ValueError(f'the config differs from the one {step_dir} was saved with: {changes}; '
                     'set --config.resume_with_changes=True to resume with the new values, or '
                     'start in a new workdir.')
  return changes


def _newest_intact(ckpt: ckpt_lib.Checkpointer, targets: dict, config_json: dict | None,
                   loop: LoopConfig) -> tuple[int | None, str, dict | None]:
  """(step, config changes, restored items) of the newest checkpoint that restores, or
  (None, '', None). A corrupt one (`CheckpointError`) is set aside (`Checkpointer.set_aside`,
  never deleted) with a one-line warning, and the next older one is tried; a changed config is
  refused (`_changed_config`). With several processes a corrupt step is an error: each
  process reads only its own shards, so they could disagree on which step is intact."""
  for step in reversed(ckpt.all_steps()):
    try:
      changes = _changed_config(ckpt, step, config_json, loop)
      return step, changes, ckpt.restore(step, arrays=targets, json=('data_iter',))
    except ckpt_lib.CheckpointError as e:
      if jax.process_count() > 1:
        raise
      moved = ckpt.set_aside(step)
      logging.warning('%s; moved it to %s and trying the previous checkpoint.', e, moved)
  return None, '', None


# Steps at which a run in this process stopped for SIGTERM before its last step (the checkpoint
# saved), newest last: launch/train.py exits with status 143 after such a run.
SIGTERM_STOPS: list[int] = []


def _write_hook_metrics(writer: metrics_lib.MetricWriter, step: int, values: dict) -> None:
  images = {k: v for k, v in values.items() if np.ndim(v) >= 2}
  for name, image in images.items():
    writer.write_images(step, name, image)
  scalars = {k: v for k, v in values.items() if k not in images}
  if scalars:
    writer.write_scalars(step, scalars)


class _Sigterm:
  """Turns SIGTERM into a flag the loop checks between steps (the main thread only)."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping at the next step.')
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _to_python(metrics: dict) -> dict:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def run(*, workdir: str, loop: LoopConfig, state: dict, state_shardings: dict, step_fn: StepFn,
        data_iter, to_device: Callable[[Any], Any], key: jax.Array, mesh,
        hooks: Sequence[Hook] = (), config_json: dict | None = None,
        context: Callable[[], Any] | None = None, consts: Any = None,
        step_key: Any = None) -> tuple[dict, int]:
  """Runs (or resumes) training to `loop.total_steps`; returns (final state, last step done).

  `context()` returns a context manager (mesh + logical rules) entered around tracing.
  `consts`: frozen trees (reward models, a reference policy) passed to every step as a fourth
  argument, `step_fn(state, batch, key, consts)`, in the shardings they already have; they are
  neither donated nor checkpointed.
  `step_key`: a hashable that determines `step_fn` (e.g. `common.step_cache_key` of the config);
  a run with a key seen before uses the jitted step of that earlier run (module docstring, 1).
  The shardings are added to the key here. None: always jit `step_fn` afresh.
  """
  context = context or contextlib.nullcontext
  ckpt = ckpt_lib.Checkpointer(f'{workdir}/checkpoints', max_to_keep=loop.keep,
                               async_save=loop.async_save)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  targets = {k: ckpt_lib.abstract_like(v, state_shardings[k]) for k, v in state.items()}
  targets['meta'] = ckpt_lib.abstract_like(
      {'step': np.int64(0), 'rng': np.asarray(jax.random.key_data(key))}, replicated)
  try:
    latest, changes, restored = _newest_intact(ckpt, targets, config_json, loop)
  except BaseException:
    ckpt.close()
    raise
  writer = metrics_lib.MetricWriter(workdir)
  start = 0
  if latest is not None:
    state = {k: restored[k] for k in state}
    start = int(restored['meta']['step'])
    key = jax.random.wrap_key_data(jnp.asarray(restored['meta']['rng']))
    data_iter.set_state(restored['data_iter'])
    logging.info('Resumed from %s at step %d.', ckpt.step_directory(latest), start)
  # Also without a checkpoint: a run that died before its first one left lines of steps it redoes.
  writer.truncate_after(start)
  if changes:
    logging.warning('Resuming with a changed config (resume_with_changes): %s', changes)
    writer.write_text(start, 'config_changes', changes)

  if step_key is not None:
    leaves, treedef = jax.tree.flatten(state_shardings)
    step_key = (step_key, treedef, tuple(leaves), consts is None)
  extra = () if consts is None else (None,)
  if isinstance(step_fn, SplitStep):
    jitted = _jit_step(step_key, lambda: _jit_split(step_fn, state_shardings))
  else:
    jitted = _jit_step(step_key, lambda: jax.jit(
        guard_step(step_fn), in_shardings=(state_shardings, None, None) + extra,
        out_shardings=(state_shardings, None), donate_argnums=(0,)))
  if consts is not None:
    with_consts = jitted
    jitted = lambda s, b, k: with_consts(s, b, k, consts)  # pylint: disable=unnecessary-lambda-assignment

  def save(step: int):
    meta = {'step': np.int64(step), 'rng': np.asarray(jax.random.key_data(key))}
    ckpt.save(step, arrays={**state, 'meta': meta},
              json={'data_iter': data_iter.get_state(), 'config': config_json or {}}, force=True)

  bar = metrics_lib.progress_bar(loop.total_steps, initial=start, desc=loop.desc,
                                 disable=not loop.progress)
  nonfinite_run, step, t0 = 0, start, time.time()

  def process(step: int, m: dict) -> None:
    # Called one step late, so fetching metrics never stalls the device queue.
    nonlocal nonfinite_run
    m = _to_python(m)
    nonfinite_run = nonfinite_run + 1 if m.get('skipped', 0) else 0
    if nonfinite_run >= loop.max_nonfinite:
      good = ckpt.latest_step()
      good = 'none was written' if good is None else str(ckpt.step_directory(good))
      raise NonFiniteError(
          f'halting at step {step}: {nonfinite_run} consecutive non-finite steps (loss, '
          f'gradient or updated state; each skipped, max_nonfinite={loop.max_nonfinite}); the '
          f'last good checkpoint: {good}.')
    if step % loop.log_every == 0 or step == loop.total_steps:
      m['steps_per_s'] = (step - start) / max(time.time() - t0, 1e-9)
      writer.write_scalars(step, m)
      bar.set_postfix(loss=f'{m["loss"]:.4f}')

  pending = None
  try:
    with _Sigterm() as term:
      for step in range(start + 1, loop.total_steps + 1):
        batch = to_device(next(data_iter))
        with context():
          state, m = jitted(state, batch, jax.random.fold_in(key, step))
        if pending is not None:
          process(*pending)
        pending = (step, m)
        bar.update(1)
        last = step == loop.total_steps
        for every, fn in hooks:
          if step % every == 0 or last:
            with context():
              extra = fn(state, step)
            if extra:
              _write_hook_metrics(writer, step, extra)
        if step % loop.ckpt_every == 0 or last or term.received:
          save(step)
        if term.received and not last:
          logging.warning('Stopped by SIGTERM after step %d; checkpoint saved.', step)
          SIGTERM_STOPS.append(step)
          break
      if pending is not None:
        process(*pending)
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  return state, step

