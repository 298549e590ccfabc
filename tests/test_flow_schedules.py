"""Tests for rewarddance_jax.flow.schedules: the reference schedules of docs/algorithms.md §1.3."""

import jax.numpy as jnp
import numpy as np
import pytest

from rewarddance_jax.flow import schedules
from rewarddance_jax.flow import steps


def _step_stds(kind, sigmas, noise_level):
  """Per-step transition std from the step function itself (x, v are irrelevant to the std)."""
  x = jnp.zeros((1, 2), jnp.float32)
  return np.array([
      float(steps.flow_step(kind, x, x, sigmas[i], sigmas[i + 1], noise_level=noise_level,
                            x_next=x).std.reshape(()))
      for i in range(len(sigmas) - 1)
  ])


def _assert_printed(actual, printed, decimals):
  """Equal to the printed golden values at their precision (half a unit of the last digit)."""
  np.testing.assert_allclose(actual, printed, rtol=0, atol=0.5 * 10.0**-decimals + 1e-9)


def test_shift_and_exp_shift_formulas():
  t = np.linspace(1.0, 0.0, 5)
  out = schedules.get_sigmas('shift', 4, shift=3.0)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, 3 * t / (1 + 2 * t), rtol=1e-7)
  mu = schedules.flux_mu(1024)
  assert mu == pytest.approx(0.63)
  assert schedules.flux_mu(256) == pytest.approx(0.5)
  assert schedules.flux_mu(4096) == pytest.approx(1.15)
  out = schedules.get_sigmas('flux_dynamic', 4, image_seq_len=1024)
  t = np.linspace(1.0, 0.25, 4)
  assert out[-1] == 0.0 and out[0] == 1.0  # the appended σ = 0 is exact, no NaN or warning.
  np.testing.assert_allclose(out[:-1], np.exp(mu) / (np.exp(mu) + 1 / t - 1), rtol=1e-6)


def test_golden_dancegrpo_flux():
  sigmas = schedules.get_sigmas('shift', 16, shift=3.0)
  assert sigmas.dtype == np.float32 and sigmas.shape == (17,)
  _assert_printed(sigmas, [1, .978, .955, .929, .900, .868, .833, .794, .750, .700, .643, .577,
                           .500, .409, .300, .167, 0], 3)
  stds = _step_stds('dance', sigmas, 0.3)
  assert np.all(np.diff(stds) > 0)  # Rises toward data.
  _assert_printed(stds[0], 0.044, 3)
  # Hand-rounded tables print 0.123 for the last std: 0.3·sqrt(.167) from the *rounded* σ_15; the
  # exact value is 0.3·sqrt(1/6) = 0.12247. So: exact value tightly, the printed one within a unit.
  np.testing.assert_allclose(stds[-1], 0.3 * np.sqrt(1 / 6), rtol=1e-6)
  assert abs(stds[-1] - 0.123) <= 1e-3


def test_golden_flow_grpo_sd3():
  sigmas = schedules.get_sigmas('flow_grpo_sd3', 10, shift=3.0)
  assert sigmas.shape == (11,)
  _assert_printed(sigmas[:-2], [1, .960, .913, .858, .790, .707, .602, .465, .278], 3)
  _assert_printed(sigmas[-2], .0089, 4)
  assert sigmas[-1] == 0.0
  stds = _step_stds('flow_grpo', sigmas, 0.7)
  std_dev_t = stds / np.sqrt(sigmas[:-1] - sigmas[1:])  # Flow-GRPO's std_dev_t excludes sqrt(−dt).
  _assert_printed(std_dev_t[:2], [3.51, 3.44], 2)
  _assert_printed(std_dev_t[2:9], [2.27, 1.72, 1.36, 1.09, .86, .65, .43], 2)
  _assert_printed(std_dev_t[9], .066, 3)
  _assert_printed(stds[:9], [.70, .74, .54, .45, .39, .35, .32, .28, .23], 2)
  _assert_printed(stds[9], .006, 3)


def test_golden_flow_grpo_flux_512():
  image_seq_len = (512 // 16) ** 2  # 8x VAE, 2x2 packing: 1024 tokens, μ = 0.63.
  sigmas = schedules.get_sigmas('flux_dynamic', 6, image_seq_len=image_seq_len)
  _assert_printed(sigmas[[0, 1, 2, 4, 5, 6]], [1, .904, .790, .484, .273, 0], 3)
  # Hand-rounded tables print .653 for σ_3; the formula gives e^.63/(e^.63 + 1) = 0.65249 (.652).
  np.testing.assert_allclose(sigmas[3], np.exp(0.63) / (np.exp(0.63) + 1), rtol=1e-6)
  assert abs(sigmas[3] - 0.653) <= 1e-3


@pytest.mark.parametrize('kind,kwargs', [('linear', {}), ('shift', {'shift': 5.0}),
                                         ('flow_grpo_sd3', {'shift': 3.0}),
                                         ('flux_dynamic', {'image_seq_len': 4096})])
@pytest.mark.parametrize('num_steps', [1, 7, 40])
def test_schedules_are_decreasing_from_one_to_zero(kind, kwargs, num_steps):
  sigmas = schedules.get_sigmas(kind, num_steps, **kwargs)
  assert sigmas.dtype == np.float32 and sigmas.shape == (num_steps + 1,)
  assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
  assert np.all(np.diff(sigmas) < 0)


def test_linear_schedule():
  np.testing.assert_array_equal(schedules.get_sigmas('linear', 4), [1, .75, .5, .25, 0])


def test_get_sigmas_errors():
  with pytest.raises(ValueError, match=r"'cosine'.*linear.*shift.*flow_grpo_sd3.*flux_dynamic"):
    schedules.get_sigmas('cosine', 10)
  with pytest.raises(ValueError, match='image_seq_len'):
    schedules.get_sigmas('flux_dynamic', 10)
  with pytest.raises(ValueError, match='num_steps'):
    schedules.get_sigmas('linear', 0)

