"""PRFL: the objective by hand, the trainer end to end on the tiny config (and its exact resume),
the jitted step (sharded == one device; a few steps raise a differentiable reward), bad rewards."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.digits import prfl as prfl_config
from rewarddance_jax.families.digits import LATENT_SHAPE
from rewarddance_jax import metrics as metrics_lib
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.rewards import base, registry, rules
from rewarddance_jax.rl import prfl as prfl_lib
from rewarddance_jax.train import common, optim, prfl as prfl_trainer

B = 8



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


def test_prfl_rejects_a_non_differentiable_reward(tmp_path):
  cfg = prfl_config.get_config('runlocal')
  cfg.rewards = {'ink_fraction': {'weight': 1.0}}
  cfg.mesh.num_devices = 1
  with pytest.raises(ValueError, match='PRFL needs differentiable rewards.*ink_fraction'):
    prfl_trainer.train(cfg, str(tmp_path))


def _config(**overrides):
  c = prfl_config.get_config('runlocal')
  c.rewards = {'mean_intensity': {'weight': 1.0}}
  c.samples.every = 0
  c.mesh.num_devices = 1
  c.ckpt.async_save = False
  c.data.batch_size = B
  c.prfl.fm_weight = 0.0
  c.optax.eps = 1e-3   # see test_train_flow: keeps Adam's first step from amplifying rounding
  for k, v in overrides.items():
    sec, _, key = k.rpartition('.')
    (c[sec] if sec else c)[key] = v
  return c


def _step_setup(config, ici, devices):
  mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(
      dict(axes=('data', 'fsdp', 'tensor'), ici=ici)), devices)
  rules_ = sharding_lib.rules_from_config(config.sharding_rules)
  pcfg = prfl_trainer.PRFLConfig.from_config(config.prfl)
  graphdef, params, pshard, _ = common.build_generator(config, mesh, rules_)
  tx = optim.make_optimizer(config.optax)
  state, shard = common.policy_state(params, pshard, tx, mesh, 0.0)
  step = prfl_trainer.make_prfl_step(graphdef, tx, pcfg, LATENT_SHAPE)
  rng = np.random.default_rng(0)
  batch = sharding_lib.host_to_global(
      {'images': rng.uniform(size=(B,) + LATENT_SHAPE).astype(np.float32),
       'labels': np.arange(B, dtype=np.int32) % 10,
       'tokens': rng.integers(4, 40, size=(B, 8)).astype(np.int32),
       'mask': np.ones((B, 8), bool)}, mesh, rules_)
  consts = {'rewards': base.WeightedRewards([(rules.mean_intensity(), 1.0)])}
  with common.mesh_context(mesh, rules_):
    fn = jax.jit(step, in_shardings=(shard, None, None, None), out_shardings=(shard, None))

  def run(state, key):
    with common.mesh_context(mesh, rules_):
      return fn(state, batch, key, consts)

  return state, run


@pytest.mark.slow  # flow and GRPO steps are sharding-tested by default
def test_sharded_step_equals_single_device():
  out = {}
  for name, ici, devices in (('mesh', (2, 2, 2), jax.devices()),
                             ('one', (1, 1, 1), jax.devices()[:1])):
    state, run = _step_setup(_config(), ici, devices)
    new, m = run(state, jax.random.key(3))
    out[name] = (jax.device_get(new['params']), jax.device_get(m))
  (p_mesh, m_mesh), (p_one, m_one) = out['mesh'], out['one']
  for k in ('loss', 'reward_mean', 'grad_norm', 'step_index'):
    np.testing.assert_allclose(m_mesh[k], m_one[k], rtol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p_mesh, p_one)


def test_reward_rises_by_more_than_the_key_to_key_spread():
  cfg = _config()
  cfg.optax.update(lr=3e-2, eps=1e-8)
  state, run = _step_setup(cfg, (1, 1, 1), jax.devices()[:1])
  # The reward of the untrained model over keys (random step s, noise): the noise to beat.
  noise = float(np.std([float(run(state, jax.random.key(100 + i))[1]['reward_mean'])
                        for i in range(4)]))
  rewards = []
  for it in range(8):
    state, m = run(state, jax.random.key(it))
    assert float(m['skipped']) == 0
    rewards.append(float(m['reward_mean']))
  margin = max(0.05, 3 * noise)
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + margin, (rewards, margin)


def test_trainer_updates_through_the_reward_and_resumes_exactly(tmp_path):
  registry.register('prompt_aware_intensity', _prompt_aware_intensity)
  cfg = _config(total_steps=3)
  cfg.rewards = {'prompt_aware_intensity': {'weight': 1.0}}
  cfg.ckpt.every = 2
  prfl_trainer.train(cfg, str(tmp_path / 'straight'))
  ms = [m for m in metrics_lib.read_metrics(str(tmp_path / 'straight')) if 'loss' in m]
  assert [m['step'] for m in ms] == [1, 2, 3]
  for m in ms:
    assert np.isfinite(m['loss']) and m['skipped'] == 0 and m['grad_norm'] > 0
    assert 0 <= m['step_index'] <= cfg.prfl.num_steps - 2
    # fm_weight = 0: the loss is the reward term alone, 0.1·(2 − r̄) for r in [0, 1].
    np.testing.assert_allclose(m['loss'], 0.1 * (2 - m['reward_mean']), rtol=1e-5)
  # 2 steps, checkpoint, then resume to 3: the metrics equal the uninterrupted run's bitwise.
  half = _config(total_steps=2)
  half.rewards = cfg.rewards
  half.ckpt.every = 2
  prfl_trainer.train(half, str(tmp_path / 'resumed'))
  prfl_trainer.train(cfg, str(tmp_path / 'resumed'))
  key = lambda ms: {m['step']: (m['loss'], m['reward_mean'], m['grad_norm'], m['step_index'])
                    for m in ms if 'loss' in m}
  straight = key(ms)
  resumed = key(metrics_lib.read_metrics(str(tmp_path / 'resumed')))
  assert sorted(resumed) == [1, 2, 3]
  assert resumed == straight
