"""Multi-axis rotary position embedding (FLUX `EmbedND`), ready for video.

Each token has integer/float position ids over A axes (here 3: time, height, width). The head
dimension is split into `axes_dims` (sum = head_dim); axis a rotates its slice with frequencies
θ^(−2k/d_a), k < d_a/2. Pairs are interleaved (x[2k], x[2k+1]) as in FLUX:
  1. angles_a = ids[..., a, None] · ω_a                            (B, N, d_a/2) per axis
  2. concatenate the axes' angles                                  (B, N, head_dim/2)
  3. (x_{2k}, x_{2k+1}) ← (x_{2k}·cos − x_{2k+1}·sin, x_{2k}·sin + x_{2k+1}·cos)
Angles are computed in fp32 (positions up to thousands lose precision in bf16).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def rope_angles(ids: jax.Array, axes_dims: Sequence[int], theta: float = 10000.0) -> jax.Array:
  """ids (B, N, A) → angles (B, N, sum(axes_dims)/2) in fp32."""
  if ids.shape[-1] != len(axes_dims):
    raise ValueError(f'position ids have {ids.shape[-1]} axes but axes_dims={tuple(axes_dims)}.')
  parts = []
  for a, d in enumerate(axes_dims):
    if d % 2:
      raise ValueError(f'rope axes_dims={tuple(axes_dims)}: every entry must be even.')
    omega = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    parts.append(ids[..., a].astype(jnp.float32)[..., None] * omega)
  return jnp.concatenate(parts, axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates x (B, N, H, D) by angles (B, N, D/2), interleaved pairs; returns x's dtype."""
  dtype = x.dtype
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x0, x1 = xf[..., 0], xf[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape).astype(dtype)


def image_position_ids(batch: int, frames: int, height: int, width: int) -> jax.Array:
  """(B, F·H·W, 3) ids (t, h, w) for a row-major token grid; text tokens use zeros (FLUX)."""
  t, h, w = jnp.meshgrid(jnp.arange(frames), jnp.arange(height), jnp.arange(width), indexing='ij')
  ids = jnp.stack([t, h, w], axis=-1).reshape(-1, 3).astype(jnp.float32)
  return jnp.broadcast_to(ids[None], (batch,) + ids.shape)
