"""Tests for rewarddance_jax.flow.rollout (docs/algorithms.md §2.3, §2.5, §3.6)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rewarddance_jax.flow import rollout
from rewarddance_jax.flow import schedules
from rewarddance_jax.flow import steps

NOISE = {'ode': 0.0, 'dance': 0.3, 'flow_grpo': 0.7, 'cps': 0.8}
BATCH, SHAPE, N = 8, (2, 4, 4), 6
SIGMAS = schedules.get_sigmas('shift', N, shift=3.0)

# The bit-exact rescoring checks are about the code XLA's default pipeline emits (with most
# optimisations off, the rollout's and the rescoring's log-probs differ in the last ulp).
pytestmark = pytest.mark.xla_optimized


def _velocity():
  """A tiny nonlinear velocity network in plain jnp with fixed weights (closure over params)."""
  rng = np.random.default_rng(0)
  dim = int(np.prod(SHAPE))
  w1 = jnp.asarray(rng.standard_normal((dim, 32)) * 0.3, jnp.float32)
  w2 = jnp.asarray(rng.standard_normal((32, dim)) * 0.3, jnp.float32)
  w_sigma = jnp.asarray(rng.standard_normal(32), jnp.float32)

  def velocity(x, sigma):
    assert sigma.shape == (x.shape[0],)
    h = jnp.tanh(x.reshape(x.shape[0], -1) @ w1 + sigma[:, None] * w_sigma)
    return (h @ w2).reshape(x.shape)

  return velocity


VELOCITY = _velocity()


ALL_SDE = jnp.ones(N, bool)


@functools.lru_cache(maxsize=None)
def _rollout_fn(kind, keep_steps=None):
  """Jitted rollout with sigmas, key and sde_mask as traced arguments (one compile per kind)."""
  return jax.jit(lambda x, sigmas, key, sde_mask: rollout.rollout(
      VELOCITY, x, sigmas, key, kind=kind, noise_level=NOISE[kind], sde_mask=sde_mask,
      keep_steps=keep_steps))


def _key(kind, seed):
  # 'dance' runs use the default threefry keys (the sharded test needs their partitionable bits);
  # the others use RBG keys, which compile ~5x faster on CPU and do not touch the step math.
  return jax.random.key(seed) if kind == 'dance' else jax.random.key(seed, impl='rbg')


@functools.lru_cache(maxsize=None)
def _rescore_fn(kind):
  return jax.jit(lambda x, x_next, s, s_next: rollout.transition_log_prob(
      VELOCITY, x, x_next, s, s_next, kind=kind, noise_level=NOISE[kind]))


@jax.jit
def _ode_step(x, s, s_next):
  return steps.flow_step('ode', VELOCITY(x, jnp.full((x.shape[0],), s)), x, s, s_next).x_next


def _x_init(seed=0):
  return rollout.initial_noise(jax.random.key(seed), (BATCH,) + SHAPE)


def _assert_rescoring_exact(kind, traj):
  for j in range(traj.x.shape[0]):
    new = _rescore_fn(kind)(traj.x[j], traj.x_next[j], traj.sigma[j], traj.sigma_next[j])
    np.testing.assert_array_equal(new, traj.logp[j], err_msg=f'{kind} stored step {j}')


@pytest.mark.parametrize('kind', ['dance', 'flow_grpo', 'cps'])
def test_rollout_is_reproducible_and_its_logps_rescore_exactly(kind):
  x_init, key = _x_init(), _key(kind, 1)
  traj = _rollout_fn(kind)(x_init, SIGMAS, key, ALL_SDE)
  assert traj.x.shape == traj.x_next.shape == (N, BATCH) + SHAPE
  assert traj.logp.shape == (N, BATCH) and traj.logp.dtype == jnp.float32
  assert traj.sigma.shape == traj.sigma_next.shape == (N,)
  assert traj.x0_hat.shape == traj.x_final.shape == (BATCH,) + SHAPE
  np.testing.assert_array_equal(traj.sigma, SIGMAS[:-1])
  np.testing.assert_array_equal(traj.sigma_next, SIGMAS[1:])
  np.testing.assert_array_equal(traj.x[0], x_init)
  np.testing.assert_array_equal(traj.x[1:], traj.x_next[:-1])
  np.testing.assert_array_equal(traj.x_final, traj.x_next[-1])
  assert np.all(np.isfinite(traj.logp))
  # Same key, same trajectory; another key, another one.
  again = _rollout_fn(kind)(x_init, SIGMAS, key, ALL_SDE)
  for a, b in zip(traj, again):
    np.testing.assert_array_equal(a, b)
  other = _rollout_fn(kind)(x_init, SIGMAS, _key(kind, 2), ALL_SDE)
  assert not np.allclose(other.x_final, traj.x_final)
  # GRPO ratio == 1 before any update: re-scoring every stored step gives the stored logp exactly.
  _assert_rescoring_exact(kind, traj)


def test_ode_rollout_matches_sample_ode_and_x0_hat():
  x_init = _x_init()
  traj = _rollout_fn('ode')(x_init, SIGMAS, jax.random.key(0), None)
  np.testing.assert_array_equal(traj.logp, np.zeros((N, BATCH)))
  x_final = jax.jit(lambda x, s: rollout.sample_ode(VELOCITY, x, s))(x_init, SIGMAS)
  np.testing.assert_allclose(traj.x_final, x_final, rtol=1e-6, atol=1e-6)
  # An ODE last step into σ = 0 lands on x̂0 = x − σ·v.
  np.testing.assert_array_equal(traj.x0_hat, traj.x_final)


def test_sde_mask_switches_steps_to_the_ode():
  mask = np.array([True, False, True, True, False, False])
  traj = _rollout_fn('dance')(_x_init(), SIGMAS, jax.random.key(3), jnp.asarray(mask))
  for j in range(N):
    if mask[j]:
      assert np.all(traj.logp[j] != 0)
    else:
      np.testing.assert_array_equal(traj.logp[j], np.zeros(BATCH))
      ode = _ode_step(traj.x[j], SIGMAS[j], SIGMAS[j + 1])
      np.testing.assert_allclose(traj.x_next[j], ode, rtol=1e-6, atol=1e-7, err_msg=f'step {j}')
  # The last step is an ODE step into σ = 0, so the decoded x̂0 equals the final sample.
  np.testing.assert_array_equal(traj.x0_hat, traj.x_final)
  _assert_rescoring_exact('dance', traj._replace(
      x=traj.x[mask], x_next=traj.x_next[mask], logp=traj.logp[mask],
      sigma=traj.sigma[mask], sigma_next=traj.sigma_next[mask]))
  # All-SDE (DanceGRPO default): the last step is stochastic and x̂0 differs from x_N.
  full = _rollout_fn('dance')(_x_init(), SIGMAS, jax.random.key(3), ALL_SDE)
  assert not np.allclose(full.x0_hat, full.x_final)


def test_keep_steps_stores_only_those_steps():
  x_init, key = _x_init(), jax.random.key(4)
  full = _rollout_fn('dance')(x_init, SIGMAS, key, ALL_SDE)
  kept = _rollout_fn('dance', keep_steps=(4, 1))(x_init, SIGMAS, key, ALL_SDE)
  idx = np.array([1, 4])  # Sorted.
  assert kept.x.shape == kept.x_next.shape == (2, BATCH) + SHAPE
  assert kept.logp.shape == (2, BATCH)
  for name in ('x', 'x_next', 'logp', 'sigma', 'sigma_next'):
    np.testing.assert_allclose(getattr(kept, name), getattr(full, name)[idx], rtol=1e-6,
                               atol=1e-6, err_msg=name)
  np.testing.assert_allclose(kept.x_final, full.x_final, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(kept.x0_hat, full.x0_hat, rtol=1e-6, atol=1e-6)
  _assert_rescoring_exact('dance', kept)


def test_rollout_sharded_over_eight_devices_matches_one_device():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  x_init, key = _x_init(), jax.random.key(5)
  single = _rollout_fn('dance')(x_init, SIGMAS, key, ALL_SDE)
  sharded_x = jax.device_put(x_init, NamedSharding(mesh, P('data')))
  sharded = _rollout_fn('dance')(sharded_x, SIGMAS, key, ALL_SDE)
  # The stored buffers keep the batch sharding (nothing is gathered onto one device).
  assert sharded.x.sharding.is_equivalent_to(NamedSharding(mesh, P(None, 'data')), sharded.x.ndim)
  assert sharded.x_final.sharding.is_equivalent_to(NamedSharding(mesh, P('data')), 4)
  for name, a, b in zip(single._fields, sharded, single):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)


def test_initial_noise_groups():
  key = jax.random.key(6)
  shape = (6, 2, 3)
  x = rollout.initial_noise(key, shape, group_size=3, same_noise=True)
  assert x.shape == shape and x.dtype == jnp.float32
  for g in range(2):
    expected = jax.random.normal(jax.random.fold_in(key, g), shape[1:])
    for row in range(3 * g, 3 * g + 3):
      np.testing.assert_array_equal(x[row], expected)
  assert not np.allclose(x[0], x[3])
  independent = rollout.initial_noise(key, shape, group_size=3)
  np.testing.assert_array_equal(independent, jax.random.normal(key, shape))
  assert rollout.initial_noise(key, shape, dtype=jnp.bfloat16).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r'\b7\b.*\b3\b'):
    rollout.initial_noise(key, (7, 2), group_size=3, same_noise=True)


def test_rollout_errors():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="'euler'"):
    rollout.rollout(VELOCITY, x, SIGMAS, jax.random.key(0), kind='euler')
  with pytest.raises(ValueError, match='sde_mask'):
    rollout.rollout(VELOCITY, x, SIGMAS, jax.random.key(0), kind='dance', noise_level=0.3,
                    sde_mask=jnp.ones(3, bool))
  for bad in [(0, 0), (6,), (-1,)]:
    with pytest.raises(ValueError, match='keep_steps'):
      rollout.rollout(VELOCITY, x, SIGMAS, jax.random.key(0), keep_steps=bad)
