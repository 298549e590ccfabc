"""Tests for rewarddance_jax.rl.kl (docs/algorithms.md §2.4); expected values worked by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rewarddance_jax.flow import steps
from rewarddance_jax.rl import kl


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_gaussian_mean_kl_by_hand():
  m_theta = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
  m_ref = jnp.array([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0]])
  # Sample 0: Δ = (0, 1, 2), mean Δ² = 5/3, /(2·0.5²) = 10/3.
  # Sample 1: Δ = (−1, 1, 0), mean Δ² = 2/3, /(2·2²) = 1/12.
  for std in (jnp.array([0.5, 2.0]), jnp.array([[0.5], [2.0]])):
    out = jax.jit(kl.gaussian_mean_kl)(m_theta, m_ref, std)
    assert out.shape == (2,) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, [10 / 3, 1 / 12], rtol=1e-6)
  np.testing.assert_allclose(kl.gaussian_mean_kl(m_theta, m_ref, 1.0), [5 / 6, 1 / 3], rtol=1e-6)
  with pytest.raises(ValueError, match='std_dev_t'):
    kl.gaussian_mean_kl(m_theta, m_ref, jnp.ones(3))


def test_velocity_kl_by_hand():
  ones, zeros = jnp.ones((1, 4)), jnp.zeros((1, 4))  # Δv = 1 everywhere.
  # dance, σ = 0.5, dt = −0.1, η = 0.3: coefficient 1 + 0.09·0.5/(2·0.5) = 1.045;
  # KL = 0.01·1.045²/(2·0.09).
  out = kl.velocity_kl(ones, zeros, 0.5, -0.1, 0.3, 'dance')
  assert float(out[0]) == pytest.approx(0.01 * 1.045**2 / 0.18, rel=1e-5)
  # flow_grpo, σ = 0.5, a = 0.7: g² = 0.49·0.5/0.5 = 0.49; coefficient 1 + 0.49·0.5/(2·0.5) = 1.245.
  out = kl.velocity_kl(ones, zeros, 0.5, -0.1, 0.7, 'flow_grpo')
  assert float(out[0]) == pytest.approx(0.01 * 1.245**2 / 0.98, rel=1e-5)
  # flow_grpo at σ = 1 (σ̃ = 0.9): coefficient 1; g² = 0.49/0.1 = 4.9.
  out = kl.velocity_kl(ones, zeros, 1.0, -0.1, 0.7, 'flow_grpo')
  assert float(out[0]) == pytest.approx(0.01 / 9.8, rel=1e-5)


def _fg_mean(x, v, s, s_next, a):
  """Flow-GRPO ``sde_step_with_logprob`` mean and std_dev_t, numpy float64 (§2.2)."""
  dt = s_next - s
  std_dev_t = a * np.sqrt(s / (1 - np.where(s == 1, s_next, s)))
  mean = (x * (1 + std_dev_t**2 / (2 * s) * dt) + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt)
  return mean, std_dev_t


@pytest.mark.parametrize('kind, level', [('dance', 0.3), ('flow_grpo', 0.7)])
def test_velocity_kl_matches_flow_step_means(kind, level):
  shape = (3, 4, 4, 2)
  x = _normal(0, shape)
  v_theta, v_ref = _normal(1, shape), _normal(2, shape)
  sigma = np.array([1.0, 0.8, 0.3], np.float32)  # Includes Flow-GRPO's σ = 1 special case.
  sigma_next = np.array([0.96, 0.7, 0.2], np.float32)
  dt = sigma_next - sigma
  step = functools.partial(steps.flow_step, kind, x=x, sigma=sigma, sigma_next=sigma_next,
                           noise_level=level, x_next=x)
  out_theta, out_ref = step(v_theta), step(v_ref)
  g = out_theta.std / jnp.sqrt(-dt).reshape(-1, 1, 1, 1)  # The step std without sqrt(−dt).
  code_kl = kl.gaussian_mean_kl(out_theta.mean, out_ref.mean, g)
  got = jax.jit(kl.velocity_kl, static_argnames='kind')(v_theta, v_ref, sigma, dt, level,
                                                         kind=kind)
  assert got.shape == (3,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, code_kl, rtol=1e-4)
  # The code form is the true per-element KL (std with sqrt(−dt)) times |dt|.
  true_kl = kl.gaussian_mean_kl(out_theta.mean, out_ref.mean, out_theta.std)
  np.testing.assert_allclose(got, true_kl * np.abs(dt), rtol=1e-4)
  if kind == 'flow_grpo':  # Against Flow-GRPO's own formula, in float64.
    s = sigma.astype(np.float64).reshape(-1, 1, 1, 1)
    sn = sigma_next.astype(np.float64).reshape(-1, 1, 1, 1)
    m_theta, std_dev_t = _fg_mean(x.astype(np.float64), v_theta.astype(np.float64), s, sn, level)
    m_ref, _ = _fg_mean(x.astype(np.float64), v_ref.astype(np.float64), s, sn, level)
    fg_kl = ((m_theta - m_ref)**2).mean(axis=(1, 2, 3)) / (2 * std_dev_t.reshape(-1)**2)
    np.testing.assert_allclose(got, fg_kl, rtol=1e-4)


def test_velocity_kl_rejects():
  v = jnp.ones((2, 3))
  with pytest.raises(ValueError, match='kinds'):
    kl.velocity_kl(v, v, 0.5, -0.1, 0.8, 'cps')
  with pytest.raises(ValueError, match='positive'):
    kl.velocity_kl(v, v, 0.5, -0.1, 0.0, 'dance')
  with pytest.raises(ValueError, match='shape'):
    kl.velocity_kl(v, jnp.ones((2, 4)), 0.5, -0.1, 0.3, 'dance')
