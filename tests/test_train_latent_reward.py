"""Latent reward trainer: sharded step == one device, only LoRA + head train, pairs, load_reward,
exact resume."""

import jax
import ml_collections
import numpy as np
import pytest

from configs.digits import reward_process
from rewarddance_jax.data import pairs as pairs_lib
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.rewards import latent as latent_lib
from rewarddance_jax.train import common, latent_reward



def _config():
  # The PAVRM on one double block: the smallest step that still runs backbone + LoRA + head.
  c = reward_process.get_config('runlocal')
  c.reward.num_blocks, c.reward.layers = 1, (1,)
  c.reward.lora_targets = r'.*img_attn/qkv/kernel'
  c.optax.eps = 1e-3          # see tests/test_train_flow.py: keeps Adam's first step off sign noise
  c.optax.warmup_steps = 0
  c.mesh.num_devices = 1
  return c


def _batch():
  tok = tokenizer_lib.build_digits_tokenizer()
  return pairs_lib.DigitPairs(8, split='train', seed=0, tokenizer=tok, max_len=8).batch(3)


def _mesh(ici, devices):
  return mesh_lib.create_mesh(ml_collections.ConfigDict(
      dict(axes=('data', 'fsdp', 'tensor'), ici=ici)), devices)


def _step(config, parts, state, shardings, mesh, rules):
  backbone, head_gd, tx = parts
  batch = sharding_lib.host_to_global(_batch(), mesh, rules)
  step = latent_reward.make_train_step(config, backbone, head_gd, tx)
  with common.mesh_context(mesh, rules):
    # The loop's own jit (donated state): the trainer test below reuses this compilation.
    new, metrics = jax.jit(step, in_shardings=(shardings, None, None),
                           out_shardings=(shardings, None), donate_argnums=(0,))(
                               state, batch, jax.random.key(3))
  return new, jax.device_get(metrics)


def test_sharded_step_equals_single_device_and_only_lora_and_head_train():
  cfg = _config()
  rules = sharding_lib.rules_from_config(cfg.sharding_rules)
  mesh1, mesh8 = _mesh((1, 1, 1), jax.devices()[:1]), _mesh((2, 2, 2), jax.devices())
  backbone, head_gd, state, shard1, tx = latent_reward.build_state(cfg, mesh1, rules)
  s0 = jax.device_get(state)
  # The same initial state laid out on the 8-device mesh by the same logical rules.
  shard8 = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh8, s.spec), shard1)
  state8 = jax.device_put(s0, shard8)
  r1, m1 = _step(cfg, (backbone, head_gd, tx), state, shard1, mesh1, rules)
  live, m = _step(cfg, (backbone, head_gd, tx), state8, shard8, mesh8, rules)
  s1, r1 = jax.device_get(live), jax.device_get(r1)
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
  q = live['params']['lora']['transformer']['double_blocks'][0]['img_attn']['qkv']['kernel']
  assert q['a'].sharding.spec == jax.sharding.PartitionSpec('fsdp', None)   # follows the base
  assert q['b'].sharding.spec == jax.sharding.PartitionSpec(None, 'tensor')
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
  # 'prompt' pairs differ in content; 'clean' pairs are the same digit, degraded.
  diff = np.abs(first['chosen'] - first['rejected']).mean(axis=(1, 2, 3))
  assert np.all(diff > 0)
  for c, r in zip(first['chosen'][first['kind'] == 1], first['rejected'][first['kind'] == 1]):
    assert np.corrcoef(c.ravel(), r.ravel())[0, 1] > 0.5
  with pytest.raises(ValueError, match='kinds'):
    pairs_lib.DigitPairs(4, split='train', seed=0, tokenizer=tok, max_len=8, kinds=('blurry',))


def test_train_then_load_reward_and_resume(tmp_path):
  cfg = _config()
  cfg.total_steps = 2
  cfg.eval.every = 2
  cfg.eval.sigmas = (0.5,)
  cfg.ckpt.async_save = False
  cfg.ckpt.every = 2
  cfg.log_every = 1
  workdir = str(tmp_path / 'pavrm')
  latent_reward.train(cfg, workdir)
  table = __import__('json').load(open(f'{workdir}/eval/accuracy_2.json'))
  assert set(table) == {'0.5'} and 0.0 <= table['0.5']['all'] <= 1.0
  reward = latent_lib.load_reward(workdir)                       # σ(r_φ), PRFL's reward
  assert reward.inputs == 'noisy_latents' and set(reward.params) == {'base', 'lora', 'head'}
  batch = _batch()
  out = jax.jit(lambda r, x, t, m: r({'noisy_latents': x, 'sigma': np.full(8, 0.3, np.float32)},
                                     {'tokens': t, 'mask': m}))(
                                         reward, batch['chosen'], batch['tokens'], batch['mask'])
  assert out.shape == (8,) and np.all((out > 0) & (out < 1))
  # Resume the 2-step run to 3 steps: the metrics equal an uninterrupted 3-step run's bitwise.
  cfg.total_steps = 3
  latent_reward.train(cfg, workdir)
  latent_reward.train(cfg, str(tmp_path / 'straight'))
  from rewarddance_jax import metrics as metrics_lib
  key = lambda d: {m['step']: (m['loss'], m['acc']) for m in metrics_lib.read_metrics(d)
                   if 'loss' in m}
  resumed, straight = key(workdir), key(str(tmp_path / 'straight'))
  assert sorted(resumed) == [1, 2, 3] and resumed == straight


def test_jsonl_pairs(tmp_path):
  rng = np.random.default_rng(0)
  rows = []
  for i in range(3):
    for side in ('c', 'r'):
      np.save(tmp_path / f'{side}{i}.npy', rng.normal(size=(16, 16, 1)).astype(np.float32))
    rows.append({'prompt': f'a handwritten digit {["one", "two", "three"][i]}',
                 'chosen': f'c{i}.npy', 'rejected': f'r{i}.npy', 'kind': i % 2})
  path = tmp_path / 'pairs.jsonl'
  path.write_text('\n'.join(__import__('json').dumps(r) for r in rows) + '\n')
  tok = tokenizer_lib.build_digits_tokenizer()
  it = pairs_lib.JsonlPairs(str(path), 2, tokenizer=tok, max_len=8, seed=1)
  batches = [next(it) for _ in range(3)]   # 6 rows = two epochs of 3, each a permutation
  firsts = np.concatenate([b['chosen'] for b in batches])
  seen = {float(x[0, 0, 0]) for x in firsts[:3]}
  assert len(seen) == 3 and batches[0]['tokens'].shape == (2, 8)
  it2 = pairs_lib.JsonlPairs(str(path), 2, tokenizer=tok, max_len=8, seed=1)
  it2.set_state({'step': 2})
  np.testing.assert_array_equal(next(it2)['rejected'], batches[2]['rejected'])
  (tmp_path / 'bad.jsonl').write_text('{"prompt": "x", "chosen": "c0.npy"}\n')
  with pytest.raises(ValueError, match='rejected'):
    pairs_lib.JsonlPairs(str(tmp_path / 'bad.jsonl'), 2, tokenizer=tok, max_len=8)
