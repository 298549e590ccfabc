"""Training metrics: a JSON-lines log, TensorBoard, progress bars, image grids, reward stats.

1. `MetricWriter(workdir)` appends one JSON object per `write_scalars` call to
   `workdir/metrics.jsonl` (flushed each time, so a killed run keeps every line it wrote) and
   mirrors the scalars, and images from `write_images`, to TensorBoard under `workdir/tb`;
   `write_text` logs one string (a line `{"step": s, name: text}` and a TensorBoard text).
   Only process 0 writes in a multi-host run.
2. On resume it appends to the same file; `truncate_after(step)` first drops the lines of
   steps the resumed run will redo, and tells TensorBoard to hide its old events from then on.
3. `read_metrics(path)` reads the log back as a list of dicts.
4. `progress_bar(total, initial=..., desc=...)` is a tqdm bar with rate and ETA.
5. `image_grid` tiles (N, H, W, C) images in [0, 1] into one uint8 RGB image and `save_png`
   writes it with Pillow.
(GRPO's reward-variance window is in-graph state: train/grpo_step.py.)
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm

__all__ = [
    "MetricWriter",
    "image_grid",
    "progress_bar",
    "read_metrics",
    "save_png",
]

_JSONL_NAME = "metrics.jsonl"
_TB_DIR = "tb"
_TB_FILE_COUNTER = itertools.count()


def _scalar(name: str, value: Any) -> int | float:
  """A Python number from a Python / NumPy / JAX scalar (or any one-element array)."""
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"metric '{name}' is not a scalar (shape {array.shape})")
  item = array.reshape(()).item()
  if isinstance(item, bool):
    return int(item)
  if isinstance(item, (int, float)):
    return item
  raise TypeError(f"metric '{name}' has unsupported type {array.dtype}")


def _parse_lines(path: str) -> list[dict[str, Any]]:
  """Parses a metrics log; skips lines that are not JSON objects with a step."""
  records = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if not isinstance(record, dict) or "step" not in record:
        # Typically the last line of a run killed mid-write; losing it is the lesser evil
        # than refusing to read everything else.
        logging.warning("%s:%d: skipping malformed metrics line %r", path, number, line[:80])
        continue
      records.append(record)
  return records


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Reads a `metrics.jsonl` (or a workdir holding one) into a list of dicts, in file order."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, _JSONL_NAME)
  return _parse_lines(path)


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard, images to TensorBoard."""

  def __init__(
      self,
      workdir: str | os.PathLike[str],
      *,
      tensorboard: bool = True,
      active: bool | None = None,
  ):
    """Opens the log for appending.

    Args:
      workdir: run directory; created if missing.
      tensorboard: also write TensorBoard event files under `workdir/tb`.
      active: whether this process writes anything; None means "only process 0", so every
        host can call the writer without producing duplicate lines.
    """
    self._workdir = os.fspath(workdir)
    self._path = os.path.join(self._workdir, _JSONL_NAME)
    self._active = jax.process_index() == 0 if active is None else bool(active)
    self._use_tensorboard = tensorboard
    self._file = None
    self._tb = None
    if not self._active:
      return
    os.makedirs(self._workdir, exist_ok=True)
    self._open_jsonl()
    if tensorboard:
      self._tb = self._open_tensorboard(purge_step=None)

  @property
  def path(self) -> str:
    """Path of the JSON-lines log."""
    return self._path

  def _open_jsonl(self) -> None:
    # A run killed mid-write can leave a last line without its newline; terminate it so the
    # next record starts on a line of its own (the partial line is skipped when reading).
    if os.path.exists(self._path) and os.path.getsize(self._path) > 0:
      with open(self._path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        needs_newline = f.read(1) != b"\n"
      if needs_newline:
        with open(self._path, "a", encoding="utf-8") as f:
          f.write("\n")
    self._file = open(self._path, "a", encoding="utf-8")

  def _open_tensorboard(self, purge_step: int | None):
    # Imported here: only writers that use TensorBoard pay for the import.
    import tensorboardX  # pylint: disable=import-outside-toplevel

    # tensorboardX names event files by second and host only; a writer reopened within the
    # same second (resume, `truncate_after`) would otherwise truncate the previous file.
    suffix = f".{os.getpid()}.{next(_TB_FILE_COUNTER)}"
    return tensorboardX.SummaryWriter(
        os.path.join(self._workdir, _TB_DIR),
        purge_step=purge_step,
        flush_secs=30,
        filename_suffix=suffix,
    )

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends `{"step": step, **scalars}` as one line and logs each scalar to TensorBoard."""
    if not self._active:
      return
    if self._file is None:
      raise RuntimeError(f"MetricWriter for {self._workdir} is closed")
    if "step" in scalars:
      raise ValueError("'step' is reserved for the step number")
    values = {str(k): _scalar(k, v) for k, v in scalars.items()}
    # NaN/inf are written as NaN/Infinity, which Python's json reads back.
    self._file.write(json.dumps({"step": int(step), **values}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, value, global_step=int(step))

  def write_text(self, step: int, name: str, text: str) -> None:
    """Appends `{"step": step, name: text}` as one line and logs it as TensorBoard text."""
    if not self._active:
      return
    if self._file is None:
      raise RuntimeError(f"MetricWriter for {self._workdir} is closed")
    self._file.write(json.dumps({"step": int(step), str(name): str(text)}) + "\n")
    self._file.flush()
    if self._tb is not None:
      self._tb.add_text(str(name), str(text), global_step=int(step))

  def write_images(self, step: int, name: str, image: Any) -> None:
    """Logs one uint8 image of shape (H, W, C) with C in {1, 3, 4}, or (H, W), to TensorBoard."""
    if not self._active or self._tb is None:
      return
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise ValueError(f"image '{name}' must be uint8, got {image.dtype}")
    if image.ndim == 2:
      image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
      raise ValueError(f"image '{name}' must be (H, W, C) with C in 1/3/4, got {image.shape}")
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    self._tb.add_image(name, image, global_step=int(step), dataformats="HWC")

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def truncate_after(self, step: int) -> int:
    """Drops logged lines with a step greater than `step`; returns how many were dropped.

    Call it when resuming from checkpoint `step`, before writing again: the steps after it
    are re-run and would otherwise appear twice. TensorBoard is reopened with
    `purge_step=step + 1`, which makes it hide the old events from that step on.
    """
    if not self._active:
      return 0
    if self._file is None:
      raise RuntimeError(f"MetricWriter for {self._workdir} is closed")
    self._file.close()
    self._file = None
    records = _parse_lines(self._path) if os.path.exists(self._path) else []
    kept = [r for r in records if r["step"] <= step]
    # Write a new file and rename it over the old one, so a crash in between leaves either
    # the old log or the new one, never a half-written file.
    tmp_path = self._path + ".tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
      for record in kept:
        f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, self._path)
    self._open_jsonl()
    if self._tb is not None:
      self._tb.close()
      self._tb = self._open_tensorboard(purge_step=int(step) + 1)
    return len(records) - len(kept)

  def close(self) -> None:
    """Flushes and closes the log and TensorBoard. Safe to call twice."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def progress_bar(
    total: int,
    *,
    initial: int = 0,
    desc: str | None = None,
    disable: bool = False,
) -> tqdm.tqdm:
  """A tqdm bar with rate and ETA; `initial` lets a resumed run start at its step.

  tqdm computes the rate from the steps done since `initial`, so the ETA of a resumed run
  is not skewed by the steps of the earlier run.
  """
  return tqdm.tqdm(
      total=total,
      initial=initial,
      desc=desc,
      disable=disable,
      dynamic_ncols=True,
      smoothing=0.1,
  )


def image_grid(images: Any, ncols: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles images into one uint8 RGB image.

  Args:
    images: (N, H, W, C) with C in {1, 3} (or (N, H, W)), floats in [0, 1] (values outside
      are clipped, NaN becomes 0) or uint8.
    ncols: images per row; default ceil(sqrt(N)).
    pad: black pixels between images and around the border.

  Returns:
    uint8 array of shape (rows * (H + pad) + pad, ncols * (W + pad) + pad, 3).
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
    raise ValueError(f"expected (N, H, W, C) with N >= 1 and C in 1/3, got {images.shape}")
  if images.dtype != np.uint8:
    floats = np.nan_to_num(images.astype(np.float32), nan=0.0)
    images = np.round(np.clip(floats, 0.0, 1.0) * 255.0).astype(np.uint8)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, _ = images.shape
  ncols = max(1, min(ncols or math.ceil(math.sqrt(n)), n))
  nrows = math.ceil(n / ncols)
  grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), np.uint8)
  for i, image in enumerate(images):
    row, col = divmod(i, ncols)
    top, left = pad + row * (h + pad), pad + col * (w + pad)
    grid[top : top + h, left : left + w] = image
  return grid


def save_png(path: str | os.PathLike[str], image: Any) -> None:
  """Writes a uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array as a PNG."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"save_png needs uint8, got {image.dtype}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
    raise ValueError(f"save_png needs (H, W[, C]) with C in 1/3/4, got {image.shape}")
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  Image.fromarray(image).save(path, format="PNG")
