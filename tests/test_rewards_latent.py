"""Latent rewards: backbone reuse, Thurstone/PAVRM losses (hand values), ensemble, Reward protocol.

The PAVRM Reward, its checkpoint round trip and LoRA/head-only training: test_train_latent_reward.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.stats import norm

from rewarddance_jax.models import backbone as backbone_lib
from rewarddance_jax.models.generator import Generator, generator_config, unpack
from rewarddance_jax.models.presets import model_preset
from rewarddance_jax.nn import layers
from rewarddance_jax.rewards import process, thurstone



def _random(tree, seed, scale):
  """numpy-drawn values in the shapes of `tree` (no eager JAX ops: nothing to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), jnp.float32),
                      tree)


def _generator(**overrides):
  cfg = generator_config(model_preset('tiny', **overrides))
  with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Generator(cfg, rngs=nnx.Rngs(0))))
  return cfg, graphdef, _random(nnx.to_pure_dict(state), 1, 0.2)


def _lora(bb, params, seed):
  return jax.jit(bb.init_lora)(params, jax.random.key(seed))


def _head(module_fn, seed):
  """(graphdef, params) of a head: its own init plus a perturbation (zero-init layers move)."""
  with nnx.use_eager_sharding(False):
    gd, state = nnx.split(nnx.eval_shape(module_fn))
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(module_fn())))()
  noise = _random(nnx.to_pure_dict(state), seed, 0.05)
  return gd, jax.tree.map(jnp.add, init, noise)


def _inputs(b=2):
  x = jnp.asarray(np.random.default_rng(2).standard_normal((b, 16, 16, 1)), jnp.float32)
  cond = {'tokens': jnp.arange(b * 6).reshape(b, 6) % 40,
          'mask': jnp.ones((b, 6), bool).at[:, -2:].set(False)}
  return x, jnp.linspace(0.3, 0.9, b), cond


# ------------------------------------------------------------------------------------------------
# Losses against hand-computed values.
# ------------------------------------------------------------------------------------------------


def _phi(x):
  return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_thurstone_family_hand_values():
  s_pos, s_neg, sigma = jnp.array([1.0, 0.0]), jnp.array([0.0, 0.5]), jnp.array([0.0, 0.5])
  # var = 2σ² + 0.05: 0.05 and 0.55; p = Φ(Δ / sqrt(2·var + 1e-6)); L = mean(1 − sqrt(p + 1e-6)).
  p = [_phi(1.0 / math.sqrt(0.1 + 1e-6)), _phi(-0.5 / math.sqrt(1.1 + 1e-6))]
  want = np.mean([1 - math.sqrt(q + 1e-6) for q in p])
  np.testing.assert_allclose(thurstone.preference_loss(s_pos, s_neg, sigma), want, rtol=1e-6)
  # More noise → a less confident likelihood for the same score gap.
  p_lo = thurstone.thurstone_probability(1.0, 0.0, thurstone.noise_variance(0.1))
  p_hi = thurstone.thurstone_probability(1.0, 0.0, thurstone.noise_variance(0.9))
  assert float(p_lo) > float(p_hi) > 0.5
  p_c = [_phi(1.0 / math.sqrt(1.0 + 1e-6)), _phi(-0.5 / math.sqrt(1.0 + 1e-6))]
  np.testing.assert_allclose(
      thurstone.preference_loss(s_pos, s_neg, sigma, 'thurstone-constant'),
      np.mean([1 - math.sqrt(q + 1e-6) for q in p_c]), rtol=1e-6)
  bt = np.mean([math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))])
  np.testing.assert_allclose(thurstone.preference_loss(s_pos, s_neg, sigma, 'bt'), bt, rtol=1e-6)
  btm = np.mean([math.log1p(math.exp(0.0)), math.log1p(math.exp(1.5))])
  np.testing.assert_allclose(thurstone.preference_loss(s_pos, s_neg, sigma, 'bt-margin'), btm,
                             rtol=1e-6)
  with pytest.raises(ValueError, match='nll'):
    thurstone.preference_loss(s_pos, s_neg, sigma, 'nll')


@pytest.mark.parametrize('x64', [False, True])
def test_normal_cdf_and_thurstone_gradient_hold_in_the_lower_tail(x64):
  """Φ and Φ' at −5, −7, −10 (badly ranked pairs, p < 1e-6) match scipy in float32 and float64,
  and so does the fidelity loss's gradient in the score gap; every gradient is finite."""
  x = np.array([-5.0, -7.0, -10.0])
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    xs = jnp.asarray(x, dtype)
    p = thurstone.normal_cdf(xs)
    dp = jax.vmap(jax.grad(thurstone.normal_cdf))(xs)
    var = 0.5                                        # thurstone-constant: z = Δ / sqrt(1 + 1e-6)
    gap = x * math.sqrt(2 * var + 1e-6)
    loss = lambda s: thurstone.preference_loss(s, jnp.zeros_like(s), jnp.zeros_like(s),
                                               'thurstone-constant', constant_var=var)
    dloss = jax.grad(loss)(jnp.asarray(gap, dtype))
  assert p.dtype == dtype and np.all(np.isfinite(dp)) and np.all(np.isfinite(dloss))
  np.testing.assert_allclose(p, norm.cdf(x), rtol=1e-4)
  np.testing.assert_allclose(dp, norm.pdf(x), rtol=1e-4)
  # L = mean(1 − sqrt(Φ(Δ / s) + 1e-6)): dL/dΔ = −Φ'(Δ / s) / (2·s·sqrt(Φ + 1e-6)) / n.
  s = math.sqrt(2 * var + 1e-6)
  want = -norm.pdf(x) / (2 * s * np.sqrt(norm.cdf(x) + 1e-6)) / len(x)
  np.testing.assert_allclose(dloss, want, rtol=1e-4)


def test_pavrm_losses_hand_values():
  logits, labels = jnp.array([2.0, -1.0, 0.5]), jnp.array([1.0, 0.0, 0.0])
  sig = lambda z: 1 / (1 + math.exp(-z))
  want = -np.mean([math.log(sig(2.0)), math.log(1 - sig(-1.0)), math.log(1 - sig(0.5))])
  np.testing.assert_allclose(process.bce_loss(logits, labels), want, rtol=1e-6)
  w, l = jnp.array([1.0, -2.0]), jnp.array([0.0, 1.0])
  np.testing.assert_allclose(process.siamese_bt_loss(w, l),
                             -np.mean([math.log(sig(1.0)), math.log(sig(-3.0))]), rtol=1e-6)
  np.testing.assert_allclose(  # pointwise BCE over chosen (y = 1) and rejected (y = 0)
      process.pair_loss(w, l, 'bce'),
      -np.mean([math.log(sig(1.0)), math.log(sig(-2.0)), math.log(1 - sig(0.0)),
                math.log(1 - sig(1.0))]), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Backbone reuse.
# ------------------------------------------------------------------------------------------------


def test_backbone_matches_generator_and_shares_its_arrays():
  cfg, graphdef, params = _generator(depth_double=2, depth_single=1)
  bb = backbone_lib.Backbone(cfg, num_blocks=3, layers=(1, 3))
  x, sigma, cond = _inputs()
  lora = _lora(bb, params, 3)   # b = 0: the generator's own function

  @jax.jit
  def both(params, lora):
    feats = bb(params, lora, x, sigma, cond)
    model = nnx.merge(graphdef, params)
    tr = model.transformer
    shift, scale = tr.final_mod(feats['temb'])
    out = tr.final_out(layers.modulate(layers.layer_norm(feats['img'][-1]), shift, scale))
    return feats, unpack(out, 1, 16, 16, 1, 4)[:, 0], model(x, sigma, cond)

  feats, v, ref = both(params, lora)
  np.testing.assert_allclose(v, ref, rtol=1e-5, atol=1e-5)   # last layer + output head = generator
  assert [f.shape for f in feats['img']] == [(2, 16, 32)] * 2
  assert [f.shape for f in feats['txt']] == [(2, 6, 32)] * 2 and feats['temb'].shape == (2, 32)
  sub = bb.take(params)
  assert 'final_out' not in sub['transformer']
  for path in (('transformer', 'img_in', 'kernel'), ('text_encoder', 'embed', 'embedding'),
               ('transformer', 'double_blocks', 1, 'img_attn', 'qkv', 'kernel')):
    a, b = sub, params
    for k in path:
      a, b = a[k], b[k]
    assert a is b                                              # no copy of the generator
  # Scanned stacks: sliced to the first K layers (two double blocks of three here).
  cfg_s, _, params_s = _generator(depth_double=3, depth_single=1, scan_layers=True)
  bb_s = backbone_lib.Backbone(cfg_s, num_blocks=2, layers=(1, 2))
  assert jax.tree.leaves(bb_s.take(params_s)['transformer']['double_blocks'])[0].shape[0] == 2
  lora_s = jax.eval_shape(bb_s.init_lora, params_s, jax.random.key(3))
  assert lora_s['transformer']['double_blocks']['img_attn']['qkv']['kernel']['a'].shape == (2, 32, 8)
  shapes = jax.eval_shape(lambda p, l: bb_s(p, l, x, sigma, cond), params_s, lora_s)
  assert [f.shape for f in shapes['img']] == [(2, 16, 32)] * 2
  with pytest.raises(ValueError, match='layers'):
    backbone_lib.Backbone(cfg, num_blocks=2, layers=(1, 3))


# ------------------------------------------------------------------------------------------------
# Heads, ensemble, Reward protocol.
# ------------------------------------------------------------------------------------------------


def _thurstone_parts():
  cfg, _, params = _generator()
  bb = backbone_lib.Backbone(cfg, num_blocks=1, layers=(1,))   # small: the test is the fusion
  hcfg = thurstone.head_config(bb, num_heads=4, num_queries=2)
  gd, head = _head(lambda: thurstone.ThurstoneHead(hcfg, rngs=nnx.Rngs(4)), 5)
  return bb, gd, params, {'lora': _lora(bb, params, 6), 'head': head}


def test_ensemble_concatenates_tokens_and_one_level_is_the_single_view():
  bb, gd, base, p = _thurstone_parts()
  x, _, cond = _inputs()
  key = jax.random.key(7)
  captured = []
  real_attn1 = thurstone._QueryAttention.__call__   # pylint: disable=protected-access

  def spy(self, q, tokens):
    captured.append([t.shape for t, _ in tokens])
    return real_attn1(self, q, tokens)

  r1 = thurstone.thurstone_reward(bb, gd, base, p, sigmas=(0.2,))
  r3 = thurstone.thurstone_reward(bb, gd, base, p, sigmas=(0.2, 0.7))

  @jax.jit
  def run(r1, r3, p):
    head = nnx.merge(gd, p['head'])
    # Reference: the backbone per level (no batching of views) and the head on its features.
    # Level 0 of the ensemble is noised with fold_in(key, 0), as the one-level reward's only view.
    feats = [bb(base, p['lora'], xv, s, cond)
             for xv, s in thurstone.noisy_views(key, x, (0.2, 0.7))]
    return dict(fused=head(feats), single=head(feats[:1]),
                reward3=r3({'latents': x}, cond, key),                # captured[-1]: fused shapes
                reward1=r1({'latents': x}, cond, key))

  thurstone._QueryAttention.__call__ = spy   # pylint: disable=protected-access
  try:
    out = run(r1, r3, p)
  finally:
    thurstone._QueryAttention.__call__ = real_attn1   # pylint: disable=protected-access
  attn1 = [c for c in captured if len(c) == 2]        # (attn2 sees the visual stream only)
  assert attn1[0] == [(2, 32, 32), (2, 12, 32)]       # K·N_v visual and K·N_t text tokens
  assert attn1[1] == [(2, 16, 32), (2, 6, 32)]
  # The ensemble path (views batched through the backbone, tokens fused) equals the reference;
  # with one level it is exactly the single view.
  np.testing.assert_allclose(out['reward3'], out['fused'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out['reward1'], out['single'], rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(out['fused'] - out['single']))) > 1e-4
  assert r3.params['base'] is base
  with pytest.raises(ValueError, match='PRNG key'):
    r1({'latents': x}, cond, None)
