"""R0: DDIM-η step, gradient normalisation, surrogate and L2 by hand; the jitted step (gradient
through the K steps and through the reward; a few steps raise a reward); R0+."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.digits import r0 as r0_config
from rewarddance_jax.families.digits import LATENT_SHAPE
from rewarddance_jax.families.base import unit_decode
from rewarddance_jax import metrics as metrics_lib
from rewarddance_jax.flow import ddim, steps
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.rewards import base, rules
from rewarddance_jax.rl import r0 as r0_lib
from rewarddance_jax.train import common, optim, r0 as r0_trainer, refl as refl_trainer

B = 8


def test_ddim_eta_step_by_hand():
  x = jnp.asarray([[1.0, -2.0]])
  v = jnp.asarray([[0.5, 1.0]])
  xi = jnp.asarray([[0.3, -0.1]])
  sigma, sigma_next = 0.75, 0.25
  x0 = np.array([1.0 - 0.375, -2.0 - 0.75])        # x − σ·v
  eps = np.array([1.0 + 0.125, -2.0 + 0.25])       # x + (1 − σ)·v
  # η = 0: the Euler ODE step x + (σ' − σ)·v.
  out = ddim.ddim_eta_step(v, x, sigma, sigma_next, 0.0, xi)
  np.testing.assert_allclose(out, steps.flow_step('ode', v, x, sigma, sigma_next).x_next,
                             rtol=1e-6)
  np.testing.assert_allclose(out[0], 0.75 * x0 + 0.25 * eps, rtol=1e-6)
  # η = 0.6 per sample: sqrt(1 − η²) = 0.8.
  out = ddim.ddim_eta_step(v, x, sigma, sigma_next, jnp.asarray([0.6]), xi)
  np.testing.assert_allclose(out[0], 0.75 * x0 + 0.25 * (0.8 * eps + 0.6 * np.array([0.3, -0.1])),
                             rtol=1e-6)
  # σ' = 0 returns x̂0 whatever η.
  np.testing.assert_allclose(ddim.ddim_eta_step(v, x, sigma, 0.0, 1.0, xi)[0], x0, rtol=1e-6)


def test_normalized_direction_surrogate_and_l2_by_hand():
  x = jnp.asarray([[3.0, 4.0], [1.0, 0.0]])
  fns = {'lin': lambda x: 2.0 * jnp.sum(x, axis=1),          # ∇ = (2, 2), norm 2√2
         'sq': lambda x: -jnp.sum(jnp.square(x), axis=1)}     # ∇ = −2x, norm 2‖x‖
  d, values = r0_lib.normalized_direction(fns, {'lin': 1.0, 'sq': 0.5}, x, eps=0.0)
  want = (np.ones((2, 2)) / np.sqrt(2.0)
          + 0.5 * -np.array([[3.0, 4.0], [1.0, 0.0]]) / np.array([[5.0], [1.0]]))
  np.testing.assert_allclose(d, want, rtol=1e-6)
  np.testing.assert_allclose(values['lin'], [14.0, 2.0])
  np.testing.assert_allclose(values['sq'], [-25.0, -1.0])
  # −mean_b ⟨d_b, x_b⟩, and its gradient is −d/B.
  np.testing.assert_allclose(float(r0_lib.surrogate_loss(x, d)),
                             -np.mean(np.sum(want * np.asarray(x), axis=1)), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(r0_lib.surrogate_loss)(x, d), -want / 2, rtol=1e-6)
  p = {'a': jnp.asarray([1.0, 2.0]), 'b': jnp.asarray([[0.5]])}
  p0 = {'a': jnp.asarray([0.0, 4.0]), 'b': jnp.asarray([[0.0]])}
  np.testing.assert_allclose(float(r0_lib.l2_to_init(p, p0)), 1.0 + 4.0 + 0.25, rtol=1e-6)
  g = jax.grad(r0_lib.l2_to_init)(p, p0)
  np.testing.assert_allclose(g['a'], [2.0, -4.0])


def test_reward_cap_stops_the_push_of_saturated_samples_only():
  x = jnp.asarray([[3.0, 4.0], [1.0, 0.0], [0.2, 0.1]])
  fns = {'lin': lambda x: jnp.sum(x, axis=1)}               # values 7, 1, 0.3; ∇ = (1, 1)
  d, values = r0_lib.normalized_direction(fns, {'lin': 1.0}, x, eps=1e-8, cap=0.9)
  unit = 1.0 / np.sqrt(2.0)
  # min(R, 0.9): rows above the cap get no push; the third keeps its unit-norm direction.
  np.testing.assert_allclose(d, [[0.0, 0.0], [0.0, 0.0], [unit, unit]], rtol=1e-6)
  np.testing.assert_allclose(values['lin'], [7.0, 1.0, 0.3], rtol=1e-6)   # reported uncapped
  d_none, _ = r0_lib.normalized_direction(fns, {'lin': 1.0}, x, eps=1e-8)
  np.testing.assert_allclose(d_none, np.full((3, 2), unit), rtol=1e-6)


def _setup(plus: bool, lr: float, ici=(1, 1, 1), devices=None, eps=None):
  config = r0_config.get_config('runlocal')
  devices = devices or jax.devices()[:1]
  config.mesh.update(ici=ici, num_devices=len(devices))
  config.optax.lr = lr
  if eps is not None:
    config.optax.eps = eps
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  rules_ = sharding_lib.rules_from_config(config.sharding_rules)
  rcfg = r0_trainer.R0Config.from_config(dict(config.r0, plus=plus, l2_weight=1e-4))
  graphdef, params, pshard, _ = common.build_generator(config, mesh, rules_)
  tx = optim.make_optimizer(config.optax)
  state, shard = refl_trainer.build_state(params, pshard, tx, mesh, 0.0)
  step = r0_trainer.make_r0_step(graphdef, tx, rcfg, LATENT_SHAPE, decode=unit_decode)
  rng = np.random.default_rng(0)
  batch = sharding_lib.host_to_global(
      {'tokens': rng.integers(4, 40, size=(B, 8)).astype(np.int32),
       'mask': np.ones((B, 8), bool), 'labels': np.arange(B, dtype=np.int32) % 10}, mesh, rules_)
  rewards = base.WeightedRewards([(rules.mean_intensity(), 1.0),
                                  (rules.digit_prototype(), 0.5)])
  consts = {'rewards': rewards, 'init': jax.tree.map(jnp.copy, params)}
  with common.mesh_context(mesh, rules_):
    fn = jax.jit(step, in_shardings=(shard, None, None, None), out_shardings=(shard, None))

  def run(state, key):
    with common.mesh_context(mesh, rules_):
      return fn(state, batch, key, consts)

  return state, run


def test_r0_gradient_through_k_steps_raises_rewards():
  state, run = _setup(plus=False, lr=1e-2)
  p0 = jax.device_get(state['params'])
  # Key-to-key spread of the untrained generator's intensity: the noise the rise must beat.
  noise = float(np.std([float(run(state, jax.random.key(100 + i))[1]['reward/mean_intensity_mean'])
                        for i in range(4)]))
  intensity, l2 = [], []
  for it in range(10):
    state, m = run(state, jax.random.key(it))
    m = jax.device_get(m)
    if it == 0:
      assert float(m['skipped']) == 0 and np.isfinite(float(m['grad_norm']))
      assert float(m['grad_norm']) > 1e-6
      assert float(m['l2']) == 0.0   # θ = θ0 before the first update
    intensity.append(float(m['reward/mean_intensity_mean']))
    l2.append(float(m['l2']))
  moved = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(jax.device_get(state['params'])), jax.tree.leaves(p0)))
  assert moved > 1e-3 and l2[-1] > 0
  assert np.mean(intensity[-3:]) > np.mean(intensity[:3]) + max(0.05, 3 * noise), intensity


@pytest.mark.slow  # flow and GRPO steps are sharding-tested by default
def test_sharded_step_equals_single_device():
  out = {}
  for name, ici, devices in (('mesh', (2, 2, 2), jax.devices()),
                             ('one', (1, 1, 1), jax.devices()[:1])):
    # eps 1e-3: see test_train_flow (keeps Adam's first step from amplifying rounding).
    state, run = _setup(plus=False, lr=1e-2, ici=ici, devices=devices, eps=1e-3)
    new, m = run(state, jax.random.key(3))
    out[name] = (jax.device_get(new['params']), jax.device_get(m))
  (p_mesh, m_mesh), (p_one, m_one) = out['mesh'], out['one']
  for k in ('loss', 'reward_mean', 'grad_norm', 'surrogate'):
    np.testing.assert_allclose(m_mesh[k], m_one[k], rtol=1e-4, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p_mesh, p_one)


def test_trainer_resume_equals_uninterrupted(tmp_path):
  def config(steps):
    c = r0_config.get_config('runlocal')
    c.update(total_steps=steps)
    c.rewards = {'mean_intensity': {'weight': 1.0}}
    c.samples.every = 0
    c.mesh.num_devices = 1
    c.data.batch_size = B
    c.ckpt.update(every=2, async_save=False)
    return c

  r0_trainer.train(config(3), str(tmp_path / 'straight'))
  r0_trainer.train(config(2), str(tmp_path / 'resumed'))
  r0_trainer.train(config(3), str(tmp_path / 'resumed'))
  key = lambda ms: {m['step']: (m['loss'], m['reward_mean'], m['grad_norm'], m['l2'])
                    for m in ms if 'loss' in m}
  straight = key(metrics_lib.read_metrics(str(tmp_path / 'straight')))
  resumed = key(metrics_lib.read_metrics(str(tmp_path / 'resumed')))
  assert sorted(resumed) == [1, 2, 3]
  assert resumed == straight
  assert straight[3][3] > 0   # θ moved away from θ0


def test_r0_plus_supervises_a_random_step():
  state, run = _setup(plus=True, lr=1e-2)
  seen = set()
  for it in range(5):
    state, m = run(state, jax.random.key(it))
    m = jax.device_get(m)
    assert float(m['skipped']) == 0 and float(m['grad_norm']) > 1e-6
    seen.add(int(m['supervised_step']))
  assert len(seen) > 1 and seen <= {0, 1, 2, 3}


def test_bad_config_is_one_clear_error():
  with pytest.raises(ValueError, match='unknown key.*bogus'):
    r0_trainer.R0Config.from_config({'bogus': 1})
  with pytest.raises(ValueError, match=r'^config.r0.eta_max=2.0 must be a number in \[0, 1\]\.$'):
    r0_trainer.R0Config.from_config({'eta_max': 2.0})
