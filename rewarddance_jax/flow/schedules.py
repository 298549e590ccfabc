"""Sigma schedules and shifts for rectified flows (docs/algorithms.md §1).

Convention (§1.1): ``x_σ = (1 − σ)·x0 + σ·ε``; σ = 1 is pure noise, σ = 0 is data. A schedule is an
array of N + 1 sigmas that decreases from 1 to exactly 0; step i goes from ``σ_i`` to ``σ_{i+1}``.

Algorithm:
  1. Constant shift (SD3; DanceGRPO ``sd3_time_shift``): ``shift_s(t) = s·t / (1 + (s − 1)·t)``.
  2. FLUX resolution-dependent shift (diffusers ``calculate_shift``): μ is linear in the image token
     count L, ``μ = 0.5 + (1.15 − 0.5)·(L − 256)/(4096 − 256)``; the exponential shift is then
     ``σ' = e^μ / (e^μ + (1/σ − 1))``.
  3. Schedules by kind, all ending in an appended or final σ = 0:
     - ``linear``: ``linspace(1, 0, N + 1)``;
     - ``shift`` (DanceGRPO, XueZeyue/DanceGRPO:fastvideo/train_grpo_flux.py):
       ``shift_s(linspace(1, 0, N + 1))``;
     - ``flow_grpo_sd3`` (Flow-GRPO SD3.5, diffusers ``FlowMatchEulerDiscreteScheduler``): the
       scheduler's ``sigma_min`` is ``shift_s(1/1000)``; ``set_timesteps`` spaces N points from 1 to
       ``sigma_min`` and shifts them again: ``σ = shift_s(linspace(1, shift_s(1e-3), N))``, then 0;
     - ``flux_dynamic`` (Flow-GRPO FLUX pipeline): ``linspace(1, 1/N, N)``, exponential shift with
       μ(L), then 0.
  4. DanceGRPO feeds FLUX the quantised timestep ``int(1000σ)/1000`` (its steps use the float σ);
     here the network always gets the exact 1000σ (docs/algorithms.md §10 #2).

All schedule math runs in numpy float64; results are float32 (what the step functions consume).
"""

from __future__ import annotations

from typing import Any

import numpy as np

SCHEDULE_KINDS = ('linear', 'shift', 'flow_grpo_sd3', 'flux_dynamic')

# Diffusers' FlowMatchEulerDiscreteScheduler trains on 1000 timesteps; its smallest unshifted sigma
# is 1/1000, which fixes where the Flow-GRPO SD3 grid stops before the appended 0.
_NUM_TRAIN_TIMESTEPS = 1000


def _shift64(t: Any, shift: float) -> np.ndarray:
  """Float64 constant shift; the schedules compose it before rounding once to float32."""
  t = np.asarray(t, np.float64)
  return shift * t / (1.0 + (shift - 1.0) * t)


def _exp_shift64(sigmas: Any, mu: float) -> np.ndarray:
  """Float64 exponential shift with σ = 0 mapped to exactly 0."""
  s = np.asarray(sigmas, np.float64)
  positive = s > 0
  # 1/σ is infinite at σ = 0: evaluate on a safe value and select, so no warning and an exact 0.
  safe = np.where(positive, s, 1.0)
  e = np.exp(mu)
  return np.where(positive, e / (e + (1.0 / safe - 1.0)), 0.0)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
  """FLUX shift parameter μ, linear in the image token count (diffusers ``calculate_shift``)."""
  slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  return float(base_shift + slope * (image_seq_len - base_seq_len))


def get_sigmas(kind: str, num_steps: int, *, shift: float = 1.0,
               image_seq_len: int | None = None) -> np.ndarray:
  """Returns the (num_steps + 1,) float32 schedule of ``kind``, from 1 down to exactly 0.

  Args:
    kind: one of ``SCHEDULE_KINDS`` (see the module docstring).
    num_steps: N, the number of sampling steps.
    shift: the constant shift s ('shift', 'flow_grpo_sd3'); ignored by 'linear' and 'flux_dynamic'.
    image_seq_len: image token count L, required by 'flux_dynamic' (μ = ``flux_mu(L)``).

  Raises:
    ValueError: unknown kind, num_steps < 1, or 'flux_dynamic' without image_seq_len.
  """
  if kind not in SCHEDULE_KINDS:
    raise ValueError(f'Unknown sigma schedule kind {kind!r}; valid kinds: {SCHEDULE_KINDS}.')
  if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f'num_steps must be a positive integer, got {num_steps!r}.')
  n = int(num_steps)
  if kind == 'linear':
    sigmas = np.linspace(1.0, 0.0, n + 1)
  elif kind == 'shift':
    sigmas = _shift64(np.linspace(1.0, 0.0, n + 1), shift)
  elif kind == 'flow_grpo_sd3':
    sigma_min = _shift64(1.0 / _NUM_TRAIN_TIMESTEPS, shift)
    sigmas = np.append(_shift64(np.linspace(1.0, sigma_min, n), shift), 0.0)
  else:  # flux_dynamic
    if image_seq_len is None:
      raise ValueError("Sigma schedule 'flux_dynamic' needs image_seq_len (the image token count).")
    sigmas = np.append(_exp_shift64(np.linspace(1.0, 1.0 / n, n), flux_mu(image_seq_len)), 0.0)
  sigmas = np.asarray(sigmas, np.float32)
  # The step math relies on the exact end points (σ_0 == 1 selects Flow-GRPO's special case,
  # σ_N == 0 makes an ODE last step land on x̂0), so pin them against float rounding.
  sigmas[0], sigmas[-1] = 1.0, 0.0
  return sigmas

