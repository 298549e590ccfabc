"""RewardDance reward-model training on the digits (`trainer: vlm_reward`), on the shared loop.

One VLM learns both uses (ALGORITHMS.md §4.3):
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
     miniature; without it the from-scratch model sat at chance for hundreds of steps, because
     the yes/no answers alone give the vision encoder little signal about digit identity;
  total = pointwise + pairwise + caption_weight · caption. AdamW; a non-finite step is skipped.
Held-out metrics (digits held-out split) every `eval_every` steps and at the end:
  pointwise_acc (P(yes) > 0.5 ⇔ the digit matches), pointwise_rank_acc (P(yes|match) >
  P(yes|other)), pairwise_acc (both orders of each (match, other) pair answered right).
At the end the model is exported to `workdir/reward_model` (rewards/vlm_export.py) for RL.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from rewarddance_jax.data import digits
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.models.vlm import InternVL
from rewarddance_jax.models.vlm.config import vlm_config
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.rewards import vlm_export, vlm_losses, vlm_yes
from rewarddance_jax.train import common, loop as loop_lib, optim


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


def augment(rng: np.random.Generator, images: np.ndarray) -> np.ndarray:
  """Shift by up to ±1 pixel and add N(0, 0.05²) noise, clipped to [0, 1]."""
  out = np.empty_like(images)
  for i, (dy, dx) in enumerate(rng.integers(-1, 2, size=(len(images), 2))):
    out[i] = np.roll(images[i], (dy, dx), axis=(0, 1))
  out = out + rng.normal(0.0, 0.05, out.shape).astype(np.float32)
  return np.clip(out, 0.0, 1.0)


class PairBatches:
  """Deterministic batches: batch k draws from rng(seed, k); state = {'step': k}."""

  def __init__(self, images, labels, prompters, *, batch_size: int, seed: int,
               graded_fraction: float):
    self.images, self.labels = images, labels
    self.by_label = [np.nonzero(labels == d)[0] for d in range(10)]
    self.prompters, self.b, self.seed = prompters, batch_size, seed
    self.graded = int(round(graded_fraction * batch_size))
    self.step = 0
    prompts = [digits.prompt_for_label(d) for d in range(10)]
    self.point = prompters['pointwise'].encode(prompts)
    yes_no = {a: prompters['pairwise'].encode(prompts, [a] * 10) for a in ('yes', 'no')}
    self.pair = yes_no
    self.caption = prompters['caption'].encode(['caption'] * 10, list(digits.NUMBER_WORDS))

  def _pick(self, rng, ds):
    return np.array([rng.choice(self.by_label[d]) for d in ds])

  def sample(self, rng):
    b = self.b
    d = rng.integers(0, 10, b)
    other = (d + rng.integers(1, 10, b)) % 10
    w = augment(rng, self.images[self._pick(rng, d)])
    l = augment(rng, self.images[self._pick(rng, other)])
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
    match = augment(rng, self.images[self._pick(rng, dq)])
    nonmatch = augment(rng, self.images[self._pick(rng, oq)])
    swap = rng.integers(0, 2, b).astype(bool)          # True: the matching image is image 2
    ref = np.where(swap[:, None, None, None], nonmatch, match)
    gen = np.where(swap[:, None, None, None], match, nonmatch)
    yes, no = self.pair['yes'], self.pair['no']
    pick = lambda k: np.where(swap[:, None], yes[k][dq], no[k][dq])
    return {'p_ids': self.point['ids'][d], 'p_pos': self.point['pos'][d], 'p_w': w, 'p_l': l,
            'p_ce': ce, 'q_ids': pick('ids'), 'q_targets': pick('targets'),
            'q_mask': pick('answer_mask'), 'q_ref': ref, 'q_gen': gen,
            'c_ids': self.caption['ids'][dq], 'c_targets': self.caption['targets'][dq],
            'c_mask': self.caption['answer_mask'][dq], 'c_img': match}

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
  norm = str(rm_cfg.get('train_normalization', 'full'))

  def pointwise(params, batch):
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
    return vlm_losses.token_ce(logits, batch['q_targets'], batch['q_mask'],
                               None if alpha is None else float(alpha))

  def caption(params, batch):
    logits = nnx.merge(graphdef, params)(batch['c_ids'], tile_spec(batch['c_img']))
    return vlm_losses.token_ce(logits, batch['c_targets'], batch['c_mask'])

  return pointwise, pairwise, caption


def make_train_step(graphdef, tx, tile_spec, yes_ids, no_ids, rm_cfg):
  pointwise, pairwise, caption = make_losses(graphdef, tile_spec, yes_ids, no_ids, rm_cfg)
  cw = float(rm_cfg.get('caption_weight', 0.0))

  def loss_fn(params, batch):
    lp, lq, lc = pointwise(params, batch), pairwise(params, batch), caption(params, batch)
    return lp + lq + cw * lc, (lp, lq, lc)

  def step(state, batch, key):
    del key
    (loss, (lp, lq, lc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'], batch)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new = {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state}
    new, skipped = loop_lib.finite_or_skip(state, new, loss, grads)
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


def train(config, workdir: str) -> dict:
  mesh, rules = common.setup_mesh(config)
  tok = common.digits_tokenizer(workdir)
  n_vocab = tokenizer_lib.vocab_size(tok)
  model_cfg = dict(config.vlm.to_dict())
  model_cfg['text'] = dict(model_cfg['text'], vocab_size=n_vocab + 1)
  model_cfg['image_token_id'] = n_vocab          # one id past the words: the image placeholder
  cfg = vlm_config(model_cfg)
  tile_spec = vlm_yes.TileSpec(**config.tiles.to_dict())
  prompters = build_prompters(config, tok, cfg, tile_spec)
  yes_ids, no_ids = prompters['pointwise'].yes_ids, prompters['pointwise'].no_ids

  graphdef, (params,), (pshard,) = sharding_lib.sharded_init(
      lambda: InternVL(cfg, rngs=nnx.Rngs(int(config.seed))), mesh, rules)
  logging.info('VLM reward model: %.3fM params.',
               sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) / 1e6)
  tx = optim.make_optimizer(config.optax)
  opt_shard = optim.opt_state_shardings(tx, params, pshard, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shard)(params)
  state = {'params': params, 'opt_state': opt_state}
  shardings = {'params': pshard, 'opt_state': opt_shard}

  train_split = digits.load_split('train', seed=0)
  data_iter = PairBatches(np.asarray(train_split['images']), np.asarray(train_split['labels']),
                          prompters, batch_size=int(config.data.batch_size),
                          seed=int(config.seed), graded_fraction=float(
                              config.reward_model.graded_fraction))

  def to_device(batch):
    return sharding_lib.host_to_global(batch, mesh, rules)

  def eval_hook(st, step):
    m = heldout_metrics(graphdef, st['params'], prompters, tile_spec, seed=int(config.seed))
    logging.info('step %d held-out: %s', step, {k: round(v, 4) for k, v in m.items()})
    if step == int(config.total_steps):
      uses = {m: prompters[m] for m in ('pointwise', 'pairwise')}
      path = vlm_export.save_vlm_reward(os.path.join(workdir, 'reward_model'), st['params'], cfg,
                                        tok, uses, tile_spec)
      logging.info('Exported the reward model to %s', path)
    return m

  step_fn = make_train_step(graphdef, tx, tile_spec, yes_ids, no_ids, config.reward_model)
  loop_cfg = loop_lib.LoopConfig.from_config(config, desc='vlm_reward')
  hooks = [(int(config.eval_every), eval_hook)]
  state, last = loop_lib.run(
      workdir=workdir, loop=loop_cfg, state=state, state_shardings=shardings, step_fn=step_fn,
      data_iter=data_iter, to_device=to_device, key=jax.random.key(int(config.seed)), mesh=mesh,
      hooks=hooks, config_json=config.to_dict(), context=lambda: common.mesh_context(mesh, rules))
  return {'step': last}
