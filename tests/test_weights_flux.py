"""FLUX weights: diffusers parity (guidance on/off, scanned/unscanned, sharded), export round trip,
one error naming every bad key, and the flux-dev parameter count."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from rewarddance_jax.models.generator import Generator, generator_config  # noqa: E402
from rewarddance_jax.parallel.trees import count_params  # noqa: E402
from rewarddance_jax.models.presets import model_preset  # noqa: E402
from rewarddance_jax.parallel.sharding import DEFAULT_RULES  # noqa: E402
from rewarddance_jax.weights import flux  # noqa: E402
from rewarddance_jax.weights.keymap import WeightsMismatchError  # noqa: E402
from rewarddance_jax.weights.loader import fast_abstract_tracing  # noqa: E402
from weights_testlib import O0, mesh as _mesh  # noqa: E402

B, H, W, C, L = 4, 8, 6, 4, 5     # non-square latent: 4×3 tokens of 2×2 patches


def _randomise_torch(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if ('norm' in name and p.ndim == 1 and 'linear' not in name) else 0.0
      p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))


def _save_tiny(tmp_path_factory, guidance: bool) -> str:
  torch.manual_seed(0)
  model = diffusers.FluxTransformer2DModel(
      patch_size=1, in_channels=4 * C, num_layers=2, num_single_layers=2, attention_head_dim=16,
      num_attention_heads=3, joint_attention_dim=24, pooled_projection_dim=20,
      guidance_embeds=guidance, axes_dims_rope=(4, 6, 6)).eval()
  _randomise_torch(model, 1 + guidance)
  path = str(tmp_path_factory.mktemp(f'flux_g{int(guidance)}'))
  model.save_pretrained(path)
  return path


@pytest.fixture(scope='module')
def tiny_dirs(tmp_path_factory):
  return {g: _save_tiny(tmp_path_factory, g) for g in (False, True)}


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return dict(x=rng.standard_normal((B, H, W, C)).astype(np.float32),
              txt=rng.standard_normal((B, L, 24)).astype(np.float32),
              pooled=rng.standard_normal((B, 20)).astype(np.float32),
              sigma=np.array([0.3, 0.8, 0.05, 1.0], np.float32),
              guidance=np.array([3.5, 1.0, 2.0, 4.0], np.float32))


def _diffusers_forward(model, inp, guidance: bool) -> np.ndarray:
  """The FLUX pipeline's packing around the diffusers transformer; returns (B, H, W, C)."""
  x = torch.from_numpy(inp['x']).permute(0, 3, 1, 2)
  packed = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, 4 * C)
  ids = torch.zeros(H // 2, W // 2, 3)
  ids[..., 1] = torch.arange(H // 2)[:, None]
  ids[..., 2] = torch.arange(W // 2)[None, :]
  with torch.no_grad():
    out = model(hidden_states=packed, encoder_hidden_states=torch.from_numpy(inp['txt']),
                pooled_projections=torch.from_numpy(inp['pooled']),
                timestep=torch.from_numpy(inp['sigma']), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(L, 3),
                guidance=torch.from_numpy(inp['guidance']) if guidance else None).sample
  out = out.reshape(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
  return out.permute(0, 2, 3, 1).numpy()


_COMPILED = {}


def _ours_forward(graphdef, params, mesh, inp, guidance: bool) -> np.ndarray:
  """Our jitted forward; one compile per model structure and mesh (the round-trip test reuses
  the parity test's executable)."""
  def fwd(params, x, sigma, txt, pooled, g):
    model = nnx.merge(graphdef, params)
    return model(x, sigma, {'txt': txt, 'pooled': pooled}, g if guidance else None)

  args = tuple(jnp.asarray(inp[k]) for k in ('x', 'sigma', 'txt', 'pooled', 'guidance'))
  key = (graphdef, guidance, mesh)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
    if key not in _COMPILED:
      _COMPILED[key] = jax.jit(fwd).lower(params, *args).compile(compiler_options=O0)
    return np.asarray(_COMPILED[key](params, *args))


@pytest.mark.parametrize('guidance,scan,mesh_shape', [(True, True, (1, 4, 2)),
                                                      (False, False, (1, 1, 1))])
def test_flux_matches_diffusers(tiny_dirs, guidance, scan, mesh_shape):
  path = tiny_dirs[guidance]
  mesh = _mesh(mesh_shape)
  graphdef, params, cfg = flux.load(path, mesh, DEFAULT_RULES, scan_layers=scan)
  assert cfg.mmdit.guidance_embed == guidance and cfg.mmdit.scan_layers == scan
  if scan:
    kernel = params['transformer']['double_blocks']['img_attn']['qkv']['kernel']
    assert kernel.shape == (2, 48, 3 * 48)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')
    # q/k/v columns interleave per head (3 heads of 16): head h's k is columns 48h+16 .. 48h+32.
    src = load_file(os.path.join(path, 'diffusion_pytorch_model.safetensors'))
    for h in range(3):
      np.testing.assert_array_equal(np.asarray(kernel[1])[:, 48 * h + 16:48 * h + 32],
                                    src['transformer_blocks.1.attn.to_k.weight'][16 * h:16 * h + 16].T)
  inp = _inputs()
  ref = _diffusers_forward(diffusers.FluxTransformer2DModel.from_pretrained(path), inp, guidance)
  ours = _ours_forward(graphdef, params, mesh, inp, guidance)
  assert ours.shape == ref.shape == (B, H, W, C)
  assert np.abs(ref).max() > 0.5
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_flux_export_round_trip(tiny_dirs, tmp_path):
  """diffusers → ours → diffusers is the identity on tensors; a modified export loads in diffusers
  and reproduces our outputs."""
  src = tiny_dirs[True]
  mesh = _mesh((1, 4, 2))        # as the sharded parity test: its compiled forward is reused
  graphdef, params, cfg = flux.load(src, mesh, DEFAULT_RULES, scan_layers=True)
  out = str(tmp_path / 'same')
  flux.export(params, cfg, out)
  a = load_file(os.path.join(src, 'diffusion_pytorch_model.safetensors'))
  b = load_file(os.path.join(out, 'diffusion_pytorch_model.safetensors'))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f)['_class_name'] == 'FluxTransformer2DModel'

  # Perturb every param (as training would), export sharded in several files, reload in diffusers.
  rng = np.random.default_rng(3)
  params2 = jax.tree.map(lambda x: jax.device_put(
      np.asarray(x) + 0.02 * rng.standard_normal(x.shape, np.float32), x.sharding), params)
  out2 = str(tmp_path / 'perturbed')
  files = flux.export(params2, cfg, out2, max_shard_bytes=40_000)
  assert len(files) > 1 and os.path.isfile(
      os.path.join(out2, 'diffusion_pytorch_model.safetensors.index.json'))
  inp = _inputs(1)
  ref = _diffusers_forward(diffusers.FluxTransformer2DModel.from_pretrained(out2), inp, True)
  ours = _ours_forward(graphdef, params2, mesh, inp, True)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  # The sharded export also loads back here (index json path) into identical params.
  _, params3, _ = flux.load(out2, mesh, DEFAULT_RULES, scan_layers=True)
  for x, y in zip(jax.tree.leaves(params2), jax.tree.leaves(params3)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_flux_bad_weights_name_every_key(tiny_dirs, tmp_path):
  src = tiny_dirs[False]
  tensors = load_file(os.path.join(src, 'diffusion_pytorch_model.safetensors'))
  del tensors['transformer_blocks.1.attn.add_k_proj.bias']
  tensors['transformer_blocks.0.attn.extra.weight'] = np.zeros((2, 2), np.float32)
  tensors['single_transformer_blocks.1.proj_mlp.weight'] = np.zeros((7, 48), np.float32)
  bad = tmp_path / 'bad'
  bad.mkdir()
  save_file(tensors, str(bad / 'diffusion_pytorch_model.safetensors'))
  with open(os.path.join(src, 'config.json')) as f:
    (bad / 'config.json').write_text(f.read())
  with pytest.raises(WeightsMismatchError) as e:
    flux.load(str(bad), _mesh((1, 1, 1)), DEFAULT_RULES)
  msg = str(e.value)
  assert 'missing source key(s): transformer_blocks.1.attn.add_k_proj.bias' in msg
  assert 'unmapped source key(s): transformer_blocks.0.attn.extra.weight' in msg
  assert 'single_transformer_blocks.1.proj_mlp.weight (7, 48)' in msg
  # A guidance model's weights do not fit a config without guidance (and vice versa).
  with pytest.raises(WeightsMismatchError, match='guidance_embedder'):
    from rewarddance_jax.weights import loader
    cfg = flux.generator_config(flux.read_config(tiny_dirs[False]))
    _, abstract = loader.abstract_params(lambda: Generator(cfg, rngs=nnx.Rngs(0)),
                                         _mesh((1, 1, 1)), DEFAULT_RULES)
    loader.load(tiny_dirs[True], flux.rules(cfg.mmdit), abstract)


def test_flux_dev_param_count_matches_diffusers():
  cfg = generator_config(model_preset('flux-dev', scan_layers=True))
  with nnx.use_eager_sharding(False), fast_abstract_tracing():
    ours = count_params(nnx.state(nnx.eval_shape(lambda: Generator(cfg, rngs=nnx.Rngs(0)))))
  with torch.device('meta'):
    ref = sum(p.numel() for p in diffusers.FluxTransformer2DModel(guidance_embeds=True).parameters())
  assert ours == ref == 11_901_408_320
  # The config read from a flux-dev config.json builds the same model as the preset.
  dev_json = {'_class_name': 'FluxTransformer2DModel', 'guidance_embeds': True}
  assert flux.generator_config(dev_json, scan_layers=True).mmdit == cfg.mmdit


def test_fused_target_parts_plan_and_read_back():
  """dst_part: three (4, 6) sources fill one (4, 18) kernel interleaved per head (2 heads of 3);
  a missing or repeated part is named; `read` returns each source's part."""
  from rewarddance_jax.weights.keymap import IDENTITY, Rule, check_plan  # noqa: PLC0415
  view = (4, 2, 3, 3)
  rules = [Rule(f's{i}', ('qkv',), IDENTITY, dst_part=(view, 2, i)) for i in range(3)]
  srcs = {f's{i}': np.arange(24.0).reshape(4, 6) + 100 * i for i in range(3)}
  check_plan(rules, {k: v.shape for k, v in srcs.items()}, {('qkv',): (4, 18)})
  buf = np.full((4, 18), np.nan)
  for r in rules:
    r.write(buf, srcs[r.src])
  assert not np.isnan(buf).any()
  np.testing.assert_array_equal(buf[:, 3:6], srcs['s1'][:, :3])      # head 0: q, k, v
  np.testing.assert_array_equal(buf[:, 9:12], srcs['s0'][:, 3:])     # head 1's q
  for r in rules:
    np.testing.assert_array_equal(r.read(buf), srcs[r.src])
  with pytest.raises(WeightsMismatchError, match=r'qkv: parts \[0, 2\] do not fill axis 2'):
    check_plan(rules[::2], {'s0': (4, 6), 's2': (4, 6)}, {('qkv',): (4, 18)})
  with pytest.raises(WeightsMismatchError, match='gives'):
    check_plan(rules, {'s0': (4, 6), 's1': (4, 5), 's2': (4, 6)}, {('qkv',): (4, 18)})
