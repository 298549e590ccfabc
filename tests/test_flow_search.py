"""Best-of-N and Search over Paths on a flow whose exact velocity is known (two data points)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rewarddance_jax.flow import schedules, search

MU = jnp.array([[1.0, 1.0], [-1.0, -1.0]])   # data: two points in R^2, equal weight


def exact_velocity(x, sigma):
  """v = (x − E[x0 | x_σ]) / σ for the two-point data distribution."""
  s = sigma[:, None]
  d2 = jnp.sum((x[:, None, :] - (1 - s)[:, None] * MU[None]) ** 2, axis=-1)   # (R, 2)
  w = jax.nn.softmax(-d2 / (2 * jnp.maximum(s, 1e-4) ** 2), axis=1)
  x0 = w @ MU
  return (x - x0) / jnp.maximum(s, 1e-4)


def verifier(x0):
  return -jnp.sum((x0 - MU[0]) ** 2, axis=-1)   # prefers the first data point


def test_renoise_is_the_forward_transition():
  x0 = jnp.full((20000, 2), 0.5)
  key = jax.random.key(0)
  sigma, up = 0.3, 0.45
  x_s = (1 - sigma) * x0 + sigma * jax.random.normal(key, x0.shape)
  x_up = search.renoise(x_s, sigma, up, jax.random.key(1))
  # x_up must be distributed as (1 − up)·x0 + up·ε.
  np.testing.assert_allclose(jnp.mean(x_up), (1 - up) * 0.5, atol=0.01)
  np.testing.assert_allclose(jnp.std(x_up), up, rtol=0.02)


def test_best_of_n_picks_the_verifiers_favourite_and_counts_calls():
  sig = schedules.get_sigmas('linear', 20)
  x = jax.random.normal(jax.random.key(2), (64 * 4, 2))
  res = search.best_of_n(exact_velocity, x, sig, verifier, n=4)
  assert res.x0.shape == (64, 2) and res.model_calls == 4 * 20
  single = search.best_of_n(exact_velocity, x[::4], sig, verifier, n=1)
  # P(best of 4 hits the preferred mode) = 1 − 0.5⁴ ≈ 0.94 vs 0.5 for one sample.
  hit4 = float(jnp.mean(res.score > -0.5))
  hit1 = float(jnp.mean(single.score > -0.5))
  assert hit4 > 0.8 and hit1 < 0.7, (hit4, hit1)


def test_search_over_paths_beats_plain_sampling_and_counts_calls():
  sig = schedules.get_sigmas('linear', 10)
  n, m, prompts = 2, 2, 64
  x = jax.random.normal(jax.random.key(3), (prompts * n, 2))
  res = search.search_over_paths(lambda reps: exact_velocity, x, sig, verifier,
                                 jax.random.key(4), n=n, m=m, delta_f=0.1, every=3,
                                 start_step=2)
  assert res.x0.shape == (prompts, 2)
  # Count by hand: 2 ODE steps to the first search point, then per search 1 back-solve step
  # (Δf + one step = 2 grid steps of 0.1 → 2 sub-steps) + 1 x̂0 call on N·M candidates, and
  # every=3 adds 2 plain steps for the N beams between searches.
  # Search at i=2 (to 3), plain 3→5, search at 5 (to 6), plain 6→8, search at 8 (to 9),
  # plain 9→10 (σ=0).
  expected = n * 2 + 3 * (n * m * 2 + n * m) + n * (2 + 2 + 1)
  assert res.model_calls == expected, (res.model_calls, expected)
  plain = search.best_of_n(exact_velocity, x[::n], sig, verifier, n=1)
  assert float(jnp.mean(res.score)) > float(jnp.mean(plain.score)) + 0.5


def test_bad_grouping_is_named():
  sig = schedules.get_sigmas('linear', 4)
  with pytest.raises(ValueError, match='not a multiple of n=4'):
    search.best_of_n(exact_velocity, jnp.zeros((6, 2)), sig, verifier, n=4)
  with pytest.raises(ValueError, match='start_step'):
    search.search_over_paths(lambda r: exact_velocity, jnp.zeros((4, 2)), sig, verifier,
                             jax.random.key(0), n=2, start_step=4)
