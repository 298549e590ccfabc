"""GRPO and R0 on SD3.5 with classifier-free guidance from public weights: a tiny diffusers
SD3Transformer2DModel + AutoencoderKL saved with save_pretrained, prompts and the negative prompt
pre-encoded as `launch.encode_prompts --negative_prompt` writes them, trained through
`configs/sd3/grpo_sd35_medium.py` (first-update ratio, exact resume) and R0 on the same data."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from configs.sd3 import grpo_sd35_medium  # noqa: E402
from rewarddance_jax import families, metrics as metrics_lib  # noqa: E402
from rewarddance_jax.parallel import mesh as mesh_lib  # noqa: E402
from rewarddance_jax.parallel import sharding as sharding_lib  # noqa: E402
from rewarddance_jax.rewards import registry  # noqa: E402
from rewarddance_jax.train import generate, grpo as grpo_trainer, prfl as prfl_trainer  # noqa: E402
from rewarddance_jax.train import r0 as r0_trainer, refl as refl_trainer  # noqa: E402
from rewarddance_jax.weights import text_pipeline  # noqa: E402
from test_train_flux import FIRST_RATIO_BOUND, _randomise, tiny_vae  # noqa: E402

C, L, TXT, POOLED = 4, 6, 20, 18
PROMPTS = ['a red fox in the snow', 'a lighthouse at dusk', 'two cups of tea']


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('sd3_pipeline')
  torch.manual_seed(0)
  sd3 = diffusers.SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=C, num_layers=2, attention_head_dim=8,
      num_attention_heads=3, joint_attention_dim=TXT, caption_projection_dim=24,
      pooled_projection_dim=POOLED, out_channels=C, pos_embed_max_size=8,
      dual_attention_layers=(0,), qk_norm='rms_norm').eval()
  _randomise(sd3, 1, 0.1)
  sd3.save_pretrained(str(root / 'transformer'))
  tiny_vae(str(root / 'vae'), C, 1.5305, 0.0609)

  def encoder(prompts):   # a stand-in for CLIP-L/G + T5: fixed random embeddings per text
    rng = [np.random.default_rng(sum(map(ord, p)) + 7) for p in prompts]
    return {'txt': np.stack([r.standard_normal((L, TXT)) for r in rng]).astype(np.float32),
            'pooled': np.stack([r.standard_normal(POOLED) for r in rng]).astype(np.float32),
            'mask': np.ones((len(prompts), L), bool)}

  text_pipeline.write_encoded(encoder, PROMPTS, str(root / 'prompts'), batch_size=2)
  text_pipeline.write_encoded(encoder, [''], str(root / 'prompts' / 'negative'), batch_size=1)
  return {'root': str(root), 'prompts': str(root / 'prompts')}


def _config(d, steps, **grpo):
  c = grpo_sd35_medium.get_config(f"src={d['root']},prompts={d['prompts']},steps={steps},"
                                  "lora=0,cfg=3.0")
  c.model.update(dtype='float32', remat='none')
  c.mesh.num_devices = 1
  c.data.update(batch_size=4, latent_shape=(8, 8, C))   # 2 prompts × G = 2
  c.grpo.update(group_size=2, num_steps=3, minibatches=2, clip_range=1e-2, kl_beta=0.0,
                selection=dict(kind='prefix', fraction=1.0), **grpo)
  c.optax.update(lr=1e-3, eps=1e-3)
  c.ckpt.update(every=2, async_save=False)
  return c


def _losses(workdir):
  return [m for m in metrics_lib.read_metrics(workdir) if 'loss' in m]


def test_grpo_trains_sd3_with_cfg_and_resumes_exactly(dirs, tmp_path):
  grpo_trainer.train(_config(dirs, 3), str(tmp_path / 'straight'))
  grpo_trainer.train(_config(dirs, 2), str(tmp_path / 'resumed'))
  grpo_trainer.train(_config(dirs, 3), str(tmp_path / 'resumed'))
  straight, resumed = _losses(str(tmp_path / 'straight')), _losses(str(tmp_path / 'resumed'))
  assert [m['step'] for m in straight] == [1, 2, 3]
  for m in straight:
    assert np.isfinite(m['loss']) and m['skipped'] == 0
    assert m['log_ratio_first_max_abs'] <= FIRST_RATIO_BOUND   # docs/exactness.md
    assert m['reward_std'] > 0.0
  assert m['grad_norm'] > 0.0 and m['log_ratio_max_abs'] > 0.0
  key = lambda ms: {m['step']: (m['loss'], m['reward_mean'], m['grad_norm']) for m in ms}
  assert key(resumed) == key(straight)


def _loaded(dirs):
  """(family, mesh, rules, graphdef, params) of the tiny SD3.5 on one device."""
  cfg = _config(dirs, 1)
  fam = families.from_config(cfg)
  mesh = mesh_lib.create_mesh(cfg.mesh, jax.devices()[:1])
  rules = sharding_lib.rules_from_config(cfg.sharding_rules)
  graphdef, params, _, _ = fam.load(mesh, rules, progress=False)
  return fam, mesh, rules, graphdef, params


def test_cfg_velocity_is_the_guided_combination_of_two_calls(dirs):
  fam, mesh, rules, graphdef, params = _loaded(dirs)
  rng = np.random.default_rng(0)
  cond = {'txt': rng.standard_normal((2, L, TXT)).astype(np.float32),
          'pooled': rng.standard_normal((2, POOLED)).astype(np.float32),
          'mask': np.ones((2, L), bool)}
  both = fam.with_negative(cond)
  assert sorted(both) == ['mask', 'neg_mask', 'neg_pooled', 'neg_txt', 'pooled', 'txt']
  x = jnp.asarray(rng.standard_normal((2, 8, 8, C)), jnp.float32)
  sigma = jnp.array([0.7, 0.3], jnp.float32)
  got = fam.velocity(graphdef)(params, x, sigma, jax.tree.map(jnp.asarray, both))
  model = jax.jit(lambda p, x, s, c: nnx.merge(graphdef, p)(x, s, c))
  v_c = model(params, x, sigma, jax.tree.map(jnp.asarray, cond))
  v_u = model(params, x, sigma, {k[4:]: jnp.asarray(v) for k, v in both.items()
                                 if k.startswith('neg_')})
  np.testing.assert_allclose(got, v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)
  assert float(jnp.max(jnp.abs(v_c - v_u))) > 1e-3   # the negative prompt matters


@pytest.mark.slow  # R0's family path runs on FLUX in the default suite (test_train_flux.py)
def test_r0_trains_sd3_with_cfg(dirs, tmp_path):
  c = _config(dirs, 2)
  c.trainer = 'r0'
  c.r0 = dict(num_steps=2, schedule='shift', shift=3.0, eta_max=1.0, l2_weight=1e-2,
              norm_eps=1e-8, reward_cap=0.0, plus=False, remat=False, ema_decay=0.0)
  del c['grpo']
  c.data.batch_size = 2
  r0_trainer.train(c, str(tmp_path))
  ms = _losses(str(tmp_path))
  assert [m['step'] for m in ms] == [1, 2]
  assert all(np.isfinite(m['loss']) and m['skipped'] == 0 and m['grad_norm'] > 0 for m in ms)
  assert ms[1]['l2'] > 0.0


def _feedback_config(d, trainer, steps):
  c = _config(d, steps)
  del c['grpo']
  c.trainer = trainer
  c.data.batch_size = 2
  c.ckpt.every = 1
  if trainer == 'refl':
    c.refl = dict(num_steps=3, schedule='shift', shift=3.0, late_fraction=0.7, loss='linear',
                  scale=1.0, target=2.0, fm_weight=0.0, ema_decay=0.0)
  else:
    c.prfl = dict(schedule='shift', num_steps=3, shift=3.0, scale=1.0, fm_weight=0.0)
  return c


# Slow (the cold suite's 10-minute budget): GRPO on SD3.5 covers the CFG family path by default.
@pytest.mark.slow
@pytest.mark.parametrize('trainer', ['refl', 'prfl'])
def test_reward_feedback_trains_sd3_with_cfg_and_resumes_exactly(dirs, tmp_path, trainer):
  module = {'refl': refl_trainer, 'prfl': prfl_trainer}[trainer]
  module.train(_feedback_config(dirs, trainer, 2), str(tmp_path / 'straight'))
  module.train(_feedback_config(dirs, trainer, 1), str(tmp_path / 'resumed'))
  module.train(_feedback_config(dirs, trainer, 2), str(tmp_path / 'resumed'))
  straight, resumed = _losses(str(tmp_path / 'straight')), _losses(str(tmp_path / 'resumed'))
  assert [m['step'] for m in straight] == [1, 2]
  assert all(np.isfinite(m['loss']) and m['skipped'] == 0 and m['grad_norm'] > 0
             for m in straight)
  key = lambda ms: {m['step']: (m['loss'], m['reward_mean'], m['grad_norm']) for m in ms}
  assert key(resumed) == key(straight)


def test_fm_weight_without_real_images_is_one_clear_error(dirs, tmp_path):
  c = _feedback_config(dirs, 'prfl', 1)
  c.prfl.fm_weight = 1.0
  with pytest.raises(ValueError, match='prfl.fm_weight > 0 trains on real images'):
    prfl_trainer.train(c, str(tmp_path))


def test_sampling_and_best_of_n_search_on_sd3_with_cfg(dirs):
  fam, mesh, rules, graphdef, params = _loaded(dirs)
  codec = fam.codec(mesh, rules)
  sampler = ml_collections.ConfigDict(dict(kind='ode', schedule='shift', num_steps=3, shift=3.0))
  kw = dict(prompts_dir=dirs['prompts'], count=2, key=jax.random.key(0))
  images, ids, prompts, calls = generate.sample_family(fam, graphdef, params, codec, sampler, **kw)
  assert images.shape == (2, 16, 16, 3) and list(ids) == [0, 1] and calls == 3
  assert prompts == PROMPTS[:2] and 0.0 <= images.min() and images.max() <= 1.0
  verifier = registry.build_rewards({'mean_intensity': {}})
  best, _, _, calls = generate.sample_family(fam, graphdef, params, codec, sampler,
                                             search_method='bon', verifier=verifier, n=3, **kw)
  assert calls == 3 * 3 and best.shape == images.shape   # the pick itself: test_generate_search
