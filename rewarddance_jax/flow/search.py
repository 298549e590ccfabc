"""Inference-time scaling: best-of-N and Search over Paths, with model calls counted.

Best-of-N: sample N ODE trajectories per prompt, score each final x0 with a verifier, keep the best.

Search over Paths (Ma et al., arXiv 2501.09732 §3; used by RewardDance §3.3.2 with a pointwise
verifier; defaults docs/algorithms.md §9, §10 #19: N = 4, M = 2, Δf = 0.1, Δb = Δf + one step):
  1. Solve N noises per prompt by Euler ODE down the σ grid to the first search point σ_c.
  2. Each of the N states is copied M times and re-noised forward to σ_c + Δf with the exact
     forward transition of x_σ = (1 − σ)·x0 + σ·ε:
        x' = a·x + sqrt(σ'² − a²σ²)·ε',   a = (1 − σ')/(1 − σ)
  3. The N·M candidates are solved back by Euler ODE over Δb = Δf + one grid step, i.e. to the
     next grid point below σ_c (sub-steps no larger than the grid step).
  4. Each candidate is scored on its one-step prediction x̂0 = x − σ·v(x, σ); the top N per prompt
     survive. Steps 2–4 repeat every `every` grid steps while σ > 0.
  5. The survivors finish the ODE; the final best-of over the N picks one image per prompt.
Rows are grouped per prompt: (P·N, ...) with a prompt's N rows adjacent, like GRPO groups.
Model calls (per prompt) are counted exactly from the loop structure and returned, so the two
methods can be compared at equal compute.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rewarddance_jax.flow import rollout as rollout_lib

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]
Verifier = Callable[[jax.Array], jax.Array]   # x0 (R, ...) -> scores (R,)


class SearchResult(NamedTuple):
  x0: jax.Array              # (P, ...) the chosen sample per prompt
  score: jax.Array           # (P,) its verifier score
  model_calls: int           # velocity evaluations per prompt


def _group_argmax(scores: jax.Array, group: int) -> jax.Array:
  """Row index of the best member of each adjacent group of `group` rows."""
  best = jnp.argmax(scores.reshape(-1, group), axis=1)
  return best + jnp.arange(best.shape[0]) * group


def best_of_n(velocity_fn: VelocityFn, x_init: jax.Array, sigmas: jax.Array, verifier: Verifier,
              n: int) -> SearchResult:
  """ODE-samples every row of x_init (P·N rows) and keeps each prompt's best by the verifier."""
  if x_init.shape[0] % n:
    raise ValueError(f'best_of_n: {x_init.shape[0]} rows are not a multiple of n={n}.')
  x0 = rollout_lib.sample_ode(velocity_fn, x_init, sigmas)
  scores = verifier(x0)
  pick = _group_argmax(scores, n)
  return SearchResult(x0[pick], scores[pick], n * (int(np.shape(sigmas)[0]) - 1))


def renoise(x: jax.Array, sigma: float, sigma_up: float, key: jax.Array) -> jax.Array:
  """Exact forward transition of the rectified-flow interpolant from σ to σ_up > σ."""
  a = (1.0 - sigma_up) / (1.0 - sigma)
  b = math.sqrt(max(sigma_up ** 2 - (a * sigma) ** 2, 0.0))
  return a * x + b * jax.random.normal(key, x.shape, x.dtype)


def _euler(velocity_fn: VelocityFn, x: jax.Array, grid: np.ndarray) -> jax.Array:
  for s, s_next in zip(grid[:-1], grid[1:]):
    sig = jnp.full((x.shape[0],), s, jnp.float32)
    x = x + (s_next - s) * velocity_fn(x, sig)
  return x


def search_over_paths(velocity_fn_for: Callable[[int], VelocityFn], x_init: jax.Array,
                      sigmas: np.ndarray, verifier: Verifier, key: jax.Array, *, n: int = 4,
                      m: int = 2, delta_f: float = 0.1, every: int = 1,
                      start_step: int = 1) -> SearchResult:
  """Search over Paths on a fixed σ grid (host loop of jitted pieces; shapes are static).

  Args:
    velocity_fn_for: `reps -> velocity_fn` for a batch whose prompts are each repeated `reps`
      times per original row (the caller tiles its conditioning; rows of one prompt adjacent).
    x_init: (P·N, ...) initial noise, a prompt's N rows adjacent.
    sigmas: (S+1,) decreasing grid from 1 to 0 (numpy; search points are grid points).
    verifier: x0 → (R,) scores, higher is better.
    n, m: beams kept per prompt and re-noisings per beam.
    delta_f: forward re-noising distance Δf; the backward solve covers Δf + one grid step.
    every: search every `every` grid steps; start_step: the first grid index searched at.
  """
  sigmas = np.asarray(sigmas, np.float64)
  if x_init.shape[0] % n:
    raise ValueError(f'search_over_paths: {x_init.shape[0]} rows are not a multiple of n={n}.')
  steps = len(sigmas) - 1
  if not 1 <= start_step < steps:
    raise ValueError(f'start_step={start_step} must lie in [1, {steps - 1}].')
  v_n, v_nm = velocity_fn_for(1), velocity_fn_for(m)
  calls = 0
  x = _euler(v_n, x_init, sigmas[:start_step + 1])
  calls += n * start_step
  i = start_step
  while i < steps:
    s, s_next = sigmas[i], sigmas[i + 1]
    key, k_noise = jax.random.split(key)
    cand = jnp.repeat(x, m, axis=0)                              # (P·N·M, ...)
    s_up = min(s + delta_f, 1.0)
    cand = renoise(cand, s, s_up, k_noise)
    h = float(np.max(-np.diff(sigmas)))
    sub = max(1, math.ceil((s_up - s_next) / h - 1e-9))
    cand = _euler(v_nm, cand, np.linspace(s_up, s_next, sub + 1))
    calls += n * m * sub
    if s_next > 0:
      sig = jnp.full((cand.shape[0],), s_next, jnp.float32)
      x0_pred = cand - s_next * v_nm(cand, sig)                  # one-step x̂0 for the verifier
      calls += n * m
    else:
      x0_pred = cand
    scores = verifier(x0_pred).reshape(-1, n * m)
    top = jnp.argsort(-scores, axis=1)[:, :n]                    # best N of each prompt's N·M
    rows = (top + jnp.arange(top.shape[0])[:, None] * (n * m)).reshape(-1)
    x = cand[rows]
    i += 1
    if s_next == 0:
      break
    # Plain ODE steps between search points.
    j = min(i + every - 1, steps)
    if j > i:
      x = _euler(v_n, x, sigmas[i:j + 1])
      calls += n * (j - i)
      i = j
  scores = verifier(x)
  pick = _group_argmax(scores, n)
  return SearchResult(x[pick], scores[pick], calls)
