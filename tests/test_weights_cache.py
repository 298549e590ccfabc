"""Converted-weights cache: the second load restores Orbax (no safetensors read) onto any mesh;
a changed source or param layout converts again."""

import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from rewarddance_jax.models.generator import Generator
from rewarddance_jax.parallel.sharding import DEFAULT_RULES
from rewarddance_jax.weights import cache, flux, safetensors_io
from weights_testlib import mesh as _mesh

TINY = {'_class_name': 'FluxTransformer2DModel', 'in_channels': 16, 'num_layers': 2,
        'num_single_layers': 1, 'attention_head_dim': 16, 'num_attention_heads': 2,
        'joint_attention_dim': 24, 'pooled_projection_dim': 20, 'guidance_embeds': True,
        'axes_dims_rope': [4, 6, 6]}


def _write_source(path, seed):
  cfg = flux.generator_config(TINY)
  with nnx.use_eager_sharding(False):
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Generator(cfg, rngs=nnx.Rngs(0)))))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
  flux.export(params, cfg, str(path))
  return params


def test_cache_and_launch_convert(tmp_path, monkeypatch):
  """weights.convert (launch.convert) imports + caches + exports; a second load restores Orbax onto another mesh
  without reading the safetensors; a changed layout or source converts again; a generator
  trained here exports back to the diffusers layout."""
  from rewarddance_jax.checkpoint import Checkpointer
  from rewarddance_jax.weights import convert

  src, cache_dir = tmp_path / 'flux', str(tmp_path / 'cache')
  expected = _write_source(src, 0)
  mesh1 = _mesh((1, 1, 1))
  first = convert.run('flux', str(src), cache_dir=cache_dir, export=str(tmp_path / 'out'),
                      overrides={'scan_layers': True}, mesh=mesh1, progress=False)
  assert first['cache'] == 'written' and first['params'] > 0 and len(os.listdir(cache_dir)) == 1
  a = load_file(str(src / 'diffusion_pytorch_model.safetensors'))
  b = load_file(str(tmp_path / 'out' / 'diffusion_pytorch_model.safetensors'))
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)

  def no_read(*args, **kwargs):
    raise AssertionError('the cache path must not read the safetensors')

  monkeypatch.setattr(safetensors_io, 'stream', no_read)
  spec = flux.spec(str(src), scan_layers=True)
  mesh8 = _mesh((1, 4, 2))                           # restore onto another mesh
  graphdef, params, hit = cache.load_cached(spec, mesh8, DEFAULT_RULES, cache_dir)
  assert hit
  # Scanned: the two double blocks are stacked along a leading layer axis.
  q = params['transformer']['double_blocks']['img_attn']['qkv']['kernel']
  np.testing.assert_array_equal(
      q[1], expected['transformer']['double_blocks'][1]['img_attn']['qkv']['kernel'])
  assert q.sharding.mesh.shape == mesh8.shape and q.sharding.spec[1:] == ('fsdp', 'tensor')
  assert nnx.merge(graphdef, params).cfg.mmdit.scan_layers
  # Another layout (param dtype) is another entry: converting it must read the source.
  with pytest.raises(AssertionError, match='must not read'):
    cache.load_cached(flux.spec(str(src), scan_layers=True, param_dtype='bfloat16'), mesh1,
                      DEFAULT_RULES, cache_dir)
  monkeypatch.undo()

  # New source tensors (same names and sizes, later mtime) are never served from the old entry.
  new = _write_source(src, 1)
  for f in os.listdir(src):
    os.utime(src / f, (2e9, 2e9))
  _, params3, hit = cache.load_cached(spec, mesh1, DEFAULT_RULES, cache_dir)
  assert not hit
  np.testing.assert_array_equal(
      np.asarray(params3['transformer']['img_in']['kernel']), new['transformer']['img_in']['kernel'])

  # A generator trained here (its run config + params checkpoint) goes back to diffusers.
  model_cfg = dict(latent_channels=4, patch_size=2, num_heads=2, head_dim=16, depth_double=2,
                   depth_single=1, mlp_ratio=4.0, context_dim=24, pooled_dim=20,
                   axes_dims=[4, 6, 6], guidance_embed=True, text='external', scan_layers=True)
  with Checkpointer(tmp_path / 'run' / 'checkpoints', async_save=False) as ckpt:
    ckpt.save(7, arrays={'params': params3}, json={'config': {'model': model_cfg}})
  out = convert.run('flux', checkpoint=str(tmp_path / 'run' / 'checkpoints'),
                    export=str(tmp_path / 'aligned'), mesh=mesh1, progress=False)
  a = load_file(str(src / 'diffusion_pytorch_model.safetensors'))
  c = load_file(str(tmp_path / 'aligned' / 'diffusion_pytorch_model.safetensors'))
  assert out['params'] == first['params'] and all(np.array_equal(a[k], c[k]) for k in a)
  with pytest.raises(ValueError, match='exactly one of'):
    convert.run('flux', mesh=mesh1)
