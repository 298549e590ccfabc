"""Tests for rewarddance_jax.rl.ema (docs/algorithms.md §3.6); expected values worked by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rewarddance_jax.rl import ema


def test_ema_update_values_and_dtype():
  ema_params = {'w': jnp.array([1.0, 2.0]), 'b': jnp.array(0.5)}
  params = {'w': jnp.array([3.0, 0.0], jnp.bfloat16), 'b': jnp.array(1.5, jnp.bfloat16)}
  out = jax.jit(ema.ema_update)(ema_params, params, 0.9)
  # 0.9·1 + 0.1·3 = 1.2; 0.9·2 + 0 = 1.8; 0.9·0.5 + 0.1·1.5 = 0.6.
  np.testing.assert_allclose(out['w'], [1.2, 1.8], rtol=1e-6)
  assert float(out['b']) == pytest.approx(0.6, rel=1e-6)
  assert out['w'].dtype == jnp.float32 and out['b'].dtype == jnp.float32


def test_ema_update_extremes_and_repeated_steps():
  e, p = {'x': jnp.array([0.25, -4.0])}, {'x': jnp.array([1.0, 8.0])}
  np.testing.assert_array_equal(ema.ema_update(e, p, 1.0)['x'], e['x'])
  np.testing.assert_array_equal(ema.ema_update(e, p, 0.0)['x'], p['x'])
  # Constant params: ema_n = p + d^n·(ema_0 − p); d = 0.5, n = 3 from 0 toward 1 gives 0.875.
  state = {'x': jnp.array(0.0)}
  step = jax.jit(ema.ema_update)
  for _ in range(3):
    state = step(state, {'x': jnp.array(1.0)}, jnp.float32(0.5))
  assert float(state['x']) == 0.875


def test_ema_update_structure_mismatch():
  with pytest.raises(ValueError):
    ema.ema_update({'a': jnp.zeros(2)}, {'a': jnp.zeros(2), 'b': jnp.zeros(2)}, 0.9)

