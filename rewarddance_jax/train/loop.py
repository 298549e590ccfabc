"""The one training loop every trainer runs on.

A trainer supplies a pure step `step_fn(state, batch, key) -> (state, metrics)` over a dict of
pytrees (`params`, `opt_state`, optional `ema`, ...), the state's shardings, a data iterator with
`get_state`/`set_state`, and hooks (sampling, evaluation). The loop:
  1. jits the step once with in/out shardings and the state donated; the step's `metrics` must
     include `loss` and `skipped` (1 when the update was dropped for a non-finite loss/grad).
     With a `step_key` the jitted step is kept (the last `STEP_CACHE_SIZE` keys): a trainer run
     again in the same process with the same key (a resume, a pipeline re-run) reuses the traced,
     lowered and compiled step instead of repeating seconds of tracing and lowering;
  2. resumes from the newest checkpoint in `workdir/checkpoints` if there is one: state (onto the
     current mesh, whatever mesh saved it), the step, the base key and the data-iterator state,
     so a resumed run continues the same key stream and batches (bitwise-identical losses);
  3. per step: next host batch → global arrays → step with key fold_in(base_key, step);
  4. every `log_every` steps: metrics to JSONL/TensorBoard and the progress bar (ETA);
  5. halts with a clear error after `max_nonfinite` consecutive skipped steps;
  6. checkpoints every `ckpt_every` steps and at the end (async); on SIGTERM it saves at the next
     step boundary and returns cleanly;
  7. runs each hook `(every, fn(state, step))` when `step % every == 0` and at the end.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
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
from rewarddance_jax import metrics as metrics_lib

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


class NonFiniteError(RuntimeError):
  """Raised after too many consecutive non-finite steps."""


@dataclasses.dataclass
class LoopConfig:
  total_steps: int
  log_every: int = 50
  ckpt_every: int = 500
  keep: int = 3
  async_save: bool = True
  max_nonfinite: int = 10
  progress: bool = True
  desc: str = 'train'

  @classmethod
  def from_config(cls, config, **overrides) -> 'LoopConfig':
    ck = config.get('ckpt', {})
    kw = dict(total_steps=int(config.total_steps), log_every=int(config.get('log_every', 50)),
              ckpt_every=int(ck.get('every', 500)), keep=int(ck.get('keep', 3)),
              async_save=bool(ck.get('async_save', True)),
              max_nonfinite=int(config.get('max_nonfinite', 10)))
    kw.update(overrides)
    return cls(**kw)


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
  writer = metrics_lib.MetricWriter(workdir)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  key_data = jax.random.key_data(key)
  start = 0
  latest = ckpt.latest_step()
  if latest is not None:
    targets = {k: ckpt_lib.abstract_like(v, state_shardings[k]) for k, v in state.items()}
    targets['meta'] = ckpt_lib.abstract_like(
        {'step': np.int64(0), 'rng': np.asarray(key_data)}, replicated)
    restored = ckpt.restore(latest, arrays=targets, json=('data_iter',))
    state = {k: restored[k] for k in state}
    start = int(restored['meta']['step'])
    key = jax.random.wrap_key_data(jnp.asarray(restored['meta']['rng']))
    data_iter.set_state(restored['data_iter'])
    writer.truncate_after(start)
    logging.info('Resumed from %s at step %d.', ckpt.step_directory(latest), start)

  if step_key is not None:
    leaves, treedef = jax.tree.flatten(state_shardings)
    step_key = (step_key, treedef, tuple(leaves), consts is None)
  extra = () if consts is None else (None,)
  jitted = _jit_step(step_key, lambda: jax.jit(
      step_fn, in_shardings=(state_shardings, None, None) + extra,
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
      raise NonFiniteError(
          f'halting at step {step}: {nonfinite_run} consecutive non-finite losses/grads '
          f'(max_nonfinite={loop.max_nonfinite}); the newest checkpoint is step '
          f'{ckpt.latest_step()} in {workdir}/checkpoints.')
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
              writer.write_scalars(step, extra)
        if step % loop.ckpt_every == 0 or last or term.received:
          save(step)
        if term.received:
          logging.warning('Stopped by SIGTERM after step %d; checkpoint saved.', step)
          break
      if pending is not None:
        process(*pending)
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  return state, step

