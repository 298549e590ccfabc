"""ReFL: the objective by hand, the best-of-N win counts, the jitted step (the gradient reaches the
generator through the reward; a few steps raise a differentiable reward) and exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.digits import refl as refl_config
from rewarddance_jax.families.digits import LATENT_SHAPE
from rewarddance_jax.families.base import unit_decode
from rewarddance_jax import metrics as metrics_lib
from rewarddance_jax.data import label_table
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.rewards import base, rules
from rewarddance_jax.rl import refl as refl_lib
from rewarddance_jax.train import common, optim, refl as refl_trainer

B = 8


def _config(**overrides):
  c = refl_config.get_config('runlocal')
  c.samples.every = 0
  c.ckpt.async_save = False
  c.mesh.num_devices = 1
  c.mesh.ici = (1, 1, 1)
  c.data.batch_size = B
  c.refl.update(num_steps=4, fm_weight=0.0, scale=1.0)
  c.rewards = {'mean_intensity': {'weight': 1.0}}
  c.optax.lr = 3e-2   # a big step, so a few steps of a tiny model show the trend clearly
  for k, v in overrides.items():
    sec, _, key = k.rpartition('.')
    (c[sec] if sec else c)[key] = v
  return c


def test_refl_losses_and_late_steps_by_hand():
  r = jnp.asarray([1.0, 2.5, 0.0])
  # relu(2 − r) = (1, 0, 2), mean 1, × 1e-3.
  np.testing.assert_allclose(float(refl_lib.imagereward_loss(r)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(refl_lib.refl_loss(r, 'imagereward', scale=0.5, target=1.0)),
                             0.5 * (0.0 + 0.0 + 1.0) / 3, rtol=1e-6)
  np.testing.assert_allclose(float(refl_lib.linear_loss(r, scale=0.3)), -0.3 * 3.5 / 3, rtol=1e-6)
  assert refl_lib.late_step_range(40, 0.25) == (30, 40)   # ImageReward's mid ∈ {30..39}
  assert refl_lib.late_step_range(20, 0.25) == (15, 20)
  assert refl_lib.late_step_range(4, 0.25) == (3, 4)
  mids = {int(refl_lib.sample_step(jax.random.key(i), 15, 20)) for i in range(60)}
  assert mids == set(range(15, 20))
  with pytest.raises(ValueError, match='not one of'):
    refl_lib.refl_loss(r, 'hinge')


def test_win_counts_rank_by_wins_then_preference():
  # pref[i, j] = P(j better than i) (column j: candidate j as the generated image). Candidate 2
  # wins both of its comparisons; 0 and 1 win one each (a tie in wins), and 1 has the larger
  # summed preference (1.0 against 0.65).
  pref = np.array([[0.0, 0.6, 0.9],
                   [0.55, 0.0, 0.8],
                   [0.1, 0.4, 0.0]])
  s = refl_trainer.win_counts(pref)
  np.testing.assert_allclose(s, [1 + 0.65 / 4, 1 + 1.0 / 4, 2 + 1.7 / 4])
  assert list(np.argsort(-s)) == [2, 1, 0]


def _step(config, devices):
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  rules_ = sharding_lib.rules_from_config(config.sharding_rules)
  rcfg = refl_trainer.ReFLConfig.from_config(config.refl)
  graphdef, params, pshard, _ = common.build_generator(config, mesh, rules_)
  tx = optim.make_optimizer(config.optax)
  state, shard = refl_trainer.build_state(params, pshard, tx, mesh, 0.0)
  step = refl_trainer.make_refl_step(graphdef, tx, rcfg, LATENT_SHAPE,
                                     decode=unit_decode)
  rng = np.random.default_rng(0)
  batch = sharding_lib.host_to_global(
      {'images': rng.uniform(size=(B,) + LATENT_SHAPE).astype(np.float32),
       'labels': np.arange(B, dtype=np.int32) % 10,
       'tokens': rng.integers(4, 40, size=(B, 8)).astype(np.int32),
       'mask': np.ones((B, 8), bool)}, mesh, rules_)
  consts = {'rewards': base.WeightedRewards([(rules.mean_intensity(), 1.0)])}
  # Jitted as the loop does (same shardings and donation): the trainer runs of the resume test
  # then compile the same program and hit the persistent compilation cache (conftest.py).
  with common.mesh_context(mesh, rules_):
    fn = jax.jit(step, in_shardings=(shard, None, None, None), out_shardings=(shard, None),
                 donate_argnums=(0,))

  def run(state, key):
    with common.mesh_context(mesh, rules_):
      return fn(state, batch, key, consts)

  return state, run


@pytest.fixture(scope='module')
def step_setup():
  return _step(_config(), jax.devices()[:1])


@pytest.mark.slow  # flow and GRPO steps are sharding-tested by default
def test_sharded_step_equals_single_device():
  out = {}
  for name, ici, devices in (('mesh', (2, 2, 2), jax.devices()),
                             ('one', (1, 1, 1), jax.devices()[:1])):
    cfg = _config()
    cfg.mesh.update(ici=ici, num_devices=len(devices))
    cfg.optax.eps = 1e-3   # see test_train_flow: keeps Adam's first step from amplifying rounding
    state, run = _step(cfg, devices)
    new, m = run(state, jax.random.key(3))
    out[name] = (jax.device_get(new['params']), jax.device_get(m))
  (p_mesh, m_mesh), (p_one, m_one) = out['mesh'], out['one']
  for k in ('loss', 'reward_mean', 'grad_norm', 'mid_step'):
    np.testing.assert_allclose(m_mesh[k], m_one[k], rtol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p_mesh, p_one)


def test_gradient_reaches_generator_and_reward_rises(step_setup):
  state, run = step_setup
  p0 = jax.device_get(state['params'])
  state = jax.tree.map(jnp.copy, state)   # the step donates its input
  rewards = []
  for it in range(6):
    state, m = run(state, jax.random.key(it))
    m = jax.device_get(m)
    if it == 0:
      # fm_weight = 0: the loss is −scale·mean(r), so every gradient comes through the reward.
      assert float(m['skipped']) == 0 and np.isfinite(float(m['grad_norm']))
      assert float(m['grad_norm']) > 1e-6
      assert float(m['mid_step']) == 3.0   # the last quarter of 4 steps
      np.testing.assert_allclose(float(m['loss']), -float(m['reward_mean']), rtol=1e-6)
      # Seed-to-seed noise of a batch mean: the per-sample spread over sqrt(B).
      margin = max(0.1, 3 * float(m['reward_std']) / np.sqrt(B))
    rewards.append(float(m['reward_mean']))
  moved = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(jax.device_get(state['params'])), jax.tree.leaves(p0)))
  assert moved > 1e-3
  assert int(state['rl']['iteration']) == 6
  assert np.mean(rewards[-3:]) > rewards[0] + margin, rewards


def test_trainer_resume_equals_uninterrupted(tmp_path):
  cfg = _config(total_steps=3)
  cfg.ckpt.every = 2
  refl_trainer.train(cfg, str(tmp_path / 'straight'))
  half = _config(total_steps=2)
  half.ckpt.every = 2
  refl_trainer.train(half, str(tmp_path / 'resumed'))
  refl_trainer.train(cfg, str(tmp_path / 'resumed'))
  key = lambda ms: {m['step']: (m['loss'], m['reward_mean'], m['grad_norm'])
                    for m in ms if 'loss' in m}
  straight = key(metrics_lib.read_metrics(str(tmp_path / 'straight')))
  resumed = key(metrics_lib.read_metrics(str(tmp_path / 'resumed')))
  assert sorted(resumed) == [1, 2, 3]
  assert resumed == straight


def test_bad_config_is_one_clear_error(tmp_path):
  with pytest.raises(ValueError, match='unknown key.*bogus'):
    refl_trainer.ReFLConfig.from_config({'bogus': 1})
  with pytest.raises(ValueError, match='refl.loss'):
    refl_trainer.ReFLConfig(loss='hinge')
  cfg = _config()
  cfg.rewards = {'ink_fraction': {'weight': 1.0}}
  with pytest.raises(ValueError, match='differentiable rewards.*ink_fraction'):
    refl_trainer.train(cfg, str(tmp_path))


def test_sample_references_draws_one_of_the_labels_top_t():
  refs = np.arange(10 * 2, dtype=np.float32).reshape(10, 2, 1, 1, 1)   # value = 2·label + rank
  labels = jnp.asarray([3, 3, 7, 0] * 8, jnp.int32)
  out = np.asarray(label_table.sample_table(jnp.asarray(refs), labels, jax.random.key(0)))
  rank = out[:, 0, 0, 0] - 2 * np.asarray(labels)
  assert set(rank.tolist()) == {0.0, 1.0}   # both of the top 2 are drawn, nothing else
