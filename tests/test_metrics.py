"""Tests for rewarddance_jax.metrics.

1. JSON-lines round trip with Python, NumPy and JAX scalars; appending on resume; a partial
   last line from a killed run; `truncate_after`.
2. TensorBoard event files for scalars and images.
3. `progress_bar`, `image_grid` (shapes, padding, grey to RGB, value mapping) and `save_png`.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from rewarddance_jax.metrics import (
    MetricWriter,
    image_grid,
    progress_bar,
    read_metrics,
    save_png,
)


def test_jsonl_round_trip(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write_scalars(1, {"loss": 0.5, "reward": np.float32(0.25), "n": np.int64(3)})
    writer.write_scalars(2, {"loss": jnp.asarray(0.125), "ok": True, "nan": float("nan")})
    # Flushed on every call: readable while the writer is still open.
    assert len(read_metrics(writer.path)) == 2
  records = read_metrics(tmp_path / "metrics.jsonl")
  assert records[0] == {"step": 1, "loss": 0.5, "reward": 0.25, "n": 3}
  assert records[1]["loss"] == 0.125 and records[1]["ok"] == 1 and math.isnan(records[1]["nan"])
  assert read_metrics(tmp_path) == records  # a workdir works too
  with pytest.raises(ValueError, match="not a scalar"):
    MetricWriter(tmp_path, tensorboard=False).write_scalars(3, {"v": np.ones(2)})
  with pytest.raises(ValueError, match="reserved"):
    MetricWriter(tmp_path, tensorboard=False).write_scalars(3, {"step": 1})


def test_resume_appends_and_truncate_after(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    for step in range(1, 6):
      writer.write_scalars(step, {"loss": float(step)})
  # A run killed in the middle of a line.
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 6, "lo')
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    assert [r["step"] for r in read_metrics(writer.path)] == [1, 2, 3, 4, 5]
    assert writer.truncate_after(3) == 2
    assert [r["step"] for r in read_metrics(writer.path)] == [1, 2, 3]
    writer.write_scalars(4, {"loss": 40.0})
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert records[-1]["loss"] == 40.0
  assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_tensorboard_files(tmp_path):
  with MetricWriter(tmp_path) as writer:
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, "samples", np.zeros((8, 6, 3), np.uint8))
    writer.write_images(1, "grey", np.zeros((8, 6, 1), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
      writer.write_images(1, "bad", np.zeros((8, 6, 3), np.float32))
    writer.truncate_after(0)  # reopens TensorBoard with a purge step
    writer.write_scalars(1, {"loss": 2.0})
  events = sorted((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert len(events) == 2 and all(e.stat().st_size > 0 for e in events)
  assert [r["loss"] for r in read_metrics(tmp_path)] == [2.0]


def test_inactive_writer_writes_nothing(tmp_path):
  with MetricWriter(tmp_path / "w", active=False) as writer:
    writer.write_scalars(1, {"loss": 1.0})
    assert writer.truncate_after(0) == 0
  assert not (tmp_path / "w").exists()


def test_progress_bar(capsys):
  bar = progress_bar(10, initial=4, desc="train")
  bar.update(2)
  assert bar.n == 6 and bar.total == 10
  bar.close()
  assert "train" in capsys.readouterr().err
  bar = progress_bar(10, disable=True)
  bar.update(3)
  bar.close()
  assert capsys.readouterr().err == ""


def test_image_grid():
  images = np.zeros((5, 4, 3, 3), np.float32)
  images[1] = 1.0
  images[2] = 0.5
  grid = image_grid(images, ncols=2, pad=1)
  assert grid.dtype == np.uint8
  assert grid.shape == (3 * (4 + 1) + 1, 2 * (3 + 1) + 1, 3)
  assert (grid[1:5, 5:8] == 255).all()  # image 1: row 0, column 1
  assert (grid[6:10, 1:4] == 128).all()  # image 2: row 1, column 0 (0.5 * 255 rounds up)
  assert (grid[0] == 0).all() and (grid[:, 4] == 0).all()  # padding
  assert (grid[11:15, 5:8] == 0).all()  # empty cell
  # Default: ceil(sqrt(5)) = 3 columns; 1-channel images become grey RGB; out of range clips.
  grey = np.linspace(-1.0, 2.0, 5 * 2 * 2).reshape(5, 2, 2, 1)
  grid = image_grid(grey, pad=0)
  assert grid.shape == (4, 6, 3)
  assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all()
  assert grid[0, 0, 0] == 0 and grid[3, 2:4].max() == 255
  assert image_grid(np.ones((1, 2, 2, 3)), pad=0).shape == (2, 2, 3)


def test_save_png(tmp_path):
  image = image_grid(np.random.default_rng(0).uniform(size=(4, 5, 6, 3)))
  path = tmp_path / "sub" / "grid.png"
  save_png(path, image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
  with pytest.raises(ValueError, match="uint8"):
    save_png(tmp_path / "x.png", image.astype(np.float32))

