"""VLM yes-reward: losses against hand values, prompter layout, P(yes) range, pixel gradients,
sharded scoring = single-device scoring."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from rewarddance_jax.data import digits
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.models.vlm import InternVL, check_placeholders
from rewarddance_jax.models.vlm.config import vlm_config
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.rewards import vlm_losses, vlm_yes

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_token_ce_hand_values_with_first_token_weight():
  logits = jnp.array([[[0.0, 0.0], [0.0, LN3], [LN3, 0.0], [5.0, -5.0]]])
  targets = jnp.array([[0, 1, 1, 0]])
  mask = jnp.array([[1, 1, 1, 0]])                    # the last position is padding
  nll = [LN2, math.log(4 / 3), math.log(4.0)]
  plain = vlm_losses.token_ce(logits, targets, mask)
  np.testing.assert_allclose(plain, sum(nll) / 3, rtol=1e-6)
  # α = 0.1 on the first token, n(1 − α)/(n − 1) = 1.35 on the other two; mean over n = 3.
  weighted = vlm_losses.token_ce(logits, targets, mask, first_token_weight=0.1)
  np.testing.assert_allclose(weighted, (0.1 * nll[0] + 1.35 * (nll[1] + nll[2])) / 3, rtol=1e-6)
  w = vlm_losses.answer_weights(jnp.array([[0, 1, 0, 0], [0, 1, 1, 1]]), 0.1)
  np.testing.assert_allclose(w, [[0, 1, 0, 0], [0, 0.1, 1.35, 1.35]], rtol=1e-6)


def test_pointwise_bt_ce_and_yes_probability_hand_values():
  yes, no = (0,), (1,)
  lw = jnp.array([[LN2, 0.0, 0.0]])                  # softmax (1/2, 1/4, 1/4)
  ll = jnp.array([[0.0, LN2, 0.0]])                  # softmax (1/4, 1/2, 1/4)
  want = -math.log(2 / 3) + 0.1 * (LN2 + LN2)        # −log σ(ln 2) + λ(−ln ½ − ln ½)
  np.testing.assert_allclose(vlm_losses.pointwise_bt_loss(lw, ll, yes, no, 0.1), want, rtol=1e-6)
  np.testing.assert_allclose(vlm_losses.yes_probability(lw, yes, no, 'full'), [0.5], rtol=1e-6)
  np.testing.assert_allclose(vlm_losses.yes_probability(lw, yes, no, 'two_way'), [2 / 3],
                             rtol=1e-6)
  # Two ids per answer are summed (case variants): P = (1/2 + 1/4) under 'full'.
  np.testing.assert_allclose(vlm_losses.yes_probability(lw, (0, 2), no, 'full'), [0.75],
                             rtol=1e-6)
  two = vlm_losses.pointwise_bt_loss(lw, ll, yes, no, 0.0, 'two_way')
  np.testing.assert_allclose(two, -math.log(1 / (1 + math.exp(-(math.log(2 / 3) - math.log(1 / 3))))),
                             rtol=1e-6)


def _cfg_and_prompter(mode):
  tok = tokenizer_lib.build_digits_tokenizer()
  n = tokenizer_lib.vocab_size(tok)
  vocab = n + 1 + (n + 1) % 2                         # even, so 'vocab' shards on tensor=2
  cfg = vlm_config(dict(
      vision=dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                  image_size=16, patch_size=4),
      text=dict(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=64, rope_theta=10000.0),
      image_token_id=n, scan_layers=True))
  templates = {'pointwise': '<image> does this image show {prompt} ?',
               'pairwise': '<image> <image> {prompt} . is image 2 better than image 1 ?'}
  prompter = vlm_yes.Prompter(tokenizer=tok, mode=mode, image_token_id=n,
                              tokens_per_image=cfg.tokens_per_tile, max_len=24,
                              template=templates[mode])
  return cfg, prompter


@functools.lru_cache(maxsize=None)
def _setup(mode):
  cfg, prompter = _cfg_and_prompter(mode)
  with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0))))

  @jax.jit
  def init():
    params = nnx.to_pure_dict(nnx.split(InternVL(cfg, rngs=nnx.Rngs(0)))[1])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                     for k, x in zip(keys, leaves)])

  with nnx.use_eager_sharding(False):
    params = init()
  return graphdef, params, state, prompter, vlm_yes.TileSpec(size=16, thumbnail=False), cfg


def _images(b, seed=0):
  data = digits.load_split('heldout')
  idx = np.random.default_rng(seed).choice(len(data['labels']), b, replace=False)
  return jnp.asarray(data['images'][idx]), jnp.asarray(data['labels'][idx])


def test_prompter_layout_and_chat_template():
  cfg, prompter = _cfg_and_prompter('pairwise')
  enc = prompter.encode(['a handwritten digit seven', 'a handwritten digit one'],
                        answers=['yes', 'no'])
  check_placeholders(enc['ids'], cfg.image_token_id, 2 * cfg.tokens_per_tile)
  tok = prompter.tokenizer
  for row, answer in enumerate(('yes', 'no')):
    pos = enc['pos'][row]
    assert tok.id_to_token(int(enc['ids'][row, pos])) == '?'       # last prompt token
    assert tok.id_to_token(int(enc['targets'][row, pos])) == answer
    assert enc['answer_mask'][row].sum() == 1 and enc['answer_mask'][row, pos]
  chat = vlm_yes.Prompter(tokenizer=tok, mode='pointwise', image_token_id=cfg.image_token_id,
                          tokens_per_image=4, max_len=40, template='<image> {prompt} ?',
                          chat_template='{% for m in messages %}{{ m.content }} .{% endfor %}'
                                        '{% if add_generation_prompt %} answer :{% endif %}')
  assert chat.text('a digit') == '<image> a digit ? . answer :'
  with pytest.raises(ValueError, match='one token'):
    vlm_yes.Prompter(tokenizer=tok, mode='pointwise', image_token_id=0, tokens_per_image=4,
                     max_len=40, template='<image> x', yes=('yes no',))


def test_p_yes_in_unit_interval_and_pixel_gradient():
  images, labels = _images(4)
  prompts = [digits.prompt_for_label(d) for d in range(10)]
  batch = {'labels': labels, 'ref_pixels': images[::-1]}
  rewards = []   # pointwise with the full-vocabulary softmax, pairwise with σ(l_yes − l_no)
  for mode, norm in (('pointwise', 'full'), ('pairwise', 'two_way')):
    graphdef, params, _, prompter, spec, _ = _setup(mode)
    rewards.append(vlm_yes.vlm_yes_reward(graphdef, params, prompter, spec, normalization=norm,
                                          prompts=prompts))
  scores = jax.jit(lambda rws, x: [rw({'pixels': x}, batch) for rw in rws])(rewards, images)
  for r in scores:
    assert r.shape == (4,) and r.dtype == jnp.float32
    assert np.all((np.asarray(r) > 0) & (np.asarray(r) < 1)), r
    assert np.ptp(np.asarray(r)) > 0            # the images matter
  pairwise = rewards[-1]
  g = jax.jit(jax.grad(lambda x: pairwise({'pixels': x}, batch).sum()))(images)
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_sharded_scoring_equals_single_device():
  graphdef, params, state, prompter, spec, _ = _setup('pairwise')
  images, labels = _images(8, seed=1)
  enc = prompter.encode([digits.prompt_for_label(int(d)) for d in labels])
  batch = {'vlm_ids': jnp.asarray(enc['ids']), 'vlm_pos': jnp.asarray(enc['pos']),
           'ref_pixels': images[::-1]}
  reward = vlm_yes.vlm_yes_reward(graphdef, params, prompter, spec)
  score = lambda rw, x, b: rw({'pixels': x}, b)
  single = np.asarray(jax.jit(score)(reward, images, batch))
  mesh = mesh_lib.create_mesh(dict(axes=('data', 'fsdp', 'tensor'), ici=(2, 2, 2)))
  rules = sharding_lib.DEFAULT_RULES
  pshard = nnx.to_pure_dict(sharding_lib.state_shardings(state, mesh, rules))
  sharded_params = jax.device_put(reward.params['model'], pshard)
  reward_s = vlm_yes.vlm_yes_reward(graphdef, sharded_params, prompter, spec)
  batch_s = sharding_lib.host_to_global(jax.device_get(batch), mesh, rules)
  images_s = sharding_lib.host_to_global(np.asarray(images), mesh, rules)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    out = jax.jit(score)(reward_s, images_s, batch_s)
  assert isinstance(out.sharding, NamedSharding)
  assert len(sharded_params['lm']['embed']['embedding'].sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), single, atol=2e-6)


def test_export_roundtrip(tmp_path):
  from rewarddance_jax.rewards import vlm_export
  graphdef, params, _, prompter, spec, cfg = _setup('pairwise')
  vlm_export.save_vlm_reward(str(tmp_path), params, cfg, prompter.tokenizer,
                             {'pairwise': prompter}, spec)
  _, loaded, cfg2, _, prompters, spec2 = vlm_export.load_vlm_parts(str(tmp_path))
  assert cfg2 == cfg and spec2 == spec
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))
  p2 = prompters['pairwise']
  prompts = ['a handwritten digit two']
  np.testing.assert_array_equal(p2.encode(prompts)['ids'], prompter.encode(prompts)['ids'])
