"""VLM reward trainer: LoRA on the LM (only LoRA trains, merged export = unmerged forward, the loss
falls), CoT rationale losses and data, and the pairwise direction of a briefly trained tiny VLM."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.digits import reward_vlm
from rewarddance_jax.data import digits, vlm_rationales
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.rewards import vlm_export, vlm_losses, vlm_yes
from rewarddance_jax.train import common, vlm_lora, vlm_reward


LN2, LN3 = math.log(2.0), math.log(3.0)


def _setup(arg, **rm):
  """(config, tokenizer, VLMConfig, tile spec, prompters, mesh, rules) of a one-device run."""
  c = reward_vlm.get_config(arg)
  c.mesh.num_devices = 1
  c.reward_model.update(rm)
  tok = tokenizer_lib.build_digits_tokenizer()
  cfg = vlm_reward.model_config(c, tok)
  spec = vlm_yes.TileSpec(**c.tiles.to_dict())
  prompters = vlm_reward.build_prompters(c, tok, cfg, spec)
  mesh, rules = common.setup_mesh(c)
  return c, tok, cfg, spec, prompters, mesh, rules


def test_lora_shardings_follow_base_kernels():
  mesh = mesh_lib.create_mesh(dict(axes=('data', 'fsdp', 'tensor'), ici=(1, 4, 2)))
  c, tok, cfg, *_ = _setup('lora=2')
  from rewarddance_jax.models.vlm import InternVL  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  _, (abstract,) = sharding_lib.abstract_state(lambda: InternVL(cfg, rngs=nnx.Rngs(0)), mesh,
                                               sharding_lib.DEFAULT_RULES)
  pshard = nnx.to_pure_dict(sharding_lib.state_shardings(abstract, mesh,
                                                         sharding_lib.DEFAULT_RULES))
  lora = vlm_lora.VLMLoRA.from_config(c.reward_model.lora)
  tshard, fshard = lora.shardings(nnx.to_pure_dict(abstract), pshard)
  assert set(tshard) == {'lora', 'vision', 'projector'} and 'vision' not in fshard
  for name in ('q', 'down'):
    base = pshard['lm']['layers'][1][name]['kernel'].spec
    ab = tshard['lora']['lm']['layers'][1][name]['kernel']
    assert ab['a'].spec == P(base[0], None) and ab['b'].spec == P(None, base[1])
  frozen_vision = vlm_lora.VLMLoRA.from_config(dict(c.reward_model.lora, train_vision=False))
  tshard, fshard = frozen_vision.shardings(nnx.to_pure_dict(abstract), pshard)
  assert set(tshard) == {'lora'} and set(fshard) == {'vision', 'projector', 'lm'}
  assert vlm_lora.VLMLoRA.from_config(dict(rank=0)) is None
  with pytest.raises(ValueError, match=r"lora has unknown key\(s\) \['rnak'\]"):
    vlm_lora.VLMLoRA.from_config(dict(rank=2, rnak=3))


def test_rationale_loss_hand_values():
  # Answer "yes" then two rationale tokens; the last position is padding.
  logits = jnp.array([[[0.0, 0.0], [0.0, LN3], [LN3, 0.0], [5.0, -5.0]]])
  targets, mask = jnp.array([[0, 1, 1, 0]]), jnp.array([[1, 1, 1, 0]])
  nll = [LN2, math.log(4 / 3), math.log(4.0)]
  # First answer token α = 0.1, rationale tokens weight 1; mean over the n = 3 tokens.
  got = vlm_losses.token_ce(logits, targets, mask, first_token_weight=0.1, rest_weight=1.0)
  np.testing.assert_allclose(got, (0.1 * nll[0] + nll[1] + nll[2]) / 3, rtol=1e-6)
  # PaCo normalisation: the rationale tokens get n(1 − α)/(n − 1) = 1.35.
  got = vlm_losses.token_nll_rows(logits, targets, mask, first_token_weight=0.1)
  np.testing.assert_allclose(got, [(0.1 * nll[0] + 1.35 * (nll[1] + nll[2])) / 3], rtol=1e-6)


def test_digit_rationales_mark_answer_and_rationale_tokens():
  c, tok, cfg, spec, prompters, *_ = _setup('rationale')
  split = digits.load_split('train')
  batch = next(vlm_reward.PairBatches(np.asarray(split['images']), np.asarray(split['labels']),
                                      prompters, batch_size=8, seed=0, graded_fraction=0.25,
                                      rationale=True))
  word = lambda i: tok.id_to_token(int(i))
  for row in range(8):
    pos = int(batch['p_pos'][row])
    answer = [word(t) for t, m in zip(batch['q_targets'][row], batch['q_mask'][row]) if m]
    assert answer[0] in ('yes', 'no') and answer[1:3] == ['.', 'image'] and len(answer) == 13
    for ids, tg, mk, first in (('p_ids', 'p_targets', 'p_mask', 'yes'),
                               ('p_ids_l', 'p_targets_l', 'p_mask_l', 'no')):
      assert word(batch[tg][row, pos]) == first and batch[mk][row, pos]     # P(yes) position
      assert batch[mk][row].sum() == 7 and word(batch[ids][row, pos + 1]) == first
  # The digit prompt and image labels agree with the pointwise rationale words.
  assert vlm_rationales.digit_pointwise_answer(7, 3) == 'no . the image is a three'
  assert (vlm_rationales.digit_pairwise_answer(7, 1, True)
          == 'yes . image 2 is a seven , image 1 is a one')


def test_rationale_jsonl_reader(tmp_path):
  c, tok, cfg, spec, prompters, *_ = _setup('rationale')
  for name in ('a', 'b'):
    np.save(tmp_path / f'{name}.npy', np.full((16, 16, 1), 0.5, np.float32))
  good = {'prompt': 'a handwritten digit two', 'image_1': 'a.npy', 'image_2': 'b.npy',
          'answer': 'yes', 'rationale': '. image 2 is a two'}
  path = tmp_path / 'pairs.jsonl'
  path.write_text(json.dumps(good) + '\n\n' + json.dumps(dict(good, answer='no')) + '\n')
  batches = vlm_rationales.JsonlRationaleBatches(str(path), 'pairwise', prompters['pairwise'], 2)
  batch = next(batches)
  assert batch['q_ref'].shape == (2, 16, 16, 1) and batch['q_mask'].sum(1).tolist() == [7, 7]
  assert sorted(tok.id_to_token(int(t)) for t in batch['q_targets'][batch['q_mask']][::7]) == [
      'no', 'yes']
  bad_lines = {'{"prompt": "x", "image_1": "a.npy",': 'not valid JSON',
               json.dumps({k: v for k, v in good.items() if k != 'answer'}):
                   "missing \\['answer'\\]",
               json.dumps(dict(good, answer='maybe')): 'answer',
               json.dumps(dict(good, image_2='nope.npy')): 'not found'}
  for line, why in bad_lines.items():
    path.write_text(json.dumps(good) + '\n\n' + line + '\n')
    with pytest.raises(ValueError, match=rf'^{re.escape(str(path))}:3: .*{why}'):
      vlm_rationales.read_jsonl(str(path), 'pairwise')


class _BrightnessPairs:
  """Pairwise batches where the better image is the brighter one: two digit images scaled by
  brightness factors 0.3 to 0.4 apart; "yes" when image 2 is the brighter (order drawn at
  random)."""

  def __init__(self, split, prompter, batch_size, seed):
    data = digits.load_split(split)
    self.images, self.labels = np.asarray(data['images']), np.asarray(data['labels'])
    self.b, self.rng = batch_size, np.random.default_rng(seed)
    prompts = [digits.prompt_for_label(d) for d in range(10)]
    self.enc = {a: prompter.encode(prompts, [a] * 10) for a in ('yes', 'no')}

  def pair(self):
    """(dim, bright, label of the bright image), each (B, ...)."""
    b, rng = self.b, self.rng
    i, j = rng.integers(0, len(self.images), (2, b))
    lo = rng.uniform(0.1, 0.6, b)
    hi = lo + rng.uniform(0.3, 0.4, b)
    scale = lambda x, s: x * s[:, None, None, None].astype(np.float32)
    return scale(self.images[i], lo), scale(self.images[j], hi), self.labels[j]

  def __next__(self):
    dim, bright, lab = self.pair()
    swap = self.rng.integers(0, 2, self.b).astype(bool)        # True: the brighter is image 2
    pick = lambda k: np.where(swap[:, None], self.enc['yes'][k][lab], self.enc['no'][k][lab])
    where = lambda a, b: np.where(swap[:, None, None, None], a, b)
    return {'q_ids': pick('ids'), 'q_targets': pick('targets'), 'q_mask': pick('answer_mask'),
            'q_ref': where(dim, bright), 'q_gen': where(bright, dim)}


STEPS = 100


@pytest.fixture(scope='module')
def trained():
  """One short trainer run shared by the tests below: a tiny InternVL (2 vision + 2 LM layers,
  width 32, scanned) with rank-8 LoRA on the LM kernels and the vision side frozen, trained by
  `vlm_reward.make_train_step` on the pairwise loss only, on "better = brighter" pairs."""
  old = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  try:
    c, tok, cfg, spec, prompters, mesh, rules = _setup(
        'lora=8,freeze_vision', pointwise_weight=0.0, caption_weight=0.0)
    c.vlm.scan_layers = True
    c.vlm.vision.update(hidden_size=32, intermediate_size=64)
    c.vlm.text.update(hidden_size=32, intermediate_size=64)
    c.optax.update(lr=3e-3, warmup_steps=0, decay_steps=STEPS)
    cfg = vlm_reward.model_config(c, tok)
    graphdef, state, _, tx, to_model = vlm_reward.build_state(c, cfg, mesh, rules)
    init = jax.device_get(state)
    p = prompters['pairwise']
    step = jax.jit(vlm_reward.make_train_step(graphdef, tx, spec, p.yes_ids, p.no_ids,
                                              c.reward_model, to_model))
    batches = _BrightnessPairs('train', p, 16, seed=0)
    losses = []
    with common.mesh_context(mesh, rules):
      for i in range(STEPS):
        state, m = step(state, next(batches), jax.random.key(i))
        assert int(m['skipped']) == 0
        losses.append(float(m['loss']))
  finally:
    jax.config.update('jax_disable_most_optimizations', old)
  return dict(graphdef=graphdef, init=init, state=state, to_model=to_model, losses=losses,
              tok=tok, cfg=cfg, spec=spec, prompters=prompters)


def test_lora_trains_only_the_lora(trained):
  state, init, losses = trained['state'], trained['init'], trained['losses']
  assert set(state['params']) == {'lora'}                   # vision frozen by the flag
  assert set(state['frozen']) == {'vision', 'projector', 'lm'}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['frozen']), init['frozen'])
  paths = ['/'.join(str(getattr(k, 'key', k)) for k in p) for p, _ in
           jax.tree_util.tree_flatten_with_path(state['params']['lora'])[0]]
  assert sorted(paths) == sorted(f'lm/layers/{n}/kernel/{ab}' for n in
                                 ('q', 'k', 'v', 'o', 'gate', 'up', 'down') for ab in 'ab')
  b = state['params']['lora']['lm']['layers']['q']['kernel']['b']
  assert b.shape[0] == 2 and np.abs(np.asarray(b)).max() > 0      # b starts at zero: it trained
  assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.2, losses[::10]


def test_lora_merged_export_equals_unmerged_forward(trained, tmp_path):
  state, to_model, spec, prompters = (trained[k] for k in ('state', 'to_model', 'spec',
                                                            'prompters'))
  merged = jax.jit(to_model)(state['params'], state['frozen'])
  base = trained['init']['frozen']['lm']['layers']['q']['kernel']
  assert not np.allclose(merged['lm']['layers']['q']['kernel'], base)
  uses = {m: prompters[m] for m in ('pointwise', 'pairwise')}
  vlm_export.save_vlm_reward(str(tmp_path), merged, trained['cfg'], trained['tok'], uses, spec)
  prompts = [digits.prompt_for_label(d) for d in range(10)]
  loaded = vlm_export.load_vlm_reward(str(tmp_path), 'pairwise', 'two_way', prompts=prompts)
  held = digits.load_split('heldout')
  x, ref, lab = held['images'][:8], held['images'][8:16], held['labels'][:8]
  got = jax.jit(lambda r: r({'pixels': x}, {'labels': lab, 'ref_pixels': ref}))(loaded)
  enc = prompters['pairwise'].encode([prompts[d] for d in lab])

  @jax.jit
  def unmerged(trainable, frozen):       # the training-time forward: LoRA merged inside
    tiles = vlm_yes.vlm_tiles(spec, 'pairwise', x, ref)
    logits = vlm_yes.answer_logits(trained['graphdef'], to_model(trainable, frozen),
                                   enc['ids'], enc['pos'], tiles)
    return vlm_losses.yes_probability(logits, prompters['pairwise'].yes_ids,
                                      prompters['pairwise'].no_ids, 'two_way')

  np.testing.assert_allclose(got, unmerged(state['params'], state['frozen']), atol=1e-6)
  assert np.ptp(np.asarray(got)) > 0


def test_pairwise_reward_direction_after_training(trained):
  merged = jax.jit(trained['to_model'])(trained['state']['params'], trained['state']['frozen'])
  prompter = trained['prompters']['pairwise']
  reward = vlm_yes.vlm_yes_reward(trained['graphdef'], merged, prompter, trained['spec'],
                                  prompts=[digits.prompt_for_label(d) for d in range(10)])
  dim, bright, lab = _BrightnessPairs('heldout', prompter, 128, seed=1).pair()
  score = jax.jit(lambda r, gen, ref: r({'pixels': gen}, {'labels': lab, 'ref_pixels': ref}))
  up = np.asarray(score(reward, bright, dim))      # generated = the better (brighter) image
  down = np.asarray(score(reward, dim, bright))    # the same pairs in the other order
  assert np.mean(up > down) >= 0.85, np.mean(up > down)
  assert np.mean(up > 0.5) >= 0.75 and np.mean(down < 0.5) >= 0.75, (up, down)
  assert np.mean(up - down) > 0.15
