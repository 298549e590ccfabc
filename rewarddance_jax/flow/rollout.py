"""Scanned rollouts of a rectified flow that store what GRPO needs (docs/algorithms.md §2.5, §3.1, §3.6).

Algorithm:
  1. Initial noise x_T ~ N(0, I). With same noise (DanceGRPO ``--init_same_noise``, Flow-GRPO
     ``same_latent``; our default, §10 #11) the batch is read as B/G adjacent groups of G rows, and
     group g draws ``normal(fold_in(key, g), shape[1:])``: a group shares x_T wherever it lives.
  2. ``jax.lax.scan`` over the N steps of a schedule σ_0 = 1 > ... > σ_N = 0. Step i:
     a. ``v = velocity_fn(x_i, σ_i·1_B)`` (the closure holds params, conditioning and guidance);
     b. the step of ``kind`` (rewarddance_jax.flow.steps) with key ``fold_in(key, i)``; where
        ``sde_mask[i]`` is False it is the ODE step instead, with log-prob 0 (Flow-GRPO-Fast and
        MixGRPO windows, §3.5);
     c. ``x̂0 = x_i − σ_i·v`` is carried, so the last step's x̂0 is returned (DanceGRPO decodes it,
        DG ``run_sample_step``; with σ_N = 0 and an ODE last step it equals x_N);
     d. (x_i, x_{i+1}) of the steps in ``keep_steps`` are written into (K, B, ...) buffers, and
        log-prob and σ are kept for them only: memory scales with the trained steps, not with N.
  3. ``transition_log_prob`` re-evaluates the velocity on stored states and scores the stored
     x_{i+1} with the same step code, so with unchanged params, the rollout's rows in the rollout's
     places (a matmul's rounding depends on its row count and on where a row sits) the GRPO ratio
     is 1 up to how XLA fuses the two programs (§2.3; the DanceGRPO README and DG #57 show what
     breaks otherwise).

Everything is float32 (stored latents included); the velocity function may compute in bf16.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rewarddance_jax.flow import steps

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


class Trajectory(NamedTuple):
  """Stored rollout; K = number of kept steps (N by default). All float32.

  Attributes:
    x: (K, B, ...) states x_i at the kept steps.
    x_next: (K, B, ...) sampled next states x_{i+1}.
    logp: (K, B) per-element mean log-probs of x_next (0 for ODE steps).
    sigma: (K,) σ_i of the kept steps.
    sigma_next: (K,) σ_{i+1} of the kept steps.
    x0_hat: (B, ...) the last step's predicted x0, ``x_{N−1} − σ_{N−1}·v_{N−1}``.
    x_final: (B, ...) the final state x_N.
  """
  x: jax.Array
  x_next: jax.Array
  logp: jax.Array
  sigma: jax.Array
  sigma_next: jax.Array
  x0_hat: jax.Array
  x_final: jax.Array


def initial_noise(key: jax.Array, shape: Sequence[int], *, group_size: int = 1,
                  same_noise: bool = False, dtype: Any = jnp.float32) -> jax.Array:
  """Initial noise x_T of shape (B, ...), optionally shared by adjacent groups of rows.

  The noise is drawn in float32 and then cast, so it does not depend on ``dtype`` beyond rounding.

  Args:
    key: PRNG key.
    shape: (B, ...) output shape.
    group_size: G, rows per group (only used with same_noise).
    same_noise: if True, rows [gG, (g+1)G) all equal ``normal(fold_in(key, g), shape[1:])``.
    dtype: output dtype.

  Raises:
    ValueError: same_noise with a batch not divisible by group_size.
  """
  shape = tuple(int(d) for d in shape)
  if not same_noise:
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)
  batch = shape[0]
  if group_size < 1 or batch % group_size:
    raise ValueError(f'same_noise needs the batch size ({batch}) to be divisible by group_size '
                     f'({group_size}).')
  group_ids = jnp.arange(batch // group_size)
  # vmap over fold_in keys gives the same bits as one call per group, in one op.
  draws = jax.vmap(
      lambda g: jax.random.normal(jax.random.fold_in(key, g), shape[1:], jnp.float32))(group_ids)
  return jnp.repeat(draws, group_size, axis=0).astype(dtype)


def _batch_sigma(sigma: Any, batch: int) -> jax.Array:
  """A scalar or (B,) σ as the (B,) float32 array the velocity function receives."""
  return jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,))


def _kept_steps(keep_steps: Sequence[int] | None, num_steps: int) -> tuple[int, ...]:
  """Validated, sorted static tuple of kept step indices."""
  if keep_steps is None:
    return tuple(range(num_steps))
  kept = tuple(sorted(int(i) for i in keep_steps))
  if len(set(kept)) != len(kept) or any(i < 0 or i >= num_steps for i in kept):
    raise ValueError(f'keep_steps must be distinct step indices in [0, {num_steps}), got '
                     f'{tuple(keep_steps)}.')
  return kept


def _store(buf: jax.Array, value: jax.Array, slot: jax.Array, keep: jax.Array) -> jax.Array:
  """Writes value into buf[slot] if keep, else rewrites buf[slot] unchanged.

  Always issuing the dynamic update (instead of a lax.cond) keeps it in place in the scan carry.
  """
  current = jax.lax.dynamic_index_in_dim(buf, slot, axis=0, keepdims=False)
  return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(keep, value, current), slot, axis=0)


def rollout(velocity_fn: VelocityFn, x_init: jax.Array, sigmas: Any, key: jax.Array, *,
            kind: str = 'ode', noise_level: Any = 0.0, sde_mask: Any = None,
            keep_steps: Sequence[int] | None = None) -> Trajectory:
  """Samples x_init along ``sigmas`` with a scan and stores the transitions (module docstring).

  Args:
    velocity_fn: ``(x (B, ...) f32, sigma (B,) f32) -> v (B, ...)``, closing over params and
      conditioning.
    x_init: (B, ...) initial noise (cast to float32).
    sigmas: (N + 1,) decreasing schedule ending at 0; may be traced.
    key: PRNG key; step i uses ``fold_in(key, i)``.
    kind: step kind, one of ``steps.STEP_KINDS`` (static).
    noise_level: η ('dance') or a ('flow_grpo', 'cps'); may be traced.
    sde_mask: optional (N,) bool, SDE of ``kind`` where True and ODE where False; default all SDE
      (all ODE for kind 'ode'). May be traced.
    keep_steps: optional static step indices to store (sorted in the output); default all N.

  Returns:
    A Trajectory (all float32).
  """
  steps.check_step_kind(kind)
  x = jnp.asarray(x_init, jnp.float32)
  sigmas = jnp.asarray(sigmas, jnp.float32)
  if sigmas.ndim != 1 or sigmas.shape[0] < 2:
    raise ValueError(f'sigmas must be a (N + 1,) array with N >= 1, got shape {sigmas.shape}.')
  num_steps = sigmas.shape[0] - 1
  batch = x.shape[0]
  stochastic = kind != 'ode'
  if sde_mask is None:
    sde_mask = jnp.full((num_steps,), stochastic)
  sde_mask = jnp.asarray(sde_mask, jnp.bool_)
  if sde_mask.shape != (num_steps,):
    raise ValueError(f'sde_mask must have shape ({num_steps},), got {sde_mask.shape}.')
  kept = _kept_steps(keep_steps, num_steps)
  slot = np.zeros(num_steps, np.int32)
  slot[list(kept)] = np.arange(len(kept), dtype=np.int32)
  keep = np.zeros(num_steps, np.bool_)
  keep[list(kept)] = True

  def body(carry, xs):
    x, _, buf_x, buf_x_next = carry
    sigma, sigma_next, sde, i, slot_i, keep_i = xs
    v = velocity_fn(x, _batch_sigma(sigma, batch))
    ode = steps.flow_step('ode', v, x, sigma, sigma_next)
    if stochastic:
      sde_out = steps.flow_step(kind, v, x, sigma, sigma_next, noise_level=noise_level,
                                key=jax.random.fold_in(key, i))
      x_next = jnp.where(sde, sde_out.x_next, ode.x_next)
      logp = jnp.where(sde, sde_out.logp, 0.0)
    else:
      x_next, logp = ode.x_next, ode.logp
    x0_hat = steps.predicted_x0(x, sigma, v)
    if kept:
      buf_x = _store(buf_x, x, slot_i, keep_i)
      buf_x_next = _store(buf_x_next, x_next, slot_i, keep_i)
    return (x_next, x0_hat, buf_x, buf_x_next), logp

  # zeros_like(x), not jnp.zeros: the buffers then inherit x's batch sharding in propagation.
  buf = jnp.broadcast_to(jnp.zeros_like(x), (len(kept),) + x.shape)
  xs = (sigmas[:-1], sigmas[1:], sde_mask, jnp.arange(num_steps), jnp.asarray(slot),
        jnp.asarray(keep))
  (x_final, x0_hat, buf_x, buf_x_next), logps = jax.lax.scan(body, (x, x, buf, buf), xs)
  kept_idx = np.asarray(kept, np.int32)
  return Trajectory(x=buf_x, x_next=buf_x_next, logp=logps[kept_idx], sigma=sigmas[:-1][kept_idx],
                    sigma_next=sigmas[1:][kept_idx], x0_hat=x0_hat, x_final=x_final)


def transition_log_prob(velocity_fn: VelocityFn, x: jax.Array, x_next: jax.Array, sigma: Any,
                        sigma_next: Any, *, kind: str, noise_level: Any) -> jax.Array:
  """(B,) log-prob of stored transitions x -> x_next under the current velocity (GRPO's logp_new).

  ``sigma``/``sigma_next`` are scalars (one stored step) or (B,) arrays (one step per sample).
  Feed the rollout's rows in the rollout's places for a ratio of 1 with unchanged params.
  """
  x = jnp.asarray(x, jnp.float32)
  v = velocity_fn(x, _batch_sigma(sigma, x.shape[0]))
  return steps.flow_step(kind, v, x, sigma, sigma_next, noise_level=noise_level, x_next=x_next).logp


def sample_ode(velocity_fn: VelocityFn, x_init: jax.Array, sigmas: Any) -> jax.Array:
  """Deterministic Euler sampling along ``sigmas``; returns x_N (float32)."""
  x = jnp.asarray(x_init, jnp.float32)
  sigmas = jnp.asarray(sigmas, jnp.float32)
  batch = x.shape[0]

  def body(x, pair):
    sigma, sigma_next = pair
    v = velocity_fn(x, _batch_sigma(sigma, batch))
    return steps.flow_step('ode', v, x, sigma, sigma_next).x_next, None

  x_final, _ = jax.lax.scan(body, x, (sigmas[:-1], sigmas[1:]))
  return x_final
