"""Train-state checkpoints: a thin wrapper around Orbax's V0 `CheckpointManager`.

Orbax stays behind this module (docs/design.md §5), so the later move to the V1
`training.Checkpointer` only touches this file. What it does:

1. `Checkpointer(directory)` creates the directory and an `ocp.CheckpointManager` with
   `max_to_keep`, `save_interval_steps` and (by default) asynchronous saves.
2. `save(step, arrays=..., json=...)` writes one Orbax item per entry: array pytrees
   (`params`, `opt_state`, `meta`, ...) with `ocp.args.StandardSave`, JSON-able dicts
   (`data_iter`, `config`, ...) with `ocp.args.JsonSave`. A save that starts while an
   earlier async save is still writing waits for it first (Orbax does this itself). It first
   refuses (ValueError naming the item and key paths, nothing written) any float leaf holding
   a NaN or an infinity: one jitted call checks every device array, NumPy checks host ones.
3. `restore(step, arrays=..., json=...)` first checks the step directory on its own: the
   commit marker, one folder per requested item, and the saved tree against the target
   (key paths and shapes), so a broken or mismatched checkpoint gives a one-line error that
   names the step directory, the item and the key paths. It then restores item by item, each
   array leaf straight into the `sharding` of its `jax.ShapeDtypeStruct` target, so a
   checkpoint saved on one mesh restores onto any other mesh or a single device.
4. `abstract_like(tree, shardings)` builds such targets from arrays, from
   `ShapeDtypeStruct`s (e.g. `jax.eval_shape` output) and an optional tree of shardings.
5. `wait()` blocks until the pending async save is on disk; `close()` (also on leaving the
   `with` block) waits and then releases Orbax's threads.

6. `read_item(step, name)` restores one array item as saved (for inspection, no target), and
   `set_aside(step)` moves a corrupt step out of the directory (to `<directory>_corrupt/`).

Nothing here deletes or rewrites files when something goes wrong; the only deletions are
Orbax's `max_to_keep` pruning of old steps after a successful save. A corrupt step raises
`CheckpointError`, a subclass of `RuntimeError` and `errors.InputError`.
"""

from __future__ import annotations

import functools
import json as json_lib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rewarddance_jax.errors import InputError

__all__ = ["CheckpointError", "Checkpointer", "abstract_like"]

PyTree = Any

# Orbax writes this file into every finished step directory, on local disks as well as on
# object stores (atomicity.py `COMMIT_SUCCESS_FILE`), just before it publishes the step.
_COMMIT_MARKER = "commit_success.txt"
# At most this many key paths are listed in a mismatch error, to keep it readable.
_MAX_LISTED_PATHS = 6


class CheckpointError(InputError, RuntimeError):
  """A step directory that is partial, corrupt or unreadable; the message names it."""


def _one_line(error: BaseException, limit: int = 300) -> str:
  """`Type: first line` of the innermost cause of `error`, shortened: Orbax wraps TensorStore
  errors whose text dumps whole specs, the cause says what is wrong (a short file, bad JSON)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  line = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return line if len(line) <= limit else line[: limit - 3] + "..."


def _key_str(key: Any) -> str:
  """One key-path entry as a string, the way Orbax names the saved leaves."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_str(path: Sequence[Any]) -> str:
  return "/".join(_key_str(k) for k in path) or "<root>"


def _flat_by_path(tree: PyTree) -> dict[str, Any]:
  """Leaves keyed by their key path. None and empty nodes have no leaves, as in Orbax."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_str(path): leaf for path, leaf in leaves}


def _list_paths(paths: Sequence[str]) -> str:
  paths = sorted(paths)
  shown = ", ".join(paths[:_MAX_LISTED_PATHS])
  more = len(paths) - _MAX_LISTED_PATHS
  return shown + (f" (+{more} more)" if more > 0 else "")


def _abstract_leaf(leaf: Any, sharding: Any) -> jax.ShapeDtypeStruct:
  """One target leaf. Python and NumPy scalars become 0-d structs (JAX default dtypes)."""
  if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
    shape, dtype = leaf.shape, leaf.dtype
    if sharding is None:
      sharding = getattr(leaf, "sharding", None)
  else:
    # `jnp.asarray`'s dtype rules: a Python int becomes int32 unless x64 is on, which is what
    # a jitted step would have produced for the same value.
    value = np.asarray(leaf)
    shape, dtype = value.shape, jax.dtypes.canonicalize_dtype(value.dtype)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def abstract_like(tree: PyTree, shardings: PyTree | jax.sharding.Sharding | None = None) -> PyTree:
  """Restore target for `tree`: each leaf becomes a `jax.ShapeDtypeStruct` with a sharding.

  Args:
    tree: pytree of `jax.Array`, `jax.ShapeDtypeStruct`, NumPy arrays or scalars. None and
      empty nodes (Optax `EmptyState`, masked-out entries) are kept as they are.
    shardings: None (keep each leaf's own sharding; NumPy leaves get none and restore as
      NumPy), one `jax.sharding.Sharding` for every leaf, or a pytree with `tree`'s
      structure whose leaves are shardings or None (None keeps the leaf's own sharding).

  Returns:
    A pytree of `jax.ShapeDtypeStruct` with the structure of `tree`.
  """
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda leaf: _abstract_leaf(leaf, shardings), tree)
  # `tree` is the structure prefix: where it has a leaf, `shardings` may hold a None, which
  # is passed through as "no sharding given" instead of being read as an empty subtree.
  return jax.tree.map(_abstract_leaf, tree, shardings)


def _copy_host_leaf(leaf: Any) -> Any:
  # An async save writes NumPy leaves from a background thread; copying them now means the
  # caller may keep mutating its buffers. `jax.Array`s are copied to host by Orbax itself
  # before `save` returns.
  return np.array(leaf, copy=True) if isinstance(leaf, np.ndarray) else leaf


@functools.lru_cache(maxsize=None)
def _finite_per_leaf(out_sharding: jax.sharding.Sharding | None):
  """Jitted `leaves -> bool per leaf (all finite)`, its result in `out_sharding`."""
  return jax.jit(lambda leaves: jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]),
                 out_shardings=out_sharding)


def _nonfinite_paths(arrays: Mapping[str, PyTree]) -> list[str]:
  """`item/key/path` of every float leaf of `arrays` that holds a NaN or an infinity. Device
  arrays are checked where they live, one jitted call per mesh (or device set; one bool per
  leaf comes back), host values with NumPy."""
  flat = [(f"{name}/{_path_str(path)}", leaf) for name, tree in arrays.items()
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
  bad, groups = [], {}
  for path, leaf in flat:
    if not isinstance(leaf, jax.Array):
      leaf = np.asarray(leaf)
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      continue
    if isinstance(leaf, jax.Array):
      sharding = leaf.sharding
      where = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else (
          frozenset(sharding.device_set))
      groups.setdefault(where, []).append((path, leaf))
    elif not np.isfinite(leaf).all():
      bad.append(path)
  for group in groups.values():
    sharding = group[0][1].sharding
    # Replicated over the leaves' mesh, so every host reads the whole answer locally.
    replicated = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
                  if isinstance(sharding, jax.sharding.NamedSharding) else None)
    ok = np.asarray(_finite_per_leaf(replicated)([x for _, x in group]).addressable_data(0))
    bad += [p for (p, _), good in zip(group, ok) if not good]
  return sorted(bad)


class Checkpointer:
  """Saves and restores train-state items under `directory/<step>/<item>`.

  Usage:
    with Checkpointer(workdir / "ckpt", max_to_keep=3) as ckpt:
      ckpt.save(step, arrays={"params": params, "opt_state": opt_state, "meta": meta},
                json={"config": config_dict, "data_iter": iter_state})
      ...
      restored = ckpt.restore(ckpt.latest_step(),
                              arrays={"params": abstract_like(params, param_shardings)},
                              json=("config",))
  """

  def __init__(
      self,
      directory: str | os.PathLike[str],
      *,
      max_to_keep: int | None = 3,
      save_interval_steps: int = 1,
      async_save: bool = True,
  ):
    """Opens (and creates) a checkpoint directory.

    Args:
      directory: local path or a path Orbax/etils can open (e.g. `gs://...`).
      max_to_keep: number of most recent steps kept on disk; None keeps all.
      save_interval_steps: `save` without `force` only writes steps that are a multiple.
      async_save: write in a background thread after the device-to-host copy.
    """
    directory = os.fspath(directory)
    # Orbax resolves step paths against the directory it was given; an absolute path keeps
    # error messages unambiguous when the working directory changes.
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self._directory = epath.Path(directory)
    self._directory.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        create=True,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(self._directory, options=options)
    # Reads only metadata (tree structure, shapes); used to check a checkpoint before
    # restoring it, without going through the manager's handler registry.
    self._metadata_handler = ocp.StandardCheckpointHandler()
    self._closed = False

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def step_directory(self, step: int) -> epath.Path:
    """Where `step` lives (Orbax's standard name format: the bare step number)."""
    return ocp.step.build_step_path(self._directory, ocp.step.standard_name_format(), step)

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeError(f"Checkpointer for {self._directory} is closed")

  def save(
      self,
      step: int,
      *,
      arrays: Mapping[str, PyTree],
      json: Mapping[str, Mapping[str, Any]] | None = None,
      force: bool = False,
  ) -> bool:
    """Saves one step; returns whether a checkpoint was started.

    Args:
      step: training step.
      arrays: item name -> pytree of arrays/scalars (None and empty nodes allowed).
      json: item name -> JSON-serialisable dict.
      force: save even if `save_interval_steps` says otherwise. An existing step is never
        overwritten: Orbax raises `StepAlreadyExistsError` instead.

    Returns:
      False when the step is skipped (not on the save interval, or not newer than the
      latest saved step), True otherwise. With `async_save` the files are complete only
      after `wait()`, the next `save()` or `close()`.
    """
    self._check_open()
    json = dict(json or {})
    arrays = dict(arrays)
    clash = sorted(set(arrays) & set(json))
    if clash:
      raise ValueError(f"item names used both as arrays and json: {clash}")
    if not arrays and not json:
      raise ValueError("save() needs at least one item")
    bad = _nonfinite_paths(arrays)
    if bad:
      raise ValueError(
          f"refusing to save checkpoint {self.step_directory(step)}: non-finite values (NaN or "
          f"inf) in {_list_paths(bad)}"
      )
    items: dict[str, ocp.args.CheckpointArgs] = {}
    for name, tree in arrays.items():
      items[name] = ocp.args.StandardSave(jax.tree.map(_copy_host_leaf, tree))
    for name, value in json.items():
      try:
        # Round trip through text now: fails early (in the caller's thread) on values that
        # cannot be stored, and snapshots the dict before the async write reads it.
        snapshot = json_lib.loads(json_lib.dumps(value))
      except (TypeError, ValueError) as e:
        raise ValueError(f"json item '{name}' is not JSON-serialisable: {e}") from e
      items[name] = ocp.args.JsonSave(snapshot)

    latest = self._manager.latest_step()
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except ocp.checkpoint_manager.StepAlreadyExistsError as e:
      # Same type (a ValueError), but naming the directory; nothing on disk was touched.
      raise ocp.checkpoint_manager.StepAlreadyExistsError(
          f"checkpoint {self.step_directory(step)} already exists; not overwriting it"
      ) from e
    if not saved and latest is not None and step <= latest:
      # Orbax skips such steps silently; on a resumed run this usually means the directory
      # holds steps from a later point of an older run, which deserves a visible warning.
      logging.warning(
          "Checkpoint step %d not saved: %s already holds step %d", step, self._directory, latest
      )
    return bool(saved)

  def latest_step(self) -> int | None:
    """Newest step known to the manager (including one still being written asynchronously)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(int(s) for s in self._manager.all_steps())

  def set_aside(self, step: int) -> epath.Path:
    """Moves step `step` out of the managed directory, to `<directory>_corrupt/<step>[.n]`, and
    returns where: later saves of that step and Orbax's `max_to_keep` pruning (which counts every
    step it lists) then never touch it, and nothing is deleted."""
    self._check_open()
    self.wait()
    aside = self._directory.parent / f"{self._directory.name}_corrupt"
    aside.mkdir(parents=True, exist_ok=True)
    target, n = aside / str(step), 0
    while target.exists():
      n += 1
      target = aside / f"{step}.{n}"
    self.step_directory(step).rename(target)
    self._manager.reload()
    return target

  def _check_item_dir(self, step_dir: epath.Path, name: str) -> epath.Path:
    item_dir = step_dir / name
    if not item_dir.is_dir():
      present = sorted(p.name for p in step_dir.iterdir() if p.is_dir())
      raise CheckpointError(
          f"checkpoint {step_dir} has no folder for item '{name}' (partial checkpoint or wrong "
          f"item name; items present: {present})"
      )
    return item_dir

  def _check_tree(self, step_dir: epath.Path, name: str, target: PyTree) -> None:
    """Compares the saved tree of item `name` with `target`: key paths, then shapes."""
    item_dir = self._check_item_dir(step_dir, name)
    try:
      saved = self._metadata_handler.metadata(item_dir).tree
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise CheckpointError(
          f"checkpoint {step_dir}: metadata of item '{name}' is unreadable "
          f"({_one_line(e)})"
      ) from e
    saved_flat = _flat_by_path(saved)
    target_flat = _flat_by_path(target)
    problems = []
    missing = set(target_flat) - set(saved_flat)
    if missing:
      problems.append(f"not in checkpoint: {_list_paths(list(missing))}")
    extra = set(saved_flat) - set(target_flat)
    if extra:
      problems.append(f"not in restore target: {_list_paths(list(extra))}")
    bad_shapes = [
        f"{path} saved {tuple(saved_flat[path].shape)} vs target {tuple(leaf.shape)}"
        for path, leaf in target_flat.items()
        if path in saved_flat
        and getattr(saved_flat[path], "shape", None) is not None
        and tuple(saved_flat[path].shape) != tuple(leaf.shape)
    ]
    if bad_shapes:
      problems.append(f"shape mismatch: {_list_paths(bad_shapes)}")
    if problems:
      raise ValueError(
          f"checkpoint {step_dir}: item '{name}' does not match the restore target; "
          + "; ".join(problems)
      )

  def restore(
      self,
      step: int,
      *,
      arrays: Mapping[str, PyTree] | None = None,
      json: Sequence[str] = (),
  ) -> dict[str, Any]:
    """Restores the requested items of one step.

    Args:
      step: a step listed by `all_steps()`.
      arrays: item name -> target pytree, normally from `abstract_like`. Leaves that are
        `jax.ShapeDtypeStruct` with a sharding are restored straight into that layout (any
        mesh); the dtype may differ from the saved one (Orbax casts). Without a sharding a
        leaf saved from NumPy comes back as NumPy, one saved from a `jax.Array` with its
        saved sharding (same devices only).
      json: names of JSON items to restore.

    Returns:
      item name -> restored pytree / dict, with the target's pytree structure (NamedTuples,
      None and empty nodes included).

    Raises:
      FileNotFoundError: no such step.
      CheckpointError (a RuntimeError): the step is corrupt or partial (missing commit marker
        or item folder, unreadable metadata or data); the message names the step directory
        and the item.
      ValueError: the saved tree does not match a target (names the key paths).
    """
    self._check_open()
    # A restore of the step that is still being written must see the finished files.
    self.wait()
    arrays = dict(arrays or {})
    # A bare string would otherwise be read as one item per character.
    json = (json,) if isinstance(json, str) else tuple(json)
    if not arrays and not json:
      raise ValueError("restore() needs at least one item")
    step_dir = self.step_directory(step)
    if step not in self.all_steps():
      if step_dir.exists():
        raise CheckpointError(
            f"checkpoint {step_dir} is not a finished checkpoint (Orbax does not list it)"
        )
      raise FileNotFoundError(
          f"no checkpoint for step {step} in {self._directory} (steps: {self.all_steps()})"
      )
    if not (step_dir / _COMMIT_MARKER).exists():
      raise CheckpointError(
          f"checkpoint {step_dir} is partial: commit marker '{_COMMIT_MARKER}' is missing"
      )

    targets = {name: abstract_like(tree) for name, tree in arrays.items()}
    for name, target in targets.items():
      self._check_tree(step_dir, name, target)
    for name in json:
      self._check_item_dir(step_dir, name)

    requests: dict[str, ocp.args.CheckpointArgs] = {
        name: ocp.args.StandardRestore(target) for name, target in targets.items()
    }
    requests.update({name: ocp.args.JsonRestore() for name in json})
    restored: dict[str, Any] = {}
    # One item per call: an error can then name the item it came from.
    for name, request in requests.items():
      try:
        result = self._manager.restore(step, args=ocp.args.Composite(**{name: request}))
      except Exception as e:  # pylint: disable=broad-exception-caught
        raise CheckpointError(
            f"checkpoint {step_dir}: item '{name}' could not be restored "
            f"({_one_line(e)})"
        ) from e
      restored[name] = result[name]
    for name in json:
      if not isinstance(restored[name], dict):
        raise CheckpointError(
            f"checkpoint {step_dir}: json item '{name}' holds a "
            f"{type(restored[name]).__name__}, not a dict"
        )
    return restored

  def read_item(self, step: int, name: str) -> PyTree:
    """Array item `name` of `step` as it was saved, every leaf on this process's first device:
    a checkpoint inspected without the model that wrote it (its metadata gives the target)."""
    item_dir = self._check_item_dir(self.step_directory(step), name)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          self._metadata_handler.metadata(item_dir).tree)
    return self.restore(step, arrays={name: target})[name]

  def wait(self) -> None:
    """Blocks until a pending async save is committed (and old steps are pruned)."""
    if not self._closed:
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the pending save, then releases Orbax's resources. Safe to call twice."""
    if self._closed:
      return
    try:
      self._manager.wait_until_finished()
    finally:
      self._closed = True
      self._manager.close()
      self._metadata_handler.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
