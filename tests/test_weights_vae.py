"""VAE: encode / decode parity with a tiny random diffusers AutoencoderKL, export identity, and
the export loads back into diffusers with the same config and outputs."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from rewarddance_jax.parallel.sharding import DEFAULT_RULES  # noqa: E402
from rewarddance_jax.weights import vae as vae_weights  # noqa: E402
import weights_testlib as testlib  # noqa: E402
from weights_testlib import run_o0  # noqa: E402


def _tiny_vae(path, **kw):
  """A random tiny diffusers AutoencoderKL saved to `path` (`kw` overrides its config)."""
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(**{**dict(
      in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
      down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
      layers_per_block=1, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
      use_quant_conv=True, use_post_quant_conv=False), **kw}).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      base = 1.0 if 'norm' in name and name.endswith('weight') else 0.0
      p.copy_(base + 0.15 * torch.randn(p.shape, generator=g))
  ref.save_pretrained(str(path))
  return ref


def test_vae_matches_diffusers(tmp_path):
  ref = _tiny_vae(tmp_path)

  mesh = testlib.mesh()
  graphdef, params, cfg = vae_weights.load(str(tmp_path), mesh, DEFAULT_RULES)
  assert (cfg.latent_channels, cfg.scaling_factor, cfg.shift_factor) == (16, 0.3611, 0.1159)

  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)      # non-square image
  z = rng.standard_normal((2, 8, 12, 16)).astype(np.float32)

  def ours(params, x, z):
    model = nnx.merge(graphdef, params)
    mean, logvar = model.encode(x)
    return mean, logvar, model.decode_latents((z - 0.1159) * 0.3611), model.encode_latents(x)

  with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
    mean, logvar, dec, lat = (np.asarray(a) for a in run_o0(ours, params, x, z))

  to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
  from_t = lambda t: t.detach().permute(0, 2, 3, 1).numpy()
  with torch.no_grad():
    post = ref.encode(to_t(x)).latent_dist
    ref_dec = from_t(ref.decode(to_t(z)).sample)

  assert np.abs(from_t(post.mean)).max() > 0.1 and np.abs(ref_dec).max() > 0.1
  np.testing.assert_allclose(mean, from_t(post.mean), atol=1e-3, rtol=0)
  np.testing.assert_allclose(logvar, from_t(post.logvar), atol=1e-3, rtol=0)
  np.testing.assert_allclose(lat, (from_t(post.mean) - 0.1159) * 0.3611, atol=1e-3, rtol=0)
  np.testing.assert_allclose(dec, ref_dec, atol=1e-3, rtol=0)
  # The key map runs backwards too: export reproduces the diffusers tensors exactly.
  exported = dict(vae_weights.loader.export_tensors(params, vae_weights.rules(cfg)))
  state = ref.state_dict()
  assert sorted(exported) == sorted(state)
  for k, v in exported.items():
    np.testing.assert_array_equal(v, state[k].numpy(), err_msg=k)


def test_vae_export_loads_in_diffusers(tmp_path):
  """export writes config.json: diffusers `from_pretrained` reads the export with the source's
  config and gives the source's outputs."""
  ref = _tiny_vae(tmp_path / 'src', layers_per_block=2, use_quant_conv=False,
                  use_post_quant_conv=True, mid_block_add_attention=False, sample_size=64,
                  force_upcast=False, shift_factor=0.0)
  _, params, cfg = vae_weights.load(str(tmp_path / 'src'), testlib.mesh(), DEFAULT_RULES)
  vae_weights.export(params, cfg, str(tmp_path / 'out'))
  back = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / 'out')).eval()
  plain = lambda c: json.loads(json.dumps({k: v for k, v in c.items() if not k.startswith('_')}))
  assert plain(back.config) == plain(ref.config)

  x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32))
  outs = []
  with torch.no_grad():
    for model in (back, ref):
      post = model.encode(x).latent_dist
      outs.append([t.numpy() for t in (post.mean, post.logvar, model.decode(post.mean).sample)])
  for a, b in zip(*outs):
    assert np.abs(b).max() > 0.1
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
