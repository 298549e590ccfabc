"""What it takes to import one model: its config, how to build it, where its tensors are, and the
key map. Every family module (flux, sd3, vae, text) turns a directory into a `ModelSpec`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flax import nnx

from rewarddance_jax.weights.keymap import Rule


@dataclass(frozen=True)
class ModelSpec:
  family: str                              # 'flux', 'sd3', 'vae', 't5', 'clip'
  source: str                              # directory (or file) holding the safetensors
  cfg: Any                                 # our config dataclass
  factory: Callable[[], nnx.Module]        # builds the module (abstractly, under eval_shape)
  rules: tuple[Rule, ...]
  prefer: str | None = None                # file stem to pick among several (diffusers names)
  ignore: tuple[str, ...] = ()             # redundant source keys (tied copies, buffers)
