"""GRPO and R0 on FLUX from public weights: a tiny diffusers FLUX transformer + VAE and a tiny
transformers InternVL (the P("yes") reward, used as it is) saved with save_pretrained, prompts
pre-encoded as `launch.encode_prompts` writes them, trained through
`configs/flux/grpo_flux_dev.py` (exact first-update ratio, exact resume), the VAE decode of the
step against diffusers, and the VLM reward's prompt table read from the encoded prompts."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from configs.flux import grpo_flux_dev, r0_flux_dev  # noqa: E402
from rewarddance_jax import families, metrics as metrics_lib  # noqa: E402
from rewarddance_jax.parallel import mesh as mesh_lib  # noqa: E402
from rewarddance_jax.parallel import sharding as sharding_lib  # noqa: E402
from rewarddance_jax.rewards import registry  # noqa: E402
from rewarddance_jax.train import grpo as grpo_trainer, r0 as r0_trainer  # noqa: E402
from rewarddance_jax.weights import text_pipeline  # noqa: E402
from test_vlm_parity import _hf_model, _save_tokenizer  # noqa: E402


C, L, TXT, POOLED = 4, 5, 24, 20      # latent channels, T5 tokens, T5 width, CLIP pooled width
PROMPTS = ['a red fox in the snow', 'a lighthouse at dusk', 'two cups of tea']
# |log ρ| of the first minibatch in float32: half an ulp of msq/(2σ²) (< 4) plus an ulp of each of
# the two sums after it (< 2), docs/exactness.md; measured 0 or 2^-23 here.
FIRST_RATIO_BOUND = 2.0 ** -22 + 2.0 ** -23


def _randomise(model, seed, scale):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if ('norm' in name and name.endswith('weight')) else 0.0
      p.copy_(base + scale * torch.randn(p.shape, generator=g))


def tiny_vae(path: str, channels: int, scaling: float, shift: float):
  """A small random diffusers AutoencoderKL saved at `path` (8× downsampling, 3 colours)."""
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=(8, 8),
      down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
      layers_per_block=1, norm_num_groups=4, scaling_factor=scaling, shift_factor=shift,
      use_quant_conv=False, use_post_quant_conv=False).eval()
  _randomise(vae, 2, 0.15)
  vae.save_pretrained(path)
  return vae


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('flux_pipeline')
  torch.manual_seed(0)
  flux = diffusers.FluxTransformer2DModel(
      patch_size=1, in_channels=4 * C, num_layers=1, num_single_layers=1, attention_head_dim=16,
      num_attention_heads=2, joint_attention_dim=TXT, pooled_projection_dim=POOLED,
      guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
  _randomise(flux, 1, 0.1)
  flux.save_pretrained(str(root / 'transformer'))
  vae = tiny_vae(str(root / 'vae'), C, 0.3611, 0.1159)

  def encoder(prompts):   # a stand-in for T5/CLIP: fixed random embeddings per prompt text
    rng = [np.random.default_rng(sum(map(ord, p))) for p in prompts]
    return {'txt': np.stack([r.standard_normal((L, TXT)) for r in rng]).astype(np.float32),
            'pooled': np.stack([r.standard_normal(POOLED) for r in rng]).astype(np.float32),
            'mask': np.ones((len(prompts), L), bool)}

  enc = root / 'prompts'
  text_pipeline.write_encoded(encoder, PROMPTS, str(enc), batch_size=2)
  vlm = root / 'internvl'
  _hf_model(tie=False).save_pretrained(str(vlm))
  _save_tokenizer(str(vlm))
  return {'root': str(root), 'prompts': str(enc), 'vae': vae, 'vlm': str(vlm)}


def _config(d, steps):
  c = grpo_flux_dev.get_config(f"src={d['root']},prompts={d['prompts']},reward=vlm_yes,"
                               f"reward_path={d['vlm']},steps={steps}")
  c.model.update(dtype='float32', param_dtype='float32', scan_layers=True, remat='none')
  c.mesh.num_devices = 1
  c.data.update(batch_size=4, latent_shape=(8, 8, C))   # 2 prompts × G = 2
  c.grpo.update(group_size=2, num_steps=3, minibatches=2, clip_range=1e-2,
                selection=dict(kind='prefix', fraction=1.0))
  c.optax.update(lr=1e-3, eps=1e-3)
  c.ckpt.update(every=2, async_save=False)
  return c


def test_grpo_trains_flux_from_diffusers_weights_and_resumes_exactly(dirs, tmp_path):
  grpo_trainer.train(_config(dirs, 3), str(tmp_path / 'straight'))
  grpo_trainer.train(_config(dirs, 2), str(tmp_path / 'resumed'))
  grpo_trainer.train(_config(dirs, 3), str(tmp_path / 'resumed'))
  straight = [m for m in metrics_lib.read_metrics(str(tmp_path / 'straight')) if 'loss' in m]
  resumed = [m for m in metrics_lib.read_metrics(str(tmp_path / 'resumed')) if 'loss' in m]
  assert [m['step'] for m in straight] == [1, 2, 3]
  for m in straight:
    assert np.isfinite(m['loss']) and m['skipped'] == 0
    # The first minibatch is on-policy: ρ = 1 up to the bound of docs/exactness.md (the two
    # programs' fusions may contract the log-prob's last product into its sum differently).
    assert m['log_ratio_first_max_abs'] <= FIRST_RATIO_BOUND
    assert 0.0 < m['reward_mean'] < 1.0 and m['reward_std'] > 0.0
  assert m['grad_norm'] > 0.0 and m['log_ratio_max_abs'] > 0.0   # the second minibatch moved
  key = lambda ms: {m['step']: (m['loss'], m['reward_mean'], m['grad_norm']) for m in ms}
  assert key(resumed) == key(straight)


def test_r0_trains_flux_through_the_vae_and_the_internvl_reward(dirs, tmp_path):
  c = r0_flux_dev.get_config(f"src={dirs['root']},prompts={dirs['prompts']},"
                             f"reward_path={dirs['vlm']},steps=2,lr=1e-3")
  c.model.update(dtype='float32', param_dtype='float32', scan_layers=True, remat='none')
  c.mesh.num_devices = 1
  c.data.update(batch_size=2, latent_shape=(8, 8, C))
  c.r0.num_steps = 2
  c.ckpt.update(every=2, async_save=False)
  r0_trainer.train(c, str(tmp_path))
  ms = [m for m in metrics_lib.read_metrics(str(tmp_path)) if 'loss' in m]
  assert [m['step'] for m in ms] == [1, 2]
  for m in ms:
    assert np.isfinite(m['loss']) and m['skipped'] == 0 and m['grad_norm'] > 0
    assert 0.0 < m['reward_mean'] < 1.0
  assert ms[1]['l2'] > 0.0        # the generator moved away from θ0


def test_step_decode_matches_diffusers_vae(dirs):
  cfg = _config(dirs, 1)
  mesh = mesh_lib.create_mesh(cfg.mesh, jax.devices()[:1])
  rules = sharding_lib.rules_from_config(cfg.sharding_rules)
  codec = families.from_config(cfg).codec(mesh, rules)
  z = np.random.default_rng(0).standard_normal((2, 8, 8, C)).astype(np.float32)
  ours = np.asarray(jax.jit(codec.decode)(jnp.asarray(z), codec.params))
  vae = dirs['vae']
  with torch.no_grad():
    lat = torch.from_numpy(z).permute(0, 3, 1, 2) / vae.config.scaling_factor
    ref = vae.decode(lat + vae.config.shift_factor).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, np.clip((ref + 1) / 2, 0, 1), atol=1e-4)
  assert ours.shape == (2, 16, 16, 3)


def test_vlm_prompt_table_reads_the_encoded_prompts_in_id_order(dirs, tmp_path):
  assert registry.prompt_table(dirs['prompts']) == PROMPTS
  assert registry.prompt_table('') is None
  with pytest.raises(FileNotFoundError, match='prompts.jsonl'):
    registry.prompt_table(str(tmp_path))
  with open(os.path.join(dirs['prompts'], 'prompts.jsonl')) as f:
    assert [json.loads(l)['index'] for l in f] == [0, 1, 2]
