"""The SD3 backbone of the DiNa-LRM reward and the scanner's 'latent_reward' step.

  1. `SD3Backbone` with all blocks of a random tiny SD3 transformer: the generator's final layer
     (adaLN + linear, unpatchified) on its last recorded image stream, with its `temb`, equals
     `SD3Generator`'s own output (the embedding path and every block match); a zero LoRA leaves
     the features unchanged, and the LoRA targets pick every attention projection of the blocks
     (dual attention included), none of the MLP or modulation kernels.
  2. The latent-reward train step of a tiny SD3 config (`configs/sd3/reward_thurstone.py` with a
     small model) AOT-compiles for v5e:2x2: fits, and its analytic FLOPs are 6·P_backbone·S·2B
     over 4 chips, P_backbone counted from the generator's first K blocks + embedders.
  3. `SD3Backbone(scan=True)`: its block groups by hand, and features and LoRA gradients equal to
     the unrolled blocks.
Skipped (compile test only) when libtpu cannot be loaded or initialised.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.sd3 import reward_thurstone
from rewarddance_jax.models.backbone_sd3 import SD3Backbone
from rewarddance_jax.models.generator import unpack
from rewarddance_jax.models.sd3 import SD3Config, SD3Generator
from rewarddance_jax.nn import layers
from rewarddance_jax.nn import lora as lora_lib
from rewarddance_jax.parallel import aot
from rewarddance_jax.scan import layouts as scanner

TINY = dict(latent_channels=4, patch_size=2, num_heads=2, head_dim=8, depth=3, context_dim=12,
            caption_projection_dim=16, pooled_dim=6, pos_embed_max_size=8,
            dual_attention_layers=(0,), qk_norm=True, mlp_ratio=2.0)


def _random_generator(cfg):
  with nnx.use_eager_sharding(False):
    model = SD3Generator(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(1)
  # Non-zero everything (zero-init output layers and the position table included).
  leaves = [jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype) for x in leaves]
  return graphdef, jax.tree.unflatten(treedef, leaves)


def _inputs(rng):
  """Latents (2, 8, 6, 4), σ and SD3 conditioning (padded text) for the TINY shapes."""
  x = jnp.asarray(rng.standard_normal((2, 8, 6, 4)), jnp.float32)
  sigma = jnp.array([0.3, 0.8])
  cond = {'txt': jnp.asarray(rng.standard_normal((2, 5, 12)), jnp.float32),
          'pooled': jnp.asarray(rng.standard_normal((2, 6)), jnp.float32),
          'mask': jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)}
  return x, sigma, cond


def test_sd3_backbone_matches_generator():
  cfg = SD3Config(**TINY)
  graphdef, state = _random_generator(cfg)
  params = nnx.to_pure_dict(state)
  x, sigma, cond = _inputs(np.random.default_rng(2))
  bb = SD3Backbone(cfg, num_blocks=3, layers=(1, 3), lora_rank=2, lora_alpha=4.0)
  lora = bb.init_lora(params, jax.random.key(3))   # b = 0: the merged model is unchanged

  @jax.jit
  def run(state, params, lora, x, sigma, cond):
    model = nnx.merge(graphdef, state)
    feats = bb(params, None, x, sigma, cond)
    shift, scale = model.final_mod(feats['temb'])
    out = model.final_out(layers.modulate(layers.layer_norm(feats['img'][-1]), shift, scale))
    via_backbone = unpack(out.astype(jnp.float32), 1, 8, 6, 4, 2)[:, 0]
    return via_backbone, model(x, sigma, cond), feats, bb(params, lora, x, sigma, cond)

  got, want, feats, with_lora = run(state, params, lora, x, sigma, cond)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert feats['img'][0].shape == (2, 12, 16) and feats['txt'][0].shape == (2, 5, 16)
  np.testing.assert_array_equal(feats['txt_mask'], cond['mask'])
  np.testing.assert_allclose(with_lora['img'][-1], feats['img'][-1], rtol=1e-6, atol=1e-6)
  paths = {'/'.join(map(str, p)) for p, _ in lora_lib._lora_leaves(lora)}  # pylint: disable=protected-access
  per_block = {'img_attn/q', 'img_attn/k', 'img_attn/v', 'txt_attn/q', 'txt_attn/k',
               'txt_attn/v', 'img_out', 'txt_out'}
  want_paths = {f'blocks/{i}/{n}/kernel' for i in range(3) for n in per_block - (
      {'txt_out'} if i == 2 else set())}
  want_paths |= {f'blocks/0/{n}/kernel' for n in ('attn2/q', 'attn2/k', 'attn2/v', 'attn2_out')}
  assert paths == want_paths


def test_sd3_backbone_scan_equals_unrolled():
  """`scan=True` runs consecutive blocks of one kind as one lax.scan: same features and LoRA
  gradients as the unrolled blocks (remat on); the grouping by hand for SD3.5-medium."""
  medium = SD3Config()
  bb = SD3Backbone(medium, num_blocks=12, layers=(4, 8, 12), scan=True)
  assert bb.runs() == [tuple(range(0, 4)), tuple(range(4, 8)), tuple(range(8, 12))]
  assert SD3Backbone(medium, num_blocks=14, layers=(14,), scan=True).runs() == [
      tuple(range(13)), (13,)]                      # dual attention ends after block 12
  assert SD3Backbone(medium, num_blocks=3, layers=(3,)).runs() == [(0,), (1,), (2,)]

  cfg = SD3Config(**dict(TINY, depth=5, remat='full'))   # block 0 dual, 1-3 plain, 4 pre-only
  _, state = _random_generator(cfg)
  params = nnx.to_pure_dict(state)
  rng = np.random.default_rng(4)
  x, sigma, cond = _inputs(rng)
  unrolled = SD3Backbone(cfg, num_blocks=5, layers=(1, 5), lora_rank=2, lora_alpha=4.0)
  scanned = dataclasses.replace(unrolled, scan=True)
  assert scanned.runs() == [(0,), (1, 2, 3), (4,)]
  lora = unrolled.init_lora(params, jax.random.key(3))
  # A non-zero LoRA (b is zero at init) so the merged weights differ from the base.
  lora = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                      lora)

  def features_and_grad(bb):
    def loss(lora):
      f = bb(params, lora, x, sigma, cond)
      return sum(jnp.sum(jnp.sin(a)) for a in f['img'] + f['txt']), f
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)

  (l_u, f_u), g_u = features_and_grad(unrolled)
  (l_s, f_s), g_s = features_and_grad(scanned)
  assert len(f_s['img']) == len(f_u['img']) == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), f_s, f_u)
  np.testing.assert_allclose(l_s, l_u, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_s, g_u)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_u)) > 1e-3


@pytest.mark.slow  # a second TPU compile (tiny SD3 step); the scanner is tested on the flow step by default
@pytest.mark.tpu_aot
@pytest.mark.filterwarnings('ignore:Error reading persistent compilation cache entry')
def test_latent_reward_step_compiles():
  if not aot.libtpu_available():
    pytest.skip(f'libtpu cannot be loaded/initialised: {aot.libtpu_unavailable_reason()}')
  config = reward_thurstone.get_config()
  config.model.update(TINY, dual_attention_layers=(0,))
  config.reward.update(num_blocks=1, layers=(1,), lora_rank=2, lora_alpha=4.0,
                       head=dict(num_queries=2, num_heads=2))
  config.pairs.update(batch_size=4, max_text_len=8, latent_shape=(8, 8, 4))
  (row,) = scanner.scan_layouts(config, 'v5e:2x2', [{'mesh': (1, -1, 1), 'remat': 'none',
                                                   'step': 'latent_reward'}])
  assert row['error'] is None, row['error']
  assert row['fits'] and row['argument_gib'] > 0 and row['temp_gib'] > 0
  cfg = SD3Config(**TINY)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: SD3Generator(cfg, rngs=nnx.Rngs(0)))
  tree = nnx.to_pure_dict(nnx.state(abstract))
  size = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))  # pylint: disable=unnecessary-lambda-assignment
  p = size({k: tree[k] for k in ('img_in', 'pos_embed', 'txt_in', 'time_in', 'vector_in')})
  p += size(tree['blocks'][0])
  s = (8 // 2) ** 2 + 8
  assert row['model_flops'] == pytest.approx(6 * p * s * 2 * 4 / 4)
