"""Latent reward trainer: sharded step == single device, only LoRA + head train, pairs, load_reward."""

import jax
import ml_collections
import numpy as np
import pytest

from configs.digits import reward_process
from rewarddance_jax.data import pairs as pairs_lib
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.train import common, latent_reward


@pytest.fixture(autouse=True)
def _fast_compiles():
  # The XLA CPU optimisation passes dominate these tests' compile time; the math is unchanged.
  old = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', old)


def _config():
  # The PAVRM on one double block: the smallest step that still runs backbone + LoRA + head.
  c = reward_process.get_config('runlocal')
  c.reward.num_blocks, c.reward.layers = 1, (1,)
  c.optax.eps = 1e-3          # see tests/test_train_flow.py: keeps Adam's first step off sign noise
  c.optax.warmup_steps = 0
  c.mesh.num_devices = 1
  return c


def _batch():
  tok = tokenizer_lib.build_digits_tokenizer()
  return pairs_lib.DigitPairs(8, split='train', seed=0, tokenizer=tok, max_len=8).batch(3)


def _one_step(config, devices):
  mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(
      dict(axes=('data', 'fsdp', 'tensor'), ici=config.mesh.ici)), devices)
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  backbone, head_gd, state, shardings, tx = latent_reward.build_state(config, mesh, rules)
  batch = sharding_lib.host_to_global(_batch(), mesh, rules)
  step = latent_reward.make_train_step(config, backbone, head_gd, tx)
  with common.mesh_context(mesh, rules):
    before = jax.device_get(state)
    # The loop's own jit (donated state): the trainer test below reuses this compilation.
    new, metrics = jax.jit(step, in_shardings=(shardings, None, None),
                           out_shardings=(shardings, None), donate_argnums=(0,))(
                               state, batch, jax.random.key(3))
  return before, jax.device_get(new), jax.device_get(metrics), new


def test_sharded_step_equals_single_device_and_only_lora_and_head_train():
  cfg = _config()
  cfg.mesh.ici = (2, 2, 2)
  s0, s1, m, live = _one_step(cfg, jax.devices())
  cfg.mesh.ici = (1, 1, 1)
  r0, r1, m1, _ = _one_step(cfg, jax.devices()[:1])
  jax.tree.map(np.testing.assert_array_equal, s0, r0)            # same init on any mesh
  np.testing.assert_allclose(m['loss'], m1['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               s1['params'], r1['params'])
  assert set(s1['params']) == {'lora', 'head'}                   # the only trainable trees
  jax.tree.map(np.testing.assert_array_equal, s1['base'], s0['base'])   # frozen
  moved = lambda t: max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(s1['params'][t]), jax.tree.leaves(s0['params'][t])))
  assert moved('lora') > 1e-4 and moved('head') > 1e-4
  # Optimizer state covers exactly the LoRA and the head.
  n_opt = sum(int(np.size(x)) for x in jax.tree.leaves(live['opt_state']))
  n_train = sum(int(np.size(x)) for x in jax.tree.leaves(live['params']))
  assert 2 * n_train <= n_opt <= 2 * n_train + 16
  q = live['params']['lora']['transformer']['double_blocks'][0]['img_attn']['q']['kernel']
  assert q['a'].sharding.spec == jax.sharding.PartitionSpec('fsdp', None)
  assert 'single_blocks' not in live['base']['transformer']          # cut to the first block
  for k in ('acc', 'acc_prompt', 'acc_clean', 'acc_sigma_0.0_0.2'):
    assert 0.0 <= float(m[k]) <= 1.0


def test_digit_pairs_resume_and_kinds():
  tok = tokenizer_lib.build_digits_tokenizer()
  it = pairs_lib.DigitPairs(16, split='heldout', seed=5, tokenizer=tok, max_len=8)
  first, second = next(it), next(it)
  it2 = pairs_lib.DigitPairs(16, split='heldout', seed=5, tokenizer=tok, max_len=8)
  it2.set_state(it.get_state())
  it.set_state({'step': 1})
  np.testing.assert_array_equal(next(it)['chosen'], second['chosen'])
  assert first['chosen'].shape == (16, 16, 16, 1) and first['chosen'].min() >= -1.0
  assert set(np.unique(first['kind'])) <= {0, 1}
  clean = first['kind'] == 1
  # 'prompt' pairs differ in content; 'clean' pairs are the same digit, degraded.
  diff = np.abs(first['chosen'] - first['rejected']).mean(axis=(1, 2, 3))
  assert np.all(diff > 0)
  with pytest.raises(ValueError, match='kinds'):
    pairs_lib.DigitPairs(4, split='train', seed=0, tokenizer=tok, max_len=8, kinds=('blurry',))
  del clean


def test_train_then_load_reward(tmp_path):
  cfg = _config()
  cfg.total_steps = 2
  cfg.eval.every = 2
  cfg.eval.sigmas = (0.5,)
  cfg.ckpt.async_save = False
  workdir = str(tmp_path / 'pavrm')
  latent_reward.train(cfg, workdir)
  table = __import__('json').load(open(f'{workdir}/eval/accuracy_2.json'))
  assert set(table) == {'0.5'} and 0.0 <= table['0.5']['all'] <= 1.0
  reward = latent_reward.load_reward(workdir, output='logit')
  assert reward.inputs == 'noisy_latents' and set(reward.params) == {'base', 'lora', 'head'}
  batch = _batch()
  out = reward({'noisy_latents': batch['chosen'], 'sigma': np.full(8, 0.3, np.float32)},
               {'tokens': batch['tokens'], 'mask': batch['mask']})
  assert out.shape == (8,) and np.all(np.isfinite(out))
