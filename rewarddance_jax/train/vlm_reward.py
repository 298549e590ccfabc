"""RewardDance reward-model training on the digits (`trainer: vlm_reward`), on the shared loop.

One VLM learns both uses (docs/algorithms.md §4.3):
  1. pointwise: prompt "does this image show <digit prompt> ?"; pairs (x_w matching the prompt,
     x_l another digit); loss = −log σ(s_w − s_l) + λ·[CE(yes | x_w) + CE(no | x_l)],
     s = log P(yes). A fraction `graded_fraction` of the pairs are the same matching digit at two
     corruption levels (less corrupted preferred, BT only, no CE) so that P(yes) falls gradually
     as an image degrades: RL on generated digits needs a graded signal, not a 0/1 one (our choice);
  2. pairwise: image 1 = reference, image 2 = generated, "is image 2 better than image 1 ?";
     (matching ≻ non-matching) with the order swapped at random: answer "yes" when the matching
     image is image 2, else "no"; loss = next-token CE on the answer (+ CoT tokens when given,
     first-token weight α as a knob);
  3. captioning (auxiliary, weight `caption_weight`, our choice): "<image> a handwritten digit" →
     next-token CE on the number word. It is the VLM's usual image-text pretraining stage in
     miniature: yes/no answers alone tell the vision encoder little about digit identity
     (docs/digits_pipeline.md);
  total = w_p · pointwise + w_q · pairwise + caption_weight · caption (w_p = `pointwise_weight`,
  w_q = `pairwise_weight`, default 1; a term of weight 0 is not computed). AdamW; a non-finite
  step is skipped.
CoT rationales (`rationale = True`, data/vlm_rationales.py): the answers become
  "yes . the image is a seven" (pointwise) and "yes . image 2 is a seven , image 1 is a three"
  (pairwise); the CE terms run over answer + rationale tokens (first token weight
  `first_token_weight`, the others PaCo-normalised or `rationale_token_weight`); BT and every
  reward still read P(yes) at the answer position only.
LoRA (`lora = dict(rank, alpha, targets, train_vision)`, rank 0 = full training,
  train/vlm_lora.py): only the LoRA of the LM kernels (+ vision and projector with
  `train_vision`) is trained; state = {'params': trainable, 'opt_state', 'frozen': the rest}.
Held-out metrics (digits held-out split) every `eval_every` steps and at the end:
  pointwise_acc (P(yes) > 0.5 ⇔ the digit matches), pointwise_rank_acc (P(yes|match) >
  P(yes|other)), pairwise_acc (both orders of each (match, other) pair answered right).
Augmentation (`reward_model.augment`, data/augment.py): every real digit shown is warped
  (rotation, zoom, shift), sometimes thickened/thinned or blurred, and noised, so the reward holds
  on the generator's digits, not only on clean real ones.
At the end the model is exported to `workdir/reward_model` (rewards/vlm_export.py) for RL.
"""

from __future__ import annotations

import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from rewarddance_jax.config_lib import check_keys
from rewarddance_jax.data import augment as augment_lib
from rewarddance_jax.data import digits
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.data import vlm_rationales
from rewarddance_jax.models.vlm import InternVL
from rewarddance_jax.models.vlm.config import vlm_config
from rewarddance_jax.parallel import rng as rng_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.parallel.trees import count_params
from rewarddance_jax.rewards import vlm_export, vlm_losses, vlm_yes
from rewarddance_jax.train import common, loop as loop_lib, optim, vlm_lora


def build_prompters(config, tok, cfg, tile_spec) -> dict:
  n_tiles = tile_spec(np.zeros((1, tile_spec.size, tile_spec.size, 1), np.float32)).shape[1]
  rm = config.reward_model
  return {mode: vlm_yes.Prompter(
      tokenizer=tok, mode=mode, image_token_id=cfg.image_token_id,
      tokens_per_image=n_tiles * cfg.tokens_per_tile, max_len=int(rm.max_len),
      criteria=str(rm.criteria), template=rm.templates[mode], pad_id=tokenizer_lib.PAD_ID)
          for mode in ('pointwise', 'pairwise')} | {'caption': vlm_yes.Prompter(
      tokenizer=tok, mode='pointwise', image_token_id=cfg.image_token_id,
      tokens_per_image=n_tiles * cfg.tokens_per_tile, max_len=int(rm.max_len),
      template=rm.templates['caption'], pad_id=tokenizer_lib.PAD_ID)}


def corrupt(rng: np.random.Generator, images: np.ndarray, level: np.ndarray) -> np.ndarray:
  """Blend toward uniform noise: (1 − c)·x + c·u, c = level (B,) in [0, 1]."""
  noise = rng.uniform(0.0, 1.0, images.shape).astype(np.float32)
  c = level.reshape(-1, 1, 1, 1).astype(np.float32)
  return (1.0 - c) * images + c * noise


class PairBatches:
  """Deterministic batches: batch k draws from rng(seed, k); state = {'step': k}."""

  def __init__(self, images, labels, prompters, *, batch_size: int, seed: int,
               graded_fraction: float, rationale: bool = False, augment=None):
    """augment: keyword arguments of `data.augment.digit_augment` (None: its defaults)."""
    self.images, self.labels = images, labels
    self.augment = dict(augment or {})
    check_keys(self.augment,
               set(inspect.signature(augment_lib.digit_augment).parameters) - {'rng', 'images'},
               'config.reward_model.augment')
    self.by_label = [np.nonzero(labels == d)[0] for d in range(10)]
    self.prompters, self.b, self.seed = prompters, batch_size, seed
    self.graded = int(round(graded_fraction * batch_size))
    self.step = 0
    prompts = [digits.prompt_for_label(d) for d in range(10)]
    self.point = prompters['pointwise'].encode(prompts)
    yes_no = {a: prompters['pairwise'].encode(prompts, [a] * 10) for a in ('yes', 'no')}
    self.pair = yes_no
    self.caption = prompters['caption'].encode(['caption'] * 10, list(digits.NUMBER_WORDS))
    self.rationale = rationale
    if rationale:   # tables [prompt digit, image digit] and [match, other, match is image 2]
      grid = [(p, i) for p in range(10) for i in range(10)]
      enc = prompters['pointwise'].encode(
          [prompts[p] for p, _ in grid],
          [vlm_rationales.digit_pointwise_answer(p, i) for p, i in grid])
      self.point_cot = {k: v.reshape(10, 10, *v.shape[1:]) for k, v in enc.items()}
      grid = [(m, o, s) for m in range(10) for o in range(10) for s in (0, 1)]
      enc = prompters['pairwise'].encode(
          [prompts[m] for m, _, _ in grid],
          [vlm_rationales.digit_pairwise_answer(m, o, bool(s)) for m, o, s in grid])
      self.pair_cot = {k: v.reshape(10, 10, 2, *v.shape[1:]) for k, v in enc.items()}

  def _pick(self, rng, ds):
    return np.array([rng.choice(self.by_label[d]) for d in ds])

  def _augment(self, rng, images):
    return augment_lib.digit_augment(rng, images, **self.augment)

  def sample(self, rng):
    b = self.b
    d = rng.integers(0, 10, b)
    other = (d + rng.integers(1, 10, b)) % 10
    w = self._augment(rng, self.images[self._pick(rng, d)])
    l = self._augment(rng, self.images[self._pick(rng, other)])
    ce = np.ones(b, np.float32)
    g = self.graded
    if g:  # graded pairs: the same matching digit, less vs more corrupted, BT only
      lo = rng.uniform(0.0, 0.6, g)
      hi = np.minimum(lo + rng.uniform(0.15, 0.6, g), 1.0)
      l[:g] = corrupt(rng, w[:g], hi)
      w[:g] = corrupt(rng, w[:g], lo)
      ce[:g] = 0.0
    dq = rng.integers(0, 10, b)
    oq = (dq + rng.integers(1, 10, b)) % 10
    match = self._augment(rng, self.images[self._pick(rng, dq)])
    nonmatch = self._augment(rng, self.images[self._pick(rng, oq)])
    swap = rng.integers(0, 2, b).astype(bool)          # True: the matching image is image 2
    ref = np.where(swap[:, None, None, None], nonmatch, match)
    gen = np.where(swap[:, None, None, None], match, nonmatch)
    yes, no = self.pair['yes'], self.pair['no']
    pick = lambda k: np.where(swap[:, None], yes[k][dq], no[k][dq])
    out = {'p_ids': self.point['ids'][d], 'p_pos': self.point['pos'][d], 'p_w': w, 'p_l': l,
           'p_ce': ce, 'q_ids': pick('ids'), 'q_targets': pick('targets'),
           'q_mask': pick('answer_mask'), 'q_ref': ref, 'q_gen': gen,
           'c_ids': self.caption['ids'][dq], 'c_targets': self.caption['targets'][dq],
           'c_mask': self.caption['answer_mask'][dq], 'c_img': match}
    if self.rationale:
      pc, qc = self.point_cot, self.pair_cot
      s = swap.astype(np.int32)
      out.update(p_ids=pc['ids'][d, d], p_targets=pc['targets'][d, d],
                 p_mask=pc['answer_mask'][d, d], p_ids_l=pc['ids'][d, other],
                 p_targets_l=pc['targets'][d, other], p_mask_l=pc['answer_mask'][d, other],
                 q_ids=qc['ids'][dq, oq, s], q_targets=qc['targets'][dq, oq, s],
                 q_mask=qc['answer_mask'][dq, oq, s])
    return out

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.step])
    self.step += 1
    return self.sample(rng)

  def get_state(self):
    return {'step': self.step}

  def set_state(self, state):
    self.step = int(state['step'])


def make_losses(graphdef, tile_spec, yes_ids, no_ids, rm_cfg):
  lam = float(rm_cfg.lambda_ce)
  alpha = rm_cfg.get('first_token_weight', None)
  alpha = None if alpha is None else float(alpha)
  rest = rm_cfg.get('rationale_token_weight', None)
  rest = None if rest is None else float(rest)
  norm = str(rm_cfg.get('train_normalization', 'full'))

  def pointwise_cot(params, batch):
    """BT on log P(yes) at `p_pos` + λ·token CE over answer + rationale of x_w and x_l."""
    ids = jnp.concatenate([batch['p_ids'], batch['p_ids_l']])
    pix = jnp.concatenate([batch['p_w'], batch['p_l']])
    logits = nnx.merge(graphdef, params)(ids, tile_spec(pix))
    pos = jnp.concatenate([batch['p_pos'], batch['p_pos']])
    at_pos = jnp.take_along_axis(logits, pos[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    s_w, s_l = jnp.split(vlm_losses.log_yes_no(at_pos, yes_ids, no_ids, norm)[0], 2)
    lw, ll = jnp.split(logits, 2)
    ce_w = vlm_losses.token_nll_rows(lw, batch['p_targets'], batch['p_mask'], alpha, rest)
    ce_l = vlm_losses.token_nll_rows(ll, batch['p_targets_l'], batch['p_mask_l'], alpha, rest)
    bt = -jax.nn.log_sigmoid(s_w - s_l)
    return jnp.mean(bt + lam * batch['p_ce'] * (ce_w + ce_l))

  def pointwise(params, batch):
    if 'p_targets' in batch:
      return pointwise_cot(params, batch)
    ids = jnp.concatenate([batch['p_ids'], batch['p_ids']])
    pos = jnp.concatenate([batch['p_pos'], batch['p_pos']])
    pix = jnp.concatenate([batch['p_w'], batch['p_l']])
    logits = vlm_yes.answer_logits(graphdef, params, ids, pos, tile_spec(pix))
    lw, ll = jnp.split(logits, 2)
    s_w, _ = vlm_losses.log_yes_no(lw, yes_ids, no_ids, norm)
    s_l, no_l = vlm_losses.log_yes_no(ll, yes_ids, no_ids, norm)
    # pointwise_bt_loss with a per-pair CE weight (0 on the graded pairs).
    bt = -jax.nn.log_sigmoid(s_w - s_l)
    return jnp.mean(bt + lam * batch['p_ce'] * (-s_w - no_l))

  def pairwise(params, batch):
    tiles = jnp.concatenate([tile_spec(batch['q_ref']), tile_spec(batch['q_gen'])], axis=1)
    model = nnx.merge(graphdef, params)
    logits = model(batch['q_ids'], tiles)
    return vlm_losses.token_ce(logits, batch['q_targets'], batch['q_mask'], alpha, rest)

  def caption(params, batch):
    logits = nnx.merge(graphdef, params)(batch['c_ids'], tile_spec(batch['c_img']))
    return vlm_losses.token_ce(logits, batch['c_targets'], batch['c_mask'])

  return pointwise, pairwise, caption


def make_train_step(graphdef, tx, tile_spec, yes_ids, no_ids, rm_cfg, to_model=None):
  """The pure step `(state, batch, key) -> (state, metrics)`. `to_model(params, frozen)` gives
  the VLM params from the trainable tree and `state['frozen']` (LoRA, `build_state`); None: the
  trainable tree is the VLM params."""
  pointwise, pairwise, caption = make_losses(graphdef, tile_spec, yes_ids, no_ids, rm_cfg)
  weights = (float(rm_cfg.get('pointwise_weight', 1.0)), float(rm_cfg.get('pairwise_weight', 1.0)),
             float(rm_cfg.get('caption_weight', 0.0)))

  def loss_fn(params, frozen, batch):
    model_params = params if to_model is None else to_model(params, frozen)
    terms = [fn(model_params, batch) if w else jnp.zeros((), jnp.float32)
             for fn, w in zip((pointwise, pairwise, caption), weights)]
    return sum(w * t for w, t in zip(weights, terms) if w), tuple(terms)

  def step(state, batch, key):
    del key
    frozen = state.get('frozen')
    (loss, (lp, lq, lc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], frozen, batch)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    old = {'params': state['params'], 'opt_state': state['opt_state']}
    new = {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state}
    new, skipped = loop_lib.finite_or_skip(old, new, loss, grads)
    if frozen is not None:
      new['frozen'] = frozen
    return new, {'loss': loss, 'loss_pointwise': lp, 'loss_pairwise': lq, 'loss_caption': lc,
                 'grad_norm': optax.tree.norm(grads), 'skipped': skipped}

  return step


def heldout_metrics(graphdef, params, prompters, tile_spec, *, seed: int, split_seed: int = 0,
                    batch: int = 120) -> dict:
  """Held-out accuracies of the pointwise and pairwise uses (module docstring)."""
  data = digits.load_split('heldout', seed=split_seed)
  images, labels = np.asarray(data['images']), np.asarray(data['labels'])
  rng = np.random.default_rng(seed)
  other_label = (labels + rng.integers(1, 10, len(labels))) % 10
  by_label = [np.nonzero(labels == d)[0] for d in range(10)]
  other_img = images[[rng.choice(by_label[d]) for d in other_label]]
  prompts = [digits.prompt_for_label(d) for d in range(10)]
  reward = {m: vlm_yes.vlm_yes_reward(graphdef, params, prompters[m], tile_spec, prompts=prompts)
            for m in ('pointwise', 'pairwise')}
  score = jax.jit(lambda r, pix, lab, ref: r({'pixels': pix},
                                             {'labels': lab, 'ref_pixels': ref}))
  outs = {k: [] for k in ('match', 'other', 'gen_match', 'gen_other')}
  n = len(labels) // batch * batch
  for i in range(0, n, batch):
    sl = slice(i, i + batch)
    lab, img, oth = labels[sl], images[sl], other_img[sl]
    outs['match'].append(score(reward['pointwise'], img, lab, img))
    outs['other'].append(score(reward['pointwise'], oth, lab, img))
    outs['gen_match'].append(score(reward['pairwise'], img, lab, oth))
    outs['gen_other'].append(score(reward['pairwise'], oth, lab, img))
  o = {k: np.concatenate([np.asarray(x) for x in v]) for k, v in outs.items()}
  return {
      'pointwise_acc': float(np.mean(np.concatenate([o['match'] > 0.5, o['other'] < 0.5]))),
      'pointwise_rank_acc': float(np.mean(o['match'] > o['other'])),
      'pairwise_acc': float(np.mean((o['gen_match'] > 0.5) & (o['gen_other'] < 0.5))),
      'pairwise_order_acc': float(np.mean(o['gen_match'] > o['gen_other'])),
      'p_yes_match': float(np.mean(o['match'])), 'p_yes_other': float(np.mean(o['other'])),
  }


def model_config(config, tok):
  """The VLMConfig of `config.vlm` with the vocabulary and image id of the digits tokenizer."""
  n_vocab = tokenizer_lib.vocab_size(tok)
  model_cfg = dict(config.vlm.to_dict())
  model_cfg['text'] = dict(model_cfg['text'], vocab_size=n_vocab + 1)
  model_cfg['image_token_id'] = n_vocab          # one id past the words: the image placeholder
  return vlm_config(model_cfg)


def build_state(config, cfg, mesh, rules):
  """(graphdef, state, shardings, tx, to_model), every array created sharded.

  Full training: state = {'params': VLM params, 'opt_state'}, to_model = None. LoRA
  (`config.reward_model.lora.rank` > 0): state = {'params': {'lora', *dense}, 'opt_state',
  'frozen'}, to_model(params, frozen) = the merged VLM params (train/vlm_lora.py).
  """
  graphdef, (params,), (pshard,) = sharding_lib.sharded_init(
      lambda: InternVL(cfg, rngs=nnx.Rngs(rng_lib.key(config.seed, 'vlm_init'))), mesh, rules)
  logging.info('VLM reward model: %.3fM params.', count_params(params) / 1e6)
  lora = vlm_lora.VLMLoRA.from_config(config.reward_model.get('lora'))
  state, shardings, to_model = {}, {}, None
  if lora is not None:
    tshard, fshard = lora.shardings(params, pshard)
    key = rng_lib.key(config.seed, 'lora_init')
    params, state['frozen'] = jax.jit(lambda p: lora.init(p, key), out_shardings=(tshard, fshard),
                                      donate_argnums=0)(params)
    pshard, shardings['frozen'] = tshard, fshard
    to_model = lora.model_params
    logging.info('LoRA rank %d on %s: %d trainable params (vision %s), %d frozen.', lora.rank,
                 lora.targets, count_params(params), 'trained' if lora.train_vision else 'frozen',
                 count_params(state['frozen']))
  tx = optim.make_optimizer(config.optax)
  opt_shard = optim.opt_state_shardings(tx, params, pshard, mesh)
  state.update(params=params, opt_state=jax.jit(tx.init, out_shardings=opt_shard)(params))
  shardings.update(params=pshard, opt_state=opt_shard)
  return graphdef, state, shardings, tx, to_model


def model_params_fn(to_model):
  """state → the VLM params (jitted merge under LoRA)."""
  if to_model is None:
    return lambda st: st['params']
  merged = jax.jit(to_model)
  return lambda st: merged(st['params'], st['frozen'])


def train(config, workdir: str) -> dict:
  mesh, rules = common.setup_mesh(config)
  tok = tokenizer_lib.load_or_build(workdir)
  cfg = model_config(config, tok)
  tile_spec = vlm_yes.TileSpec(**config.tiles.to_dict())
  prompters = build_prompters(config, tok, cfg, tile_spec)
  yes_ids, no_ids = prompters['pointwise'].yes_ids, prompters['pointwise'].no_ids
  graphdef, state, shardings, tx, to_model = build_state(config, cfg, mesh, rules)
  model_params = model_params_fn(to_model)

  train_split = digits.load_split('train', seed=0)
  rm = config.reward_model
  data_iter = PairBatches(np.asarray(train_split['images']), np.asarray(train_split['labels']),
                          prompters, batch_size=int(config.data.batch_size),
                          seed=int(config.seed), graded_fraction=float(rm.graded_fraction),
                          rationale=bool(rm.get('rationale', False)),
                          augment=rm.get('augment'))

  def to_device(batch):
    return sharding_lib.host_to_global(batch, mesh, rules)

  def eval_hook(st, step):
    params = model_params(st)
    m = heldout_metrics(graphdef, params, prompters, tile_spec,
                        seed=rng_lib.seed_for(config.seed, 'heldout_pairs'))
    logging.info('step %d held-out: %s', step, {k: round(v, 4) for k, v in m.items()})
    if step == int(config.total_steps):
      uses = {m: prompters[m] for m in ('pointwise', 'pairwise')}
      path = vlm_export.save_vlm_reward(os.path.join(workdir, 'reward_model'), params, cfg,
                                        tok, uses, tile_spec)
      logging.info('Exported the reward model to %s', path)
    return m

  step_fn = make_train_step(graphdef, tx, tile_spec, yes_ids, no_ids, config.reward_model,
                            to_model)
  hooks = [(int(config.eval_every), eval_hook)]
  state, last = common.run_loop(
      config, workdir, desc='vlm_reward', state=state, shardings=shardings, step_fn=step_fn,
      data_iter=data_iter, to_device=to_device, mesh=mesh, rules=rules, hooks=hooks)
  return {'step': last}
