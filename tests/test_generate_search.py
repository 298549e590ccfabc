"""search_digits: best-of-N and Search over Paths on the digit prompts with a verifier."""

import jax
import numpy as np
import pytest

from configs.digits import flow as flow_config
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.flow import rollout as rollout_lib
from rewarddance_jax.families.base import Guidance, guided_velocity
from rewarddance_jax.train import common, generate



@pytest.fixture(scope='module')
def tiny():
  cfg = flow_config.get_config('runlocal')
  cfg.mesh.num_devices = 1
  mesh, rules = common.setup_mesh(cfg)
  graphdef, params, _, _ = common.build_generator(cfg, mesh, rules)
  # A random final layer, so the velocity (and the images) depend on the noise and the prompt.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                        params)
  return cfg, graphdef, params, tokenizer_lib.build_digits_tokenizer()


def _brightness(images, labels):
  del labels
  return np.asarray(images).reshape(len(images), -1).mean(axis=1)


def test_best_of_n_picks_the_best_of_its_candidates(tiny):
  cfg, graphdef, params, tok = tiny
  key = jax.random.key(0)
  images, labels, prompts, calls = generate.search_digits(
      graphdef, params, tok, cfg.sampler, _brightness, per_class=1, max_len=8, key=key,
      method='bon', n=3)
  assert images.shape == (10, 16, 16, 1) and list(labels) == list(range(10))
  assert calls == 3 * cfg.sampler.num_steps
  # Re-sample the 30 candidates: each pick is its prompt's brightest.
  tokens, mask = tokenizer_lib.encode_prompts(tok, prompts, 8)
  x = rollout_lib.initial_noise(key, (30, 16, 16, 1))
  cond = {'tokens': np.repeat(tokens, 3, 0), 'mask': np.repeat(mask, 3, 0)}
  cands = np.asarray(generate.to_unit(rollout_lib.sample_ode(
      lambda x_, s: guided_velocity(graphdef, Guidance())(params, x_, s, cond), x, generate.sampler_sigmas(cfg.sampler))))
  best = _brightness(cands, None).reshape(10, 3).max(axis=1)
  np.testing.assert_allclose(_brightness(images, None), best, rtol=1e-5)


def test_search_over_paths_counts_calls_and_beats_plain_sampling(tiny):
  cfg, graphdef, params, tok = tiny
  images, _, _, calls = generate.search_digits(
      graphdef, params, tok, cfg.sampler, _brightness, per_class=1, max_len=8,
      key=jax.random.key(0), method='sop', n=2, m=2)
  steps = cfg.sampler.num_steps
  assert calls > 2 * steps          # the re-noise/resolve rounds cost extra calls
  plain = generate.search_digits(graphdef, params, tok, cfg.sampler, _brightness, per_class=1,
                                 max_len=8, key=jax.random.key(0), method='bon', n=1)[0]
  assert _brightness(images, None).mean() > _brightness(plain, None).mean()
  with pytest.raises(ValueError, match='not one of'):
    generate.search_digits(graphdef, params, tok, cfg.sampler, _brightness, per_class=1,
                           max_len=8, key=jax.random.key(0), method='beam')


def test_judge_hook_scores_with_rewards_that_read_the_prompt_tokens(tiny, tmp_path):
  # Latent rewards run the generator's blocks on the prompt tokens; the hook must pass them.
  import jax.numpy as jnp
  from rewarddance_jax.rewards import base
  cfg, graphdef, params, tok = tiny
  cfg = cfg.copy_and_resolve_references()
  cfg.samples.update(every=1, per_class=1)

  def fn(p, samples, batch, key):   # r = the mean token id of the row's prompt
    del p, samples, key
    return jnp.mean(batch['tokens'].astype(jnp.float32) * batch['mask'], axis=1)

  rewards = base.WeightedRewards([(base.Reward(name='tok', fn=fn, inputs='pixels',
                                               differentiable=False), 1.0)])
  (every, hook), = generate.judge_hooks(cfg, graphdef, tok, str(tmp_path), (16, 16, 1), rewards)
  out = hook({'params': params}, 1)
  tokens, mask = tokenizer_lib.encode_prompts(tok, generate.digit_prompts(1)[0],
                                              int(cfg.data.max_text_len))
  assert every == 1
  np.testing.assert_allclose(out['sample_reward'], np.mean(tokens * mask), rtol=1e-6)


def test_one_compiled_sampler_serves_every_checkpoint_of_a_model(tiny):
  cfg, graphdef, params, tok = tiny
  sample = generate.make_sampler(graphdef, cfg.sampler, (16, 16, 1))
  same = cfg.sampler.copy_and_resolve_references()
  assert generate.make_sampler(graphdef, same, (16, 16, 1)) is sample
  other = cfg.sampler.copy_and_resolve_references()
  other.num_steps = int(cfg.sampler.num_steps) + 1
  assert generate.make_sampler(graphdef, other, (16, 16, 1)) is not sample
  # Params are an argument: two param trees through the one sampler give their own images.
  tokens, mask = tokenizer_lib.encode_prompts(tok, ['a 3', 'a 7'], 8)
  shifted = jax.tree.map(lambda p: p * 0.5, params)
  a = sample(params, tokens, mask, jax.random.key(0))
  compiled = sample._cache_size()  # other tests of the process may have used it with other shapes
  b = sample(shifted, tokens, mask, jax.random.key(0))
  assert not np.allclose(a, b)
  assert sample._cache_size() == compiled
