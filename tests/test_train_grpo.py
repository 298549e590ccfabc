"""GRPO: the jitted iteration (on-policy ratio, learning, sharded == single device), the trainer
(exact resume), the reward-variance window and bad input."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.digits import grpo as grpo_config
from rewarddance_jax.families.digits import LATENT_SHAPE
from rewarddance_jax.families.base import unit_decode
from rewarddance_jax import metrics as metrics_lib
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.rewards import base, rules
from rewarddance_jax.train import common, grpo as grpo_trainer, grpo_step, optim

G, B = 4, 8
# Every block kernel and the output layer: a fresh generator's output layer and adaLN gates are
# zero-initialised, so LoRAs of its attention kernels alone would get no gradient (a pretrained
# base has no such zeros).
LORA = dict(rank=4, alpha=8.0, targets=r'.*(blocks/.*|final_out/)kernel')



def _config(**overrides):
  c = grpo_config.get_config('runlocal')
  c.samples.every = 0
  c.ckpt.async_save = False
  c.mesh.num_devices = 1
  c.data.batch_size = B
  c.grpo.update(group_size=G, num_steps=3, minibatches=1, selection=dict(kind='prefix',
                                                                           fraction=1.0))
  c.optax.eps = 1e-3   # see test_train_flow: keeps Adam's first step from amplifying rounding
  for k, v in overrides.items():
    sec, _, key = k.rpartition('.')
    (c[sec] if sec else c)[key] = v
  return c


def _setup(config, devices, fm_table=None):
  mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(
      dict(axes=('data', 'fsdp', 'tensor'), ici=config.mesh.ici)), devices)
  rules_ = sharding_lib.rules_from_config(config.sharding_rules)
  gcfg = grpo_step.GRPOConfig.from_config(config.grpo)
  graphdef, params, pshard, _ = common.build_generator(config, mesh, rules_)
  tx = optim.make_optimizer(config.optax)
  frozen = None
  if gcfg.lora.rank:
    frozen = params
    params, pshard = grpo_trainer.init_lora(gcfg.lora, frozen, pshard, jax.random.key(1))
  state, shard = grpo_trainer.build_state(config, params, pshard, tx, mesh, B, gcfg)
  rewards = base.WeightedRewards([(rules.mean_intensity(), 1.0)])
  step = grpo_step.make_grpo_step(graphdef, tx, gcfg, LATENT_SHAPE,
                                  reward_names=rewards.names, reward_weights=rewards.weights,
                                  decode=unit_decode)
  rng = np.random.default_rng(0)
  tokens = np.repeat(rng.integers(4, 40, size=(B // G, 8)).astype(np.int32), G, axis=0)
  host = {'tokens': tokens, 'mask': np.ones((B, 8), bool)}
  if fm_table is not None:
    host['labels'] = np.repeat(np.arange(B // G, dtype=np.int32), G)
  batch = sharding_lib.host_to_global(host, mesh, rules_)
  with common.mesh_context(mesh, rules_):
    fn = jax.jit(step, in_shardings=(shard, None, None, None), out_shardings=(shard, None))
  consts = {'rewards': rewards, 'ref': None, 'base': frozen}
  if fm_table is not None:
    consts['fm_images'] = jnp.asarray(fm_table)

  def run(state, key):
    with common.mesh_context(mesh, rules_):
      return fn(state, batch, key, consts)

  run.consts = consts
  return state, run


def _reward_noise(run, state, n=4):
  """Spread of the iteration's reward_mean between keys at fixed params: the seed-to-seed noise
  a learning curve has to beat (each call's own update is discarded)."""
  return float(np.std([float(run(state, jax.random.key(1000 + i))[1]['reward_mean'])
                       for i in range(n)]))


@pytest.fixture(scope='module')
def single():
  cfg = _config()
  cfg.optax.lr = 3e-2   # a big step, so 10 iterations of a tiny model show the trend clearly
  cfg.mesh.ici = (1, 1, 1)
  return _setup(cfg, jax.devices()[:1])


def test_first_update_is_on_policy_and_rewards_rise(single):
  state, run = single
  p0 = jax.device_get(state['params'])
  margin = max(0.05, 3 * _reward_noise(run, state))
  rewards = []
  for it in range(10):
    state, m = run(state, jax.random.key(it))
    m = jax.device_get(m)
    if it == 0:
      # One minibatch of the rollout's own samples, params unchanged: ρ = 1 up to rounding.
      assert abs(float(m['ratio_min']) - 1) < 1e-4 and abs(float(m['ratio_max']) - 1) < 1e-4
      assert float(m['skipped']) == 0 and float(m['kept_fraction']) > 0.5
      assert float(m['adv_abs_mean']) > 0.1
      first = jax.device_get(state['params'])
    rewards.append(float(m['reward_mean']))
  assert int(state['rl']['iteration']) == 10
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(first),
                                                          jax.tree.leaves(p0)))
  assert moved > 1e-4
  # The mean-intensity reward is easy to raise: the last iterations beat the first ones by more
  # than three times the key-to-key spread of the untrained model's reward.
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + margin, (rewards, margin)


def test_lora_trains_only_the_lora_and_raises_the_reward():
  cfg = _config()
  cfg.optax.lr = 3e-2
  cfg.mesh.ici = (1, 1, 1)
  cfg.grpo.lora = dict(LORA)
  cfg.optax.update(lr=3e-2, eps=1e-8)   # the LoRA's gradients are small: Adam's usual eps
  state, run = _setup(cfg, jax.devices()[:1])
  base0 = jax.device_get(run.consts['base'])
  lora0 = jax.device_get(state['params'])
  q = lora0['transformer']['double_blocks'][0]['img_attn']['qkv']['kernel']
  assert set(q) == {'a', 'b'} and not np.any(q['b'])   # a fresh LoRA: b = 0
  n_lora = sum(int(np.size(x)) for x in jax.tree.leaves(lora0))
  n_opt = sum(int(np.size(x)) for x in jax.tree.leaves(state['opt_state']))
  assert 2 * n_lora <= n_opt <= 2 * n_lora + 16        # Adam moments of the LoRA only
  margin = max(0.05, 3 * _reward_noise(run, state))
  rewards = []
  for it in range(16):   # the LoRA first has to grow out of the zero output layer
    state, m = run(state, jax.random.key(it))
    assert float(m['skipped']) == 0
    rewards.append(float(m['reward_mean']))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.consts['base']), base0)
  moved = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(jax.device_get(state['params'])), jax.tree.leaves(lora0)))
  assert moved > 1e-3
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + margin, (rewards, margin)


def test_sharded_iteration_equals_single_device():
  out = {}
  for name, ici, devices in (('mesh', (2, 2, 2), jax.devices()), ('one', (1, 1, 1),
                                                                   jax.devices()[:1])):
    cfg = _config()
    cfg.mesh.ici = ici
    state, run = _setup(cfg, devices)
    new, m = run(state, jax.random.key(3))
    out[name] = (jax.device_get(new['params']), jax.device_get(m))
  (p_mesh, m_mesh), (p_one, m_one) = out['mesh'], out['one']
  # The surrogate's value at ρ ≈ 1 is −mean(A) ≈ 0 (rounding noise); its gradient is not.
  for k in ('reward_mean', 'reward_std', 'adv_abs_mean', 'grad_norm'):
    np.testing.assert_allclose(m_mesh[k], m_one[k], rtol=1e-4, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p_mesh, p_one)


def test_trainer_resume_equals_uninterrupted(tmp_path):
  cfg = _config(total_steps=4)
  cfg.ckpt.every = 2
  grpo_trainer.train(cfg, str(tmp_path / 'straight'))
  cfg_half = _config(total_steps=2)
  cfg_half.ckpt.every = 2
  grpo_trainer.train(cfg_half, str(tmp_path / 'resumed'))
  grpo_trainer.train(cfg, str(tmp_path / 'resumed'))
  straight = metrics_lib.read_metrics(str(tmp_path / 'straight'))
  resumed = metrics_lib.read_metrics(str(tmp_path / 'resumed'))
  key = lambda ms: {m['step']: (m['loss'], m['reward_mean'], m['reward_window_std'])
                    for m in ms if 'loss' in m}
  assert sorted(key(resumed)) == [1, 2, 3, 4]
  assert key(resumed) == key(straight)


def test_split_mode_gives_the_fused_metrics_and_resumes(tmp_path):
  """grpo.split: rollout + rewards and the update as two jitted programs (loop.SplitStep)."""
  fused = _config(total_steps=3)
  fused.ckpt.every = 2
  grpo_trainer.train(fused, str(tmp_path / 'fused'))
  split = _config(total_steps=2)
  split.grpo.split = True
  split.ckpt.every = 2
  grpo_trainer.train(split, str(tmp_path / 'split'))
  split.total_steps = 3
  grpo_trainer.train(split, str(tmp_path / 'split'))
  names = ('loss', 'reward_mean', 'grad_norm', 'log_ratio_first_max_abs', 'reward_window_std')
  key = lambda ms: {m['step']: tuple(m[n] for n in names) for m in ms if 'loss' in m}
  got = key(metrics_lib.read_metrics(str(tmp_path / 'split')))
  assert sorted(got) == [1, 2, 3]
  assert got == key(metrics_lib.read_metrics(str(tmp_path / 'fused')))


@pytest.mark.slow  # the full-parameter resume test covers the loop
def test_lora_trainer_resume_equals_uninterrupted(tmp_path):
  cfg = _config(total_steps=3)
  cfg.grpo.lora = dict(LORA)
  cfg.grpo.kl_beta = 0.01   # the KL reference is the frozen base
  cfg.optax.update(eps=1e-8, lr=1e-2)
  cfg.ckpt.every = 2
  grpo_trainer.train(cfg, str(tmp_path / 'straight'))
  half = _config(total_steps=2)
  half.grpo.lora = dict(cfg.grpo.lora)
  half.grpo.kl_beta = 0.01
  half.optax = cfg.optax
  half.ckpt.every = 2
  grpo_trainer.train(half, str(tmp_path / 'resumed'))
  grpo_trainer.train(cfg, str(tmp_path / 'resumed'))
  key = lambda ms: {m['step']: (m['loss'], m['reward_mean'], m['kl'], m['grad_norm'])
                    for m in ms if 'loss' in m}
  straight = key(metrics_lib.read_metrics(str(tmp_path / 'straight')))
  resumed = key(metrics_lib.read_metrics(str(tmp_path / 'resumed')))
  assert sorted(resumed) == [1, 2, 3] and resumed == straight
  assert straight[3][2] > 0   # the LoRA moved away from the base by step 3
  # The checkpoint holds the LoRA, its optimizer state and 'rl', not the base.
  step_dir = tmp_path / 'resumed' / 'checkpoints' / '3'
  assert {p.name for p in step_dir.iterdir()} >= {'params', 'opt_state', 'rl'}


@pytest.mark.slow  # two extra GRPO runs
def test_fm_term_alone_fits_the_real_images_and_pure_grpo_has_none():
  # adv_clip = 0 zeroes every advantage, so the only gradient is fm_weight·L_FM on the table's
  # real images (one fixed image per label): its loss must fall; without fm_weight there is no
  # such term and no metric.
  cfg = _config(**{'grpo.adv_clip': 0.0, 'grpo.fm_weight': 1.0, 'optax.lr': 3e-2})
  table = np.random.default_rng(0).uniform(size=(B // G, 1) + LATENT_SHAPE)
  state, run = _setup(cfg, jax.devices()[:1], fm_table=table.astype(np.float32))
  losses = []
  for it in range(12):
    state, m = run(state, jax.random.key(it))
    assert float(m['kept_fraction']) == 0.0
    losses.append(float(m['fm_loss']))
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
  _, m0 = _setup(_config(), jax.devices()[:1])[1](_setup(_config(), jax.devices()[:1])[0],
                                                   jax.random.key(0))
  assert 'fm_loss' not in m0


def test_fm_weight_needs_digit_prompts(tmp_path):
  prompts = tmp_path / 'p.jsonl'
  prompts.write_text('{"prompt": "a red square"}\n')
  cfg = _config(**{'grpo.fm_weight': 1.0, 'data.prompts': str(prompts)})
  with pytest.raises(ValueError, match="fm_weight > 0 .*'a red square' names no digit"):
    grpo_trainer.train(cfg, str(tmp_path / 'run'))


def test_best_of_trains_on_each_groups_best_and_worst_rows_only():
  """best_of = 2 of G = 4: rows 0 and 1 are group 0's extremes, rows 2 and 3 its middle. Moving a
  middle row's stored transition leaves the update bit for bit unchanged; moving an extreme one
  changes it (and without best_of, moving the middle one does too)."""
  mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(
      dict(axes=('data', 'fsdp', 'tensor'), ici=(1, 1, 1))), jax.devices()[:1])
  rules_ = sharding_lib.rules_from_config(_config().sharding_rules)
  rewards = base.WeightedRewards([(rules.mean_intensity(), 1.0)])
  per = {rewards.names[0]: jnp.array([0.1, 0.9, 0.5, 0.3, 0.2, 0.4, 0.8, 0.6])}

  def updates(best_of, rows_moved):
    # No clipping (a clipped row has no gradient) and a small move (a big one underflows ρ to 0).
    cfg = _config(**{'grpo.best_of': best_of, 'grpo.clip_range': 1e3})
    gcfg = grpo_step.GRPOConfig.from_config(cfg.grpo)
    graphdef, params, pshard, _ = common.build_generator(cfg, mesh, rules_)
    tx = optim.make_optimizer(cfg.optax)
    state, _ = grpo_trainer.build_state(cfg, params, pshard, tx, mesh, B, gcfg)
    fns = grpo_step.make_grpo_functions(
        graphdef, tx, gcfg, LATENT_SHAPE, reward_names=rewards.names,
        reward_weights=rewards.weights, decode=unit_decode)
    tokens = np.repeat(np.arange(4, 12, dtype=np.int32).reshape(2, 4), G, axis=0)
    batch = {'tokens': jnp.asarray(tokens), 'mask': jnp.ones((B, 4), bool)}
    consts = {'rewards': rewards, 'ref': None, 'base': None}
    with common.mesh_context(mesh, rules_):
      ro = jax.jit(fns.rollout)(state['params'], batch, grpo_step.split_keys(jax.random.key(0)),
                                jnp.int32(0))
      update = jax.jit(fns.update)
      out = []
      for row in (None,) + rows_moved:
        moved = ro if row is None else dict(ro, x_next=ro['x_next'].at[:, row].add(1e-3))
        new, metrics = update(state, consts, moved, per, batch, jax.random.key(1))
        # The loss and the gradient norm: Adam's first step, g/(|g| + eps), can round a small
        # change of the gradient away in the params.
        out.append(jax.device_get((new['params'], metrics['loss'], metrics['grad_norm'])))
    return out, metrics

  def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  (ref, middle, extreme), metrics = updates(2, (2, 0))
  assert same(ref, middle)
  assert not same(ref, extreme)
  assert float(metrics['kept_fraction']) == 1.0
  (ref, middle), _ = updates(0, (2,))
  assert not same(ref, middle)
  with pytest.raises(ValueError, match='grpo.best_of=3 must be 0'):
    grpo_step.GRPOConfig.from_config(dict(_config().grpo, best_of=3))


def test_reward_window_is_the_std_of_the_last_w_iterations():
  window = jnp.zeros((3, 2), jnp.float32)
  seen = []
  for it, r in enumerate([[1., 2.], [3., 5.], [0., 4.], [7., 7.]]):
    window, mean, var = grpo_step._reward_window(window, jnp.asarray(r), jnp.int32(it))
    seen.append(r)
    last = np.asarray(seen[-3:]).ravel()
    np.testing.assert_allclose(float(mean), last.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(var), last.var(), rtol=1e-5)


@pytest.mark.parametrize('overrides, match', [
    ({'data.batch_size': 6}, 'divisible by grpo.group_size'),
    ({'grpo.step_kind': 'ode'}, 'no log-probs'),
    ({'grpo.group_size': 1}, r'config.grpo.group_size=1 must be an integer in \[2, inf\)'),
])
def test_bad_config_is_one_clear_error(tmp_path, overrides, match):
  cfg = _config(**overrides)
  with pytest.raises(ValueError, match=match):
    grpo_trainer.train(cfg, str(tmp_path))


def test_unknown_grpo_key_and_reward_kind_are_named(tmp_path):
  with pytest.raises(ValueError, match='unknown key.*bogus'):
    grpo_step.GRPOConfig.from_config({'bogus': 1})
  cfg = _config()
  cfg.rewards = {'r': {'kind': 'no_such_reward'}}
  with pytest.raises(ValueError, match=r"config.rewards.r: unknown reward kind 'no_such_reward'"):
    grpo_trainer.train(cfg, str(tmp_path))


def test_restore_generator_merges_a_lora_run_into_its_base(tmp_path):
  from rewarddance_jax import checkpoint as ckpt_lib
  from rewarddance_jax.nn import lora as lora_lib
  cfg = _config()
  mesh, rules = common.setup_mesh(cfg)
  _, params, pshard, _ = common.build_generator(cfg, mesh, rules)
  base = jax.tree.map(lambda x: x + 0.01, params)      # a "trained" base, saved like a flow run
  with ckpt_lib.Checkpointer(str(tmp_path / 'base' / 'checkpoints'), async_save=False) as c:
    c.save(5, arrays={'params': base}, json={'config': {}}, force=True)
  lora = lora_lib.init_lora(base, rank=4, alpha=8.0, targets=LORA['targets'],
                            key=jax.random.key(1))
  lora = jax.tree.map(lambda x: x + 0.02, lora)       # both factors non-zero: a real delta
  run_cfg = {'init': {'generator': str(tmp_path / 'base'), 'use_ema': False},
             'grpo': {'lora': dict(LORA)}}
  with ckpt_lib.Checkpointer(str(tmp_path / 'run' / 'checkpoints'), async_save=False) as c:
    c.save(3, arrays={'params': lora}, json={'config': run_cfg}, force=True)
  got = common.restore_generator(str(tmp_path / 'run'), params, pshard)
  want = lora_lib.merge(base, lora, lora_lib.lora_scale(4, 8.0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
               got, want)
  changed = [not np.allclose(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(base))]
  assert any(changed)
  run_cfg['init']['generator'] = ''
  with ckpt_lib.Checkpointer(str(tmp_path / 'run2' / 'checkpoints'), async_save=False) as c:
    c.save(3, arrays={'params': lora}, json={'config': run_cfg}, force=True)
  with pytest.raises(ValueError, match='init.generator'):
    common.restore_generator(str(tmp_path / 'run2'), params, pshard)
