"""Tests for rewarddance_jax.rl.grpo_loss (docs/algorithms.md §3.3); expected values by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rewarddance_jax.rl import grpo_loss

EPS = 0.2  # A wide band keeps the hand arithmetic readable; the formula does not care.
# The four PPO cases plus one ratio inside the band; logp_old = 0, so ρ = exp(logp_new).
RATIOS = np.array([1.5, 0.5, 1.5, 0.5, 1.1])
ADV = np.array([2.0, 2.0, -2.0, -2.0, 1.0])
# L = max(−A·ρ, −A·clip(ρ, 0.8, 1.2)):
#   A = 2,  ρ = 1.5: max(−3.0, −2.4) = −2.4  clipped   (gradient 0)
#   A = 2,  ρ = 0.5: max(−1.0, −1.6) = −1.0  unclipped (gradient −Aρ = −1.0)
#   A = −2, ρ = 1.5: max(3.0, 2.4)   =  3.0  unclipped (gradient −Aρ = 3.0)
#   A = −2, ρ = 0.5: max(1.0, 1.6)   =  1.6  clipped   (gradient 0)
#   A = 1,  ρ = 1.1: max(−1.1, −1.1) = −1.1  inside    (gradient −Aρ = −1.1)
PER_SAMPLE = np.array([-2.4, -1.0, 3.0, 1.6, -1.1])
PER_SAMPLE_GRAD = np.array([0.0, -1.0, 3.0, 0.0, -1.1])  # d L_b / d logp_new_b.


def _inputs():
  logp_new = jnp.asarray(np.log(RATIOS), jnp.float32)
  return logp_new, jnp.zeros(5, jnp.float32), jnp.asarray(ADV, jnp.float32)


def test_four_clipping_cases_and_stats():
  logp_new, logp_old, adv = _inputs()
  loss, stats = grpo_loss.clipped_surrogate(logp_new, logp_old, adv, EPS)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  assert float(loss) == pytest.approx(PER_SAMPLE.mean(), abs=1e-6)  # 0.1/5 = 0.02
  assert float(stats['ratio_mean']) == pytest.approx(5.1 / 5, rel=1e-6)
  assert float(stats['ratio_min']) == pytest.approx(0.5, rel=1e-6)
  assert float(stats['ratio_max']) == pytest.approx(1.5, rel=1e-6)
  assert float(stats['log_ratio_max_abs']) == pytest.approx(np.log(2.0), rel=1e-6)   # |log 0.5|
  # |ρ − 1| > 0.2 for all but 1.1; two above the band, two below.
  assert float(stats['clipfrac']) == pytest.approx(4 / 5)
  assert float(stats['clipfrac_gt_one']) == pytest.approx(2 / 5)
  assert float(stats['clipfrac_lt_one']) == pytest.approx(2 / 5)
  kl = 0.5 * (2 * math.log(1.5)**2 + 2 * math.log(0.5)**2 + math.log(1.1)**2) / 5
  assert float(stats['approx_kl']) == pytest.approx(kl, rel=1e-5)


def test_gradient_zero_where_clipped_else_minus_a_rho_over_b():
  logp_new, logp_old, adv = _inputs()
  grad = jax.jit(jax.grad(lambda lp: grpo_loss.clipped_surrogate(lp, logp_old, adv, EPS)[0]))(
      logp_new)
  np.testing.assert_allclose(grad, PER_SAMPLE_GRAD / 5, rtol=1e-5, atol=1e-7)
  assert grad[0] == 0.0 and grad[3] == 0.0


def test_default_clip_at_ratio_one():
  # Unchanged params: ρ = 1, loss = −mean(A), gradient −A/B (the on-policy policy gradient).
  logp = jnp.array([-1.3, 0.4, 2.0, -0.2])
  adv = jnp.array([1.0, -0.5, 2.0, 0.0])
  loss, stats = grpo_loss.clipped_surrogate(logp, logp, adv, 1e-4)
  assert float(loss) == pytest.approx(-2.5 / 4)
  assert float(stats['clipfrac']) == 0.0 and float(stats['approx_kl']) == 0.0
  assert float(stats['ratio_min']) == 1.0 and float(stats['ratio_max']) == 1.0
  grad = jax.grad(lambda lp: grpo_loss.clipped_surrogate(lp, logp, adv, 1e-4)[0])(logp)
  np.testing.assert_allclose(grad, [-0.25, 0.125, -0.5, 0.0], rtol=1e-6)


def test_mask_averages_over_kept_samples():
  logp_new, logp_old, adv = _inputs()
  mask = jnp.array([1.0, 1.0, 0.0, 0.0, 1.0])
  fn = jax.jit(lambda lp: grpo_loss.clipped_surrogate(lp, logp_old, adv, EPS, mask))
  loss, stats = fn(logp_new)
  # Kept: −2.4, −1.0, −1.1 -> mean −1.5.
  assert float(loss) == pytest.approx(-4.5 / 3, rel=1e-6)
  assert float(stats['clipfrac']) == pytest.approx(2 / 3)
  assert float(stats['clipfrac_gt_one']) == pytest.approx(1 / 3)
  assert float(stats['clipfrac_lt_one']) == pytest.approx(1 / 3)
  assert float(stats['ratio_mean']) == pytest.approx(3.1 / 3, rel=1e-6)
  assert float(stats['ratio_min']) == pytest.approx(0.5, rel=1e-6)
  assert float(stats['ratio_max']) == pytest.approx(1.5, rel=1e-6)
  grad = jax.grad(lambda lp: fn(lp)[0])(logp_new)
  np.testing.assert_allclose(grad, [0.0, -1.0 / 3, 0.0, 0.0, -1.1 / 3], rtol=1e-5, atol=1e-7)


def test_masked_out_overflow_gives_no_nan():
  # A dropped sample whose log-ratio would overflow exp in float32 must not poison the loss.
  logp_new = jnp.array([200.0, 0.1])
  logp_old = jnp.array([0.0, 0.0])
  adv = jnp.array([1.0, 1.0])
  mask = jnp.array([0.0, 1.0])
  fn = lambda lp: grpo_loss.clipped_surrogate(lp, logp_old, adv, EPS, mask)
  loss, stats = fn(logp_new)
  assert float(loss) == pytest.approx(-math.exp(0.1), rel=1e-6)
  assert all(np.isfinite(float(v)) for v in stats.values())
  grad = jax.grad(lambda lp: fn(lp)[0])(logp_new)
  np.testing.assert_allclose(grad, [0.0, -math.exp(0.1)], rtol=1e-6)


def test_all_masked_is_zero_not_nan():
  logp_new, logp_old, adv = _inputs()
  fn = lambda lp: grpo_loss.clipped_surrogate(lp, logp_old, adv, EPS, jnp.zeros(5))
  loss, stats = jax.jit(fn)(logp_new)
  assert float(loss) == 0.0
  assert float(stats['clipfrac']) == 0.0 and float(stats['approx_kl']) == 0.0
  assert float(stats['ratio_min']) == 1.0 and float(stats['ratio_max']) == 1.0
  grad = jax.grad(lambda lp: fn(lp)[0])(logp_new)
  np.testing.assert_array_equal(grad, 0.0)


def test_rollout_kl():
  # Δ = (0.2, −0.3): 0.5·(0.04 + 0.09)/2 = 0.0325.
  logp_new, logp_old = jnp.array([0.3, -0.1]), jnp.array([0.1, 0.2])
  assert float(jax.jit(grpo_loss.rollout_kl)(logp_new, logp_old)) == pytest.approx(0.0325, rel=1e-5)
  masked = grpo_loss.rollout_kl(logp_new, logp_old, jnp.array([0.0, 1.0]))
  assert float(masked) == pytest.approx(0.045, rel=1e-5)
  # d/dlogp_new of 0.5·mean(Δ²) = Δ/B.
  grad = jax.grad(grpo_loss.rollout_kl)(logp_new, logp_old)
  np.testing.assert_allclose(grad, [0.1, -0.15], rtol=1e-5)


def test_shape_errors():
  with pytest.raises(ValueError, match='logp_old'):
    grpo_loss.clipped_surrogate(jnp.zeros(3), jnp.zeros(4), jnp.zeros(3), 0.1)
  with pytest.raises(ValueError, match='adv'):
    grpo_loss.clipped_surrogate(jnp.zeros(3), jnp.zeros(3), jnp.zeros((3, 1)), 0.1)
  with pytest.raises(ValueError, match='mask'):
    grpo_loss.clipped_surrogate(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), 0.1, jnp.ones(2))
