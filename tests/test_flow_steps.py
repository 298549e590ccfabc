"""Tests for rewarddance_jax.flow.steps (docs/algorithms.md §2)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rewarddance_jax.flow import schedules
from rewarddance_jax.flow import steps

SDE_KINDS = ('dance', 'flow_grpo', 'cps')
NOISE = {'ode': 0.0, 'dance': 0.3, 'flow_grpo': 0.7, 'cps': 0.8}


def _key(seed):
  # RBG keys compile ~5x faster than threefry on CPU; the key implementation is orthogonal to the
  # step math (the rollout tests use the default threefry keys).
  return jax.random.key(seed, impl='rbg')


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- numpy float64 references (§2.2)


def _dance_ref(v, x, s, s_next, eta):
  """DanceGRPO ``flux_step`` as written there: μ = x + dσ·v − ½η²·score·dσ."""
  dsigma = s_next - s
  x0 = x - s * v
  score = -(x - x0 * (1 - s)) / s**2
  return x + dsigma * v - 0.5 * eta**2 * score * dsigma, eta * np.sqrt(s - s_next)


def _flow_grpo_ref(v, x, s, s_next, a):
  """Flow-GRPO ``sde_step_with_logprob``; its σ = 1 case uses sigmas[1] (= σ' at step 0)."""
  dt = s_next - s
  std_dev_t = a * np.sqrt(s / (1 - (s_next if s == 1 else s)))
  mean = (x * (1 + std_dev_t**2 / (2 * s) * dt)
          + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt)
  return mean, std_dev_t * np.sqrt(-dt)


def _cps_ref(v, x, s, s_next, a):
  std = s_next * np.sin(a * np.pi / 2)
  x0, eps = x - s * v, x + (1 - s) * v
  return x0 * (1 - s_next) + eps * np.sqrt(s_next**2 - std**2), std


_REFS = {'dance': _dance_ref, 'flow_grpo': _flow_grpo_ref, 'cps': _cps_ref}


def _gaussian_mean_logp(x_next, mean, std):
  """Per-element mean of the Gaussian log-density, float64."""
  elem = -(x_next - mean)**2 / (2 * std**2) - np.log(std) - 0.5 * np.log(2 * np.pi)
  return elem.reshape(elem.shape[0], -1).mean(axis=1)


# ---------------------------------------------------------------- bit-exact re-scoring (§2.3)


@functools.lru_cache(maxsize=None)
def _jitted_sample_and_rescore():
  """One jitted sampler for all kinds (they share the key, so XLA draws the noise once) and one
  jitted re-scorer; separate programs, as rollout and training are."""

  def sample(v, x, sigma, sigma_next, key):
    return {k: steps.flow_step(k, v, x, sigma, sigma_next, noise_level=NOISE[k], key=key)
            for k in steps.STEP_KINDS}

  def rescore(v, x, sigma, sigma_next, x_next):
    return {k: steps.flow_step(k, v, x, sigma, sigma_next, noise_level=NOISE[k],
                               x_next=x_next[k]).logp for k in steps.STEP_KINDS}

  return jax.jit(sample), jax.jit(rescore)


@pytest.mark.parametrize('mode', ['jit', 'eager'])
@pytest.mark.parametrize('batch', [1, 3, 8])
def test_rescoring_a_sampled_transition_is_bit_exact(batch, mode):
  v = jnp.asarray(_normal(0, (batch, 3, 4, 4)))
  x = jnp.asarray(_normal(1, (batch, 3, 4, 4)))
  # Per-sample σ; sample 0 sits at σ = 1 (Flow-GRPO's special case).
  grid = schedules.get_sigmas('shift', 10, shift=3.0)
  idx = np.arange(batch) % 10
  sigma, sigma_next = jnp.asarray(grid[idx]), jnp.asarray(grid[idx + 1])
  key = _key(7)
  if mode == 'jit':
    sample, rescore = _jitted_sample_and_rescore()
    outs = sample(v, x, sigma, sigma_next, key)
    new = rescore(v, x, sigma, sigma_next, {k: o.x_next for k, o in outs.items()})
  else:
    outs = {k: steps.flow_step(k, v, x, sigma, sigma_next, noise_level=NOISE[k], key=key)
            for k in steps.STEP_KINDS}
    new = {k: steps.flow_step(k, v, x, sigma, sigma_next, noise_level=NOISE[k],
                              x_next=o.x_next).logp for k, o in outs.items()}
  for kind in steps.STEP_KINDS:
    old = outs[kind].logp
    assert old.shape == (batch,) and old.dtype == jnp.float32
    np.testing.assert_array_equal(new[kind], old, err_msg=kind)
    # The GRPO ratio, in fp32, is exactly one.
    np.testing.assert_array_equal(jnp.exp(new[kind] - old), np.ones(batch, np.float32))
    if kind != 'ode':
      assert np.all(np.isfinite(old)) and not np.all(old == 0)


def _mlp_velocity():
  """A tiny nonlinear velocity network in plain jnp with fixed weights."""
  w1 = jnp.asarray(_normal(10, (24, 32)) * 0.3)
  w2 = jnp.asarray(_normal(11, (32, 24)) * 0.3)
  w_sigma = jnp.asarray(_normal(12, (32,)))

  def velocity(x, sigma):
    h = jnp.tanh(x.reshape(x.shape[0], -1) @ w1 + sigma[:, None] * w_sigma)
    return (h @ w2).reshape(x.shape)

  return velocity


@pytest.mark.parametrize('kind', SDE_KINDS)
def test_rescoring_through_a_jitted_mlp_velocity_is_bit_exact(kind):
  velocity = _mlp_velocity()
  batch = 3

  @jax.jit
  def sample(x, sigma, sigma_next, key):
    v = velocity(x, jnp.full((batch,), sigma))
    return steps.flow_step(kind, v, x, sigma, sigma_next, noise_level=NOISE[kind], key=key)

  @jax.jit
  def rescore(x, sigma, sigma_next, x_next):
    v = velocity(x, jnp.full((batch,), sigma))
    return steps.flow_step(kind, v, x, sigma, sigma_next, noise_level=NOISE[kind],
                           x_next=x_next).logp

  x = jnp.asarray(_normal(2, (batch, 2, 3, 4)))
  for sigma, sigma_next in [(1.0, 0.96), (0.6, 0.45), (0.2, 0.0)]:
    out = sample(x, sigma, sigma_next, _key(3))
    np.testing.assert_array_equal(rescore(x, sigma, sigma_next, out.x_next), out.logp)
    x = out.x_next


# ---------------------------------------------------------------- agreement with §2.2


@pytest.mark.parametrize('kind,schedule', [('dance', ('shift', 16, {'shift': 3.0})),
                                           ('flow_grpo', ('flow_grpo_sd3', 10, {'shift': 3.0})),
                                           ('cps', ('flow_grpo_sd3', 10, {'shift': 3.0}))])
def test_unified_step_matches_the_repositories_formulas(kind, schedule):
  name, n, kwargs = schedule
  sigmas = schedules.get_sigmas(name, n, **kwargs)
  v, x = _normal(4, (2, 5)), _normal(5, (2, 5))
  for i in range(n):
    s, s_next = float(sigmas[i]), float(sigmas[i + 1])
    mean_ref, std_ref = _REFS[kind](v.astype(np.float64), x.astype(np.float64), s, s_next,
                                    NOISE[kind])
    out = steps.flow_step(kind, v, x, s, s_next, noise_level=NOISE[kind], x_next=x)
    np.testing.assert_allclose(out.mean, mean_ref, rtol=2e-5, atol=2e-6, err_msg=f'step {i}')
    np.testing.assert_allclose(np.asarray(out.std).reshape(-1), np.full(2, std_ref), rtol=2e-6,
                               atol=1e-9, err_msg=f'step {i}')


@pytest.mark.parametrize('kind', SDE_KINDS)
def test_logp_equals_hand_computed_gaussian_mean_log_density(kind):
  v, x, x_next = _normal(6, (2, 3, 2)), _normal(7, (2, 3, 2)), _normal(8, (2, 3, 2))
  s, s_next = 0.7, 0.55
  out = steps.flow_step(kind, v, x, s, s_next, noise_level=NOISE[kind], x_next=x_next)
  mean, std = _REFS[kind](v.astype(np.float64), x.astype(np.float64), s, s_next, NOISE[kind])
  if kind == 'cps':  # All constants dropped (§2.2).
    expected = -((x_next - mean)**2).reshape(2, -1).mean(axis=1)
  else:
    expected = _gaussian_mean_logp(x_next.astype(np.float64), mean, std)
  np.testing.assert_allclose(out.logp, expected, rtol=2e-6, atol=2e-6)


def test_ode_step():
  v, x = _normal(9, (4, 3)), _normal(10, (4, 3))
  out = steps.flow_step('ode', v, x, 0.5, 0.25)
  np.testing.assert_allclose(out.x_next, x - 0.25 * v, rtol=1e-6)
  np.testing.assert_array_equal(out.mean, out.x_next)
  np.testing.assert_array_equal(out.std, np.zeros((4, 1)))
  np.testing.assert_array_equal(out.logp, np.zeros(4))


def test_vanishing_noise_reduces_to_the_ode():
  v, x = _normal(11, (3, 4, 2)), _normal(12, (3, 4, 2))
  key = _key(0)
  for s, s_next in [(1.0, 0.9), (0.5, 0.4), (0.1, 0.0)]:
    ode = steps.flow_step('ode', v, x, s, s_next)
    dance = steps.flow_step('dance', v, x, s, s_next, noise_level=1e-8, key=key)
    np.testing.assert_allclose(dance.x_next, ode.x_next, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dance.mean, ode.mean, rtol=1e-6, atol=1e-6)
    for kind in ('flow_grpo', 'cps'):
      out = steps.flow_step(kind, v, x, s, s_next, noise_level=0.0, key=key)
      np.testing.assert_allclose(out.x_next, ode.x_next, rtol=1e-6, atol=1e-6, err_msg=kind)
      np.testing.assert_array_equal(out.std, np.zeros((3, 1, 1)))
      np.testing.assert_array_equal(out.logp, np.zeros(3))  # No density: reported as 0.


def test_zero_std_logp_has_finite_gradient():
  """A zero-width step (a = 0) gives logp 0 and no NaN gradient, e.g. inside a masked where."""
  x, x_next = _normal(13, (2, 3)), _normal(14, (2, 3))
  grad = jax.grad(lambda v: steps.flow_step('flow_grpo', v, x, 0.5, 0.4, noise_level=0.0,
                                            x_next=x_next).logp.sum())(jnp.ones((2, 3)))
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize('kind', SDE_KINDS)
def test_sampled_mean_and_std_match_the_returned_ones(kind):
  n = 40000
  v = jnp.broadcast_to(jnp.asarray(_normal(15, (1, 3))), (n, 3))
  x = jnp.broadcast_to(jnp.asarray(_normal(16, (1, 3))), (n, 3))
  out = steps.flow_step(kind, v, x, 0.8, 0.6, noise_level=NOISE[kind], key=_key(1))
  draws = np.asarray(out.x_next, np.float64)
  mean, std = np.asarray(out.mean)[0], float(np.asarray(out.std)[0, 0])
  assert std > 0.01
  # CLT: the sample mean has standard error std/sqrt(n) and the sample std about std/sqrt(2n);
  # 5 standard errors per comparison (9 + 9 comparisons in all) never fail by chance in practice.
  np.testing.assert_array_less(np.abs(draws.mean(axis=0) - mean), 5 * std / math.sqrt(n))
  np.testing.assert_array_less(np.abs(draws.std(axis=0, ddof=1) - std), 5 * std / math.sqrt(2 * n))


def test_bf16_inputs_give_float32_outputs():
  v, x = _normal(17, (2, 4)), _normal(18, (2, 4))
  for kind in steps.STEP_KINDS:
    out = steps.flow_step(kind, jnp.asarray(v, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16),
                          jnp.asarray([0.7, 0.5], jnp.bfloat16), 0.3, noise_level=NOISE[kind],
                          key=_key(0))
    for name, value in out._asdict().items():
      assert value.dtype == jnp.float32, (kind, name)
    ref = steps.flow_step(kind, jnp.asarray(v, jnp.bfloat16).astype(jnp.float32),
                          jnp.asarray(x, jnp.bfloat16).astype(jnp.float32),
                          jnp.asarray([0.7, 0.5], jnp.bfloat16).astype(jnp.float32), 0.3,
                          noise_level=NOISE[kind], key=_key(0))
    np.testing.assert_array_equal(out.x_next, ref.x_next)
    np.testing.assert_array_equal(out.logp, ref.logp)


def test_predicted_x0_and_noise_invert_the_interpolant():
  x0, eps = _normal(19, (3, 2, 2)), _normal(20, (3, 2, 2))
  sigma = np.array([0.9, 0.5, 0.1], np.float32)
  s = sigma[:, None, None]
  x, v = (1 - s) * x0 + s * eps, eps - x0
  np.testing.assert_allclose(steps.predicted_x0(x, sigma, v), x0, atol=1e-5)
  np.testing.assert_allclose(steps.predicted_noise(x, sigma, v), eps, atol=1e-5)
  assert steps.predicted_x0(x, 0.5, v).dtype == jnp.float32


def test_errors():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r"'ddim'.*ode.*dance.*flow_grpo.*cps"):
    steps.flow_step('ddim', x, x, 0.5, 0.4)
  with pytest.raises(ValueError, match=r"'dance'.*key"):
    steps.flow_step('dance', x, x, 0.5, 0.4, noise_level=0.3)
  with pytest.raises(ValueError, match='shape'):
    steps.flow_step('ode', jnp.zeros((2, 4)), x, 0.5, 0.4)
  with pytest.raises(ValueError, match=r'\(2,\)'):
    steps.flow_step('ode', x, x, jnp.zeros(3), 0.4)
  # The ODE needs no key, and a given x_next needs none either.
  steps.flow_step('ode', x, x, 0.5, 0.4)
  steps.flow_step('cps', x, x, 0.5, 0.4, noise_level=0.8, x_next=x)
