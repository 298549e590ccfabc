"""PRFL: the objective by hand, the trainer end to end on the tiny config, bad rewards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.digits import prfl as prfl_config
from rewarddance_jax import metrics as metrics_lib
from rewarddance_jax.rewards import base, registry
from rewarddance_jax.rl import prfl as prfl_lib
from rewarddance_jax.train import prfl as prfl_trainer

pytestmark = pytest.mark.usefixtures('fast_compiles')


def test_prfl_loss_hand_values_and_gradient():
  r = jnp.array([0.2, 0.9, 2.5])          # the last one is above 2: relu stops pushing it
  fm = jnp.float32(0.7)
  total, term = prfl_lib.prfl_loss(r, fm, scale=0.1, fm_weight=2.0)
  np.testing.assert_allclose(float(term), 0.1 * (1.8 + 1.1 + 0.0) / 3, rtol=1e-6)
  np.testing.assert_allclose(float(total), float(term) + 1.4, rtol=1e-6)
  grad = jax.grad(lambda r: prfl_lib.prfl_loss(r, fm)[0])(r)
  np.testing.assert_allclose(np.asarray(grad), [-0.1 / 3, -0.1 / 3, 0.0], rtol=1e-6)
  with pytest.raises(ValueError, match=r'shape \(B,\)'):
    prfl_lib.prfl_loss(jnp.ones((2, 2)), fm)


def _prompt_aware_intensity(name):
  """Mean intensity that, like the process reward, needs the prompt tokens in its batch."""
  def fn(params, samples, batch, key):
    del params, key
    assert batch['tokens'].shape[0] == samples['pixels'].shape[0]
    return jnp.mean(samples['pixels'], axis=(1, 2, 3))
  return base.Reward(name=name, fn=fn, inputs='pixels', differentiable=True)


def test_prfl_trainer_updates_the_generator_through_the_reward(tmp_path):
  registry.register('prompt_aware_intensity', _prompt_aware_intensity)
  cfg = prfl_config.get_config('runlocal')
  cfg.rewards = {'prompt_aware_intensity': {'weight': 1.0}}
  cfg.samples.every = 0
  cfg.mesh.num_devices = 1
  cfg.total_steps = 3
  cfg.ckpt.async_save = False
  cfg.prfl.fm_weight = 0.0                # only the reward moves the params
  prfl_trainer.train(cfg, str(tmp_path))
  ms = [m for m in metrics_lib.read_metrics(str(tmp_path)) if 'loss' in m]
  assert [m['step'] for m in ms] == [1, 2, 3]
  for m in ms:
    assert np.isfinite(m['loss']) and m['skipped'] == 0 and m['grad_norm'] > 0
    assert 0 <= m['step_index'] <= cfg.prfl.num_steps - 2
    # fm_weight = 0: the loss is the reward term alone, 0.1·(2 − r̄) for r in [0, 1].
    np.testing.assert_allclose(m['loss'], 0.1 * (2 - m['reward_mean']), rtol=1e-5)


def test_prfl_rejects_a_non_differentiable_reward(tmp_path):
  cfg = prfl_config.get_config('runlocal')
  cfg.rewards = {'ink_fraction': {'weight': 1.0}}
  cfg.mesh.num_devices = 1
  with pytest.raises(ValueError, match='PRFL needs differentiable rewards.*ink_fraction'):
    prfl_trainer.train(cfg, str(tmp_path))
