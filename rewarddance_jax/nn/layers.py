"""Shared layers with logical axis names on every weight.

Conventions:
  1. Params are created in `param_dtype` (fp32 by default) and matmuls run in `dtype` (bf16 by config).
  2. Norms and modulation run in fp32 and cast back, so bf16 compute never normalises in bf16.
  3. Every Param gets logical names through `nnx.with_partitioning`; `parallel/sharding.py` maps
     them to mesh axes with the config's rules.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any

default_kernel_init = nnx.initializers.lecun_normal()


def dense(in_features: int, out_features: int, names: tuple[str | None, str | None], *,
          rngs: nnx.Rngs, use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, kernel_init=default_kernel_init,
          bias_init=nnx.initializers.zeros_init()) -> nnx.Linear:
  """An `nnx.Linear` whose kernel is named `names` (in, out) and whose bias is named (out,)."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(kernel_init, names),
      bias_init=nnx.with_partitioning(bias_init, (names[1],)), rngs=rngs)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis with a learned scale (FLUX/SD3 q/k norm); fp32 inside."""

  def __init__(self, dim: int, *, eps: float = 1e-6, name: str = 'norm',
               param_dtype: Dtype = jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters (adaLN supplies scale and shift); fp32 inside."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return ((x - mean) * jax.lax.rsqrt(var + eps)).astype(dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation x·(1 + scale) + shift, with (B, D) shift/scale broadcast over tokens."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [cos(t·f), sin(t·f)], f_k = max_period^(−k/half) (FLUX order).

  `t` is already scaled (the generator feeds 1000·σ). Computed in fp32.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class MLPEmbedder(nnx.Module):
  """Linear → SiLU → Linear, used for the timestep, guidance and pooled-text vectors."""

  def __init__(self, in_dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.in_layer = dense(in_dim, hidden, (None, 'embed'), rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)
    self.out_layer = dense(hidden, hidden, ('mlp', 'embed'), rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out_layer(jax.nn.silu(self.in_layer(x)))


class Modulation(nnx.Module):
  """adaLN: SiLU(vec) → Linear(D, n·D), split into n (B, D) chunks (shift/scale/gate ...)."""

  def __init__(self, dim: int, n: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, zero_init: bool = False):
    self.n = n
    init = nnx.initializers.zeros_init() if zero_init else default_kernel_init
    self.lin = dense(dim, n * dim, ('embed', 'mlp'), rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype, kernel_init=init)

  def __call__(self, vec: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.split(self.lin(jax.nn.silu(vec)), self.n, axis=-1))


class FeedForward(nnx.Module):
  """Linear(D, r·D) → GELU(tanh) → Linear(r·D, D), the MMDiT MLP."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.fc1 = dense(dim, hidden, ('embed', 'mlp'), rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype)
    self.fc2 = dense(hidden, dim, ('mlp', 'embed'), rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))
