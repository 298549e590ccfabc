"""Generator: packing, RoPE, attention dispatch, scan == unrolled, bf16 compute, video, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rewarddance_jax.models.generator import Generator, generator_config, pack, unpack
from rewarddance_jax.models.presets import model_preset
from rewarddance_jax.nn import attention as attn_lib
from rewarddance_jax.nn import rope


def _randomise(params, key):
  """Non-zero values everywhere (the output layer starts at zero)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      tree, [0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _cond(b, length=6):
  tokens = jnp.arange(b * length, dtype=jnp.int32).reshape(b, length) % 40
  mask = jnp.ones((b, length), bool).at[:, -2:].set(False)
  return {'tokens': tokens, 'mask': mask}


def _build(**overrides):
  cfg = generator_config(model_preset('tiny', **overrides))
  with nnx.use_eager_sharding(False):
    model = Generator(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  return graphdef, _randomise(nnx.to_pure_dict(params), jax.random.key(1))


def test_pack_unpack_roundtrip_and_flux_channel_order():
  x = jnp.arange(2 * 1 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 1, 4, 6, 3)
  tokens = pack(x, 2)
  assert tokens.shape == (2, 6, 12)
  np.testing.assert_array_equal(unpack(tokens, 1, 4, 6, 3, 2), x)
  # FLUX packs (c, ph, pw): token 0's first four channels are channel 0 of the 2x2 patch.
  np.testing.assert_array_equal(tokens[0, 0, :4], x[0, 0, :2, :2, 0].reshape(-1))


def test_rope_is_relative():
  """<R(p)q, R(p')k> depends only on p − p' (per axis)."""
  key = jax.random.key(0)
  q, k = jax.random.normal(key, (2, 1, 1, 1, 16))
  dims = (4, 6, 6)

  def score(pq, pk):
    aq = rope.rope_angles(jnp.array([[pq]], jnp.float32), dims)
    ak = rope.rope_angles(jnp.array([[pk]], jnp.float32), dims)
    return jnp.sum(rope.apply_rope(q, aq) * rope.apply_rope(k, ak))

  np.testing.assert_allclose(score((0, 1, 2), (0, 3, 5)), score((2, 4, 7), (2, 6, 10)),
                             rtol=1e-5)
  assert abs(float(score((0, 1, 2), (0, 3, 5)) - score((0, 1, 2), (0, 1, 2)))) > 1e-4


def test_attention_dispatch_and_mask():
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 2, 8))
  mask = jnp.array([[True] * 4 + [False]] * 2)
  out = attn_lib.attention(q, k, v, mask=mask)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(8)
  logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
  ref = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, -1), v)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  assert attn_lib.resolve_impl('auto', q, k, 'cpu') == 'xla'
  assert attn_lib.resolve_impl('auto', q.astype(jnp.bfloat16), k, 'gpu') == 'cudnn'
  q128 = jnp.zeros((1, 256, 2, 8))
  assert attn_lib.resolve_impl('auto', q128, q128, 'tpu') == 'flash'
  assert attn_lib.resolve_impl('auto', q, k, 'tpu') == 'xla'
  with pytest.raises(ValueError, match='splash2'):
    attn_lib.resolve_impl('splash2', q, k)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def test_scan_equals_unrolled_and_remat_changes_nothing():
  gd, params = _build(depth_double=2, depth_single=2)
  gd_s, params_s = _build(depth_double=2, depth_single=2, scan_layers=True, remat='full')
  t = params['transformer']
  stacked = dict(params_s)
  stacked['transformer'] = dict(params_s['transformer'])
  for name in ('double_blocks', 'single_blocks'):
    stacked['transformer'][name] = _stack([t[name][i] for i in range(2)])
  stacked['transformer'].update({k: v for k, v in t.items()
                                 if k not in ('double_blocks', 'single_blocks')})
  stacked['text_encoder'] = params['text_encoder']
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 1))
  sigma = jnp.array([0.3, 0.9])
  cond = _cond(2)

  def run(g, p):
    return nnx.merge(g, p)(x, sigma, cond)

  out = jax.jit(run, static_argnums=0)(gd, params)
  out_s = jax.jit(run, static_argnums=0)(gd_s, stacked)
  np.testing.assert_allclose(out, out_s, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(out).mean()) > 1e-3
  grads = jax.jit(jax.grad(lambda p: jnp.mean(run(gd_s, p) ** 2)))(stacked)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.slow  # bf16 compute is also exercised by the FLUX parity tests
def test_bf16_compute_fp32_params_close_to_fp32():
  gd, params = _build()
  gd16, _ = _build(dtype='bfloat16')
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 1))
  cond, sigma = _cond(2), jnp.array([0.5, 0.5])
  out32 = nnx.merge(gd, params)(x, sigma, cond)
  out16 = nnx.merge(gd16, params)(x, sigma, cond)
  assert out16.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  err = float(jnp.max(jnp.abs(out16 - out32)) / jnp.max(jnp.abs(out32)))
  assert 0 < err < 0.05


def _jitted(graphdef, params):
  """`model(x, sigma, cond, guidance)` as one compiled program (op-by-op eager dispatch of the
  tiny model compiles hundreds of kernels: ~10x slower from a cold cache)."""
  fn = jax.jit(lambda p, x, sigma, cond, guidance: nnx.merge(graphdef, p)(x, sigma, cond, guidance))
  return lambda x, sigma, cond, guidance=None: fn(params, x, sigma, cond, guidance)


def test_text_mask_matters_and_padding_is_ignored():
  model = _jitted(*_build())
  x = jax.random.normal(jax.random.key(4), (1, 16, 16, 1))
  cond = _cond(1)
  base = model(x, jnp.array([0.5]), cond)
  # Changing a masked-out token changes nothing; changing a visible one does.
  hidden = dict(cond, tokens=cond['tokens'].at[0, -1].set(7))
  visible = dict(cond, tokens=cond['tokens'].at[0, 0].set(7))
  np.testing.assert_allclose(model(x, jnp.array([0.5]), hidden), base, atol=1e-6)
  assert float(jnp.max(jnp.abs(model(x, jnp.array([0.5]), visible) - base))) > 1e-4


def test_guidance_embedding_and_video_latents():
  model = _jitted(*_build(guidance_embed=True))
  x = jax.random.normal(jax.random.key(5), (2, 3, 8, 8, 1))   # (B, F, H, W, C)
  cond = _cond(2)
  a = model(x, jnp.array([0.5, 0.5]), cond, guidance=jnp.array([3.5, 3.5]))
  b = model(x, jnp.array([0.5, 0.5]), cond, guidance=jnp.array([1.0, 1.0]))
  assert a.shape == x.shape
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4
  with pytest.raises(ValueError, match='guidance'):
    model(x, jnp.array([0.5, 0.5]), cond)


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match='widht'):
    generator_config(model_preset('tiny', widht=3))
  with pytest.raises(ValueError, match='axes_dims'):
    generator_config(model_preset('tiny', axes_dims=(4, 4, 4)))
  with pytest.raises(ValueError, match="remat='some'"):
    generator_config(model_preset('tiny', remat='some'))
  gd, params = _build()
  with pytest.raises(ValueError, match='3 channels'):
    nnx.merge(gd, params)(jnp.zeros((1, 16, 16, 3)), jnp.array([0.5]), _cond(1))
