"""Exponential moving average of the policy parameters (docs/algorithms.md §3.6, §10 #13).

  ema ← d·ema + (1 − d)·θ                       (every leaf, in float32)

- DanceGRPO: ``--use_ema --ema_decay 0.995``, updated every optimizer step ("Enabling EMA helps
  with better visualization"; DG:scripts/finetune/*.sh). Our default (§10 #13): d = 0.995 per step,
  used for evaluation and checkpoints.
- Flow-GRPO (FG:flow_grpo/ema.py ``EMAModuleWrapper``): updated every 8 steps with the warm-up decay
  d(s) = min((1 + s)/(10 + s), 0.9), so early averages forget the random start quickly ("affects
  the previous 20×8 = 160 steps"); not built in: every trainer uses a constant `ema_decay`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ema_update(ema_params: Any, params: Any, decay: Any) -> Any:
  """d·ema + (1 − d)·θ leaf by leaf; returns a float32 pytree with the structure of ``params``.

  Args:
    ema_params: pytree of the running average (float32 usually).
    params: pytree of the current parameters, same structure (any float dtype, e.g. bf16).
    decay: d in [0, 1], a Python float or a traced scalar (jit-able).

  Raises:
    ValueError: the two pytrees differ in structure.
  """
  decay = jnp.asarray(decay, jnp.float32)

  def update(e: jax.Array, p: jax.Array) -> jax.Array:
    return decay * jnp.asarray(e, jnp.float32) + (1.0 - decay) * jnp.asarray(p, jnp.float32)

  return jax.tree.map(update, ema_params, params)

