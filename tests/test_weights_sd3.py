"""SD3 / SD3.5: diffusers parity (dual attention, RMS q/k norm, context-pre-only last block,
cropped position table, non-square latent), export round trip, SD3.0 key map, SD3.5-medium size."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from rewarddance_jax.parallel.trees import count_params  # noqa: E402
from rewarddance_jax.models.sd3 import SD3Generator  # noqa: E402
from rewarddance_jax.parallel.sharding import DEFAULT_RULES  # noqa: E402
from rewarddance_jax.weights import sd3  # noqa: E402
from rewarddance_jax.weights.keymap import check_plan  # noqa: E402
from rewarddance_jax.weights.loader import fast_abstract_tracing  # noqa: E402
import weights_testlib as testlib  # noqa: E402
from weights_testlib import run_o0  # noqa: E402

B, H, W, C, L = 2, 8, 12, 4, 5


def test_sd35_matches_diffusers_and_round_trips(tmp_path):
  torch.manual_seed(0)
  ref = diffusers.SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=C, num_layers=3, attention_head_dim=8,
      num_attention_heads=3, joint_attention_dim=20, caption_projection_dim=24,
      pooled_projection_dim=18, out_channels=C, pos_embed_max_size=8, dual_attention_layers=(0,),
      qk_norm='rms_norm').eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      base = 1.0 if ('norm' in name and name.endswith('weight') and 'linear' not in name) else 0.0
      p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
  ref.save_pretrained(str(tmp_path / 'src'))

  mesh = testlib.mesh((1, 2, 1))
  graphdef, params, cfg = sd3.load(str(tmp_path / 'src'), mesh, DEFAULT_RULES)
  assert cfg.dual_attention_layers == (0,) and cfg.qk_norm and cfg.depth == 3

  rng = np.random.default_rng(0)
  x = rng.standard_normal((B, H, W, C)).astype(np.float32)
  txt = rng.standard_normal((B, L, 20)).astype(np.float32)
  pooled = rng.standard_normal((B, 18)).astype(np.float32)
  sigma = np.array([0.25, 0.9], np.float32)

  def ours(params, x, sigma, txt, pooled):
    return nnx.merge(graphdef, params)(x, sigma, {'txt': txt, 'pooled': pooled})

  with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
    out = np.asarray(run_o0(ours, params, *(jnp.asarray(a) for a in (x, sigma, txt, pooled))))
  with torch.no_grad():
    want = ref(hidden_states=torch.from_numpy(x).permute(0, 3, 1, 2),
               encoder_hidden_states=torch.from_numpy(txt),
               pooled_projections=torch.from_numpy(pooled),
               timestep=torch.from_numpy(sigma * 1000)).sample.permute(0, 2, 3, 1).numpy()
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(out, want, atol=1e-4, rtol=0)

  sd3.export(params, cfg, str(tmp_path / 'out'))
  a = load_file(str(tmp_path / 'src' / 'diffusion_pytorch_model.safetensors'))
  b = load_file(str(tmp_path / 'out' / 'diffusion_pytorch_model.safetensors'))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # diffusers reads the export with the source's config (sample_size 8 included) and outputs.
  back = diffusers.SD3Transformer2DModel.from_pretrained(str(tmp_path / 'out')).eval()
  plain = lambda c: json.loads(json.dumps({k: v for k, v in c.items() if not k.startswith('_')}))
  assert plain(back.config) == plain(ref.config) and back.config.sample_size == 8
  with torch.no_grad():
    again = back(hidden_states=torch.from_numpy(x).permute(0, 3, 1, 2),
                 encoder_hidden_states=torch.from_numpy(txt),
                 pooled_projections=torch.from_numpy(pooled),
                 timestep=torch.from_numpy(sigma * 1000)).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(again, want, atol=1e-4, rtol=0)


def _meta_shapes(model):
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _abstract_shapes(cfg):
  with nnx.use_eager_sharding(False), fast_abstract_tracing():
    state = nnx.state(nnx.eval_shape(lambda: SD3Generator(cfg, rngs=nnx.Rngs(0))))
  return {p: tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)}, count_params(state)


def test_sd35_medium_and_sd3_medium_key_maps_and_sizes():
  with torch.device('meta'):
    sd35 = diffusers.SD3Transformer2DModel(
        num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm='rms_norm')
    # SD3.0-style blocks (no q/k norm, no dual attention); the depth does not matter here.
    sd30 = diffusers.SD3Transformer2DModel(num_layers=3, num_attention_heads=24,
                                           caption_projection_dim=1536, pos_embed_max_size=192)
  counts = []
  for ref in (sd35, sd30):
    cfg = sd3.sd3_config(dict(ref.config))
    ours, count = _abstract_shapes(cfg)
    check_plan(sd3.rules(cfg), _meta_shapes(ref), ours)       # every key, every shape
    # diffusers holds the fixed position table as a buffer, we as a (non-Param) Buffer.
    n_buffer = cfg.pos_embed_max_size ** 2 * cfg.hidden
    assert count == sum(p.numel() for p in ref.parameters()) + n_buffer
    counts.append(count)
  assert counts[0] == 2_469_663_936        # SD3.5-medium, the published "2.5B" (table included)
