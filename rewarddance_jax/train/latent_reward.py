"""Latent reward-model training on preference pairs (`trainer: latent_reward`).

Trains a DiNa-LRM Thurstone reward (`config.reward.kind = 'thurstone'`, rewards/thurstone.py) or a
PAVRM process reward (`'process'`, rewards/process.py) on a frozen generator backbone:
  1. Base: the generator params restored from `config.reward.base_workdir` (its newest checkpoint;
     `config.model` must equal the model section saved there), cut to the first K blocks
     (models/backbone.py); '' builds a fresh generator from `config.model` (tests, smoke runs).
  2. Trainable: the reward's LoRA on the backbone and the head, the only tree with optimizer state.
     State = {'params': {'lora', 'head'}, 'opt_state', 'base'}; the base rides along unchanged, so
     a reward checkpoint is self-contained (`rewards.latent.load_reward(workdir)` rebuilds the
     `Reward`).
  3. Step: σ ~ `config.reward.sigma_sampler` (uniform; optional shift), one ε per pair: chosen and
     rejected share the noise and the level (§5.2, §6.2); scores of both in one batch; loss =
     `preference_loss` (Thurstone family) or `pair_loss` (PAVRM BCE / siamese BT). Optional
     (`ensemble_weight` > 0, Thurstone only): the same loss on the token-fusion ensemble of the
     clean pair at `ensemble_sigmas` (independent ε per level, shared within the pair), with the
     Thurstone variance of the lowest level (our choice). Metrics: loss, pair accuracy, accuracy per
     kind and per σ bin (5 bins of width 0.2; count-weighted, an empty bin reads 0 with count 0).
  4. Eval hook (`config.eval.every` and at the end): held-out pairs (digits 'heldout' split) scored
     at each `config.eval.sigmas` level with a fixed ε per pair, plus the ensemble (Thurstone) →
     `eval/acc_s<σ>` metrics and `eval/accuracy_<step>.json` (the per-σ table).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from rewarddance_jax import checkpoint as ckpt_lib
from rewarddance_jax import families
from rewarddance_jax.data import pairs as pairs_lib
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.flow import matching
from rewarddance_jax.models.backbone import Backbone, cond_from_batch
from rewarddance_jax.parallel import rng as rng_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.parallel.trees import count_params
from rewarddance_jax.rewards import latent as latent_lib
from rewarddance_jax.rewards import process as process_lib
from rewarddance_jax.rewards import thurstone as thurstone_lib
from rewarddance_jax.train import common, loop as loop_lib, optim

BIN_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
_BATCH_KEYS = ('chosen', 'rejected', 'tokens', 'mask', 'kind')


# ------------------------------------------------------------------------------------------------
# The base generator (the backbone and head come from rewards/latent.py).
# ------------------------------------------------------------------------------------------------


def _base_model_config(base_workdir: str) -> dict:
  with ckpt_lib.Checkpointer(os.path.join(base_workdir, 'checkpoints'), async_save=False) as c:
    step = c.latest_step()
    if step is None:
      raise FileNotFoundError(f'config.reward.base_workdir={base_workdir!r} has no checkpoint.')
    return c.restore(step, json=('config',))['config'].get('model', {}), step


def _normalise(d):
  return json.loads(json.dumps(dict(d), default=list))


def load_base(config, backbone, mesh, rules, *, abstract: bool = False):
  """(base params cut to the backbone, their shardings): restored from
  `config.reward.base_workdir`, else the public weights of `config.init.weights.src` (the
  family's loader), else fresh. `abstract`: shapes only (the layout scanner)."""
  factory = latent_lib.generator_factory(config, backbone, int(config.seed))
  _, (target,), (full_shard,) = sharding_lib.sharded_abstract(factory, mesh, rules)
  shardings = backbone.take(full_shard)
  take = lambda p: sharding_lib.materialize(backbone.take, p, out_shardings=shardings,  # pylint: disable=unnecessary-lambda-assignment
                                            abstract=abstract)
  base_dir = str(config.reward.get('base_workdir', ''))
  fam = families.from_config(config)
  if abstract:
    return take(target), shardings
  if fam.has_weights:
    if base_dir:
      raise ValueError('config: set reward.base_workdir or init.weights.src, not both.')
    _, full, _, _ = fam.load(mesh, rules)
    return take(full), shardings
  if not base_dir:
    _, (params,), _ = sharding_lib.sharded_init(factory, mesh, rules)
    return take(params), shardings
  saved, step = _base_model_config(base_dir)
  want = _normalise(config.model)
  if _normalise(saved) != want:
    diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    raise ValueError(f'config.model differs from the generator in {base_dir} at keys {diff}.')
  item = str(config.reward.get('base_item', 'params'))
  with ckpt_lib.Checkpointer(os.path.join(base_dir, 'checkpoints'), async_save=False) as c:
    full = c.restore(step, arrays={item: target})[item]
  logging.info('Base generator: %s step %d (%s), first %d blocks.', base_dir, step, item,
               backbone.num_blocks)
  return take(full), shardings


# ------------------------------------------------------------------------------------------------
# Scoring, the step, evaluation.
# ------------------------------------------------------------------------------------------------


def make_scorer(config, backbone: Backbone, head_gd):
  """`scores(params, base, x_t (B, ...), σ (B,), cond) -> (B,)` for the configured reward kind."""
  if config.reward.kind == 'thurstone':
    return lambda p, base, x, s, cond: thurstone_lib.score_views(backbone, head_gd, base, p,
                                                                 [(x, s)], cond)
  return lambda p, base, x, s, cond: process_lib.score(backbone, head_gd, base, p, x, s, cond)


def _pair_scores(scorer, params, base, x_pos, x_neg, sigma, cond):
  both = lambda a: jnp.concatenate([a, a], axis=0)
  s = scorer(params, base, jnp.concatenate([x_pos, x_neg], axis=0), both(sigma),
             {k: both(v) for k, v in cond.items()})
  b = x_pos.shape[0]
  return s[:b], s[b:]


def _ensemble_pair_scores(backbone, head_gd, params, base, chosen, rejected, cond, key, sigmas):
  views = [(jnp.concatenate([xp, xn], 0), jnp.concatenate([sp, sn], 0)) for (xp, sp), (xn, sn) in
           zip(thurstone_lib.noisy_views(key, chosen, sigmas),
               thurstone_lib.noisy_views(key, rejected, sigmas))]   # same key: ε shared in a pair
  both = {k: jnp.concatenate([v, v], 0) for k, v in cond.items()}
  s = thurstone_lib.score_views(backbone, head_gd, base, params, views, both)
  b = chosen.shape[0]
  return s[:b], s[b:]


def _loss(config, s_pos, s_neg, sigma):
  r = config.reward
  if r.kind == 'thurstone':
    return thurstone_lib.preference_loss(s_pos, s_neg, sigma, str(r.loss))
  return process_lib.pair_loss(s_pos, s_neg, str(r.loss))


def _accuracy_metrics(correct, sigma, kind) -> dict:
  m = {'acc': jnp.mean(correct)}
  for i, name in enumerate(pairs_lib.KINDS):
    w = (kind == i).astype(jnp.float32)
    m[f'acc_{name}'] = jnp.sum(correct * w) / jnp.maximum(jnp.sum(w), 1.0)
  for lo, hi in zip(BIN_EDGES[:-1], BIN_EDGES[1:]):
    w = ((sigma >= lo) & (sigma < hi) | ((hi == 1.0) & (sigma == 1.0))).astype(jnp.float32)
    m[f'acc_sigma_{lo:.1f}_{hi:.1f}'] = jnp.sum(correct * w) / jnp.maximum(jnp.sum(w), 1.0)
  return m


def make_train_step(config, backbone: Backbone, head_gd, tx: optax.GradientTransformation):
  """The pure step `(state, batch, key) -> (state, metrics)`; grads reach params only."""
  r = config.reward
  scorer = make_scorer(config, backbone, head_gd)
  kind_name, shift = str(r.get('sigma_sampler', 'uniform')), float(r.get('shift', 1.0))
  ens_w = float(r.get('ensemble_weight', 0.0)) if r.kind == 'thurstone' else 0.0
  ens_sigmas = tuple(float(s) for s in r.get('ensemble_sigmas', thurstone_lib.DEFAULT_ENSEMBLE))

  def loss_fn(params, base, batch, key):
    k_sigma, k_noise, k_ens = jax.random.split(key, 3)
    chosen, rejected = batch['chosen'], batch['rejected']
    sigma = matching.sample_sigmas(k_sigma, chosen.shape[0], kind=kind_name, shift=shift)
    eps = jax.random.normal(k_noise, chosen.shape, jnp.float32)
    cond = cond_from_batch(batch)
    s_pos, s_neg = _pair_scores(scorer, params, base, matching.interpolate(chosen, eps, sigma),
                                matching.interpolate(rejected, eps, sigma), sigma, cond)
    loss = _loss(config, s_pos, s_neg, sigma)
    aux = _accuracy_metrics((s_pos > s_neg).astype(jnp.float32), sigma, batch['kind'])
    if ens_w > 0:
      e_pos, e_neg = _ensemble_pair_scores(backbone, head_gd, params, base, chosen, rejected,
                                           cond, k_ens, ens_sigmas)
      low = jnp.full_like(sigma, min(ens_sigmas))
      ens_loss = _loss(config, e_pos, e_neg, low)
      aux['ensemble_loss'], aux['ensemble_acc'] = ens_loss, jnp.mean(e_pos > e_neg)
      loss = loss + ens_w * ens_loss
    return loss, aux

  def step(state, batch, key):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], state['base'], batch, key)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new = {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state}
    old = {'params': state['params'], 'opt_state': state['opt_state']}
    new, skipped = loop_lib.finite_or_skip(old, new, loss, grads)
    new['base'] = state['base']
    return new, {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'skipped': skipped, **aux}

  return step


def make_evaluator(config, backbone: Backbone, head_gd, eval_batch: dict, mesh, rules):
  """`evaluate(params, base) -> {'acc_s<σ>': ..., 'acc_ensemble': ...}` on fixed held-out pairs."""
  scorer = make_scorer(config, backbone, head_gd)
  sigmas = tuple(float(s) for s in config.eval.sigmas)
  ens = tuple(float(s) for s in config.reward.get('ensemble_sigmas',
                                                  thurstone_lib.DEFAULT_ENSEMBLE))
  batch = sharding_lib.host_to_global({k: eval_batch[k] for k in _BATCH_KEYS}, mesh, rules)
  key = rng_lib.key(config.seed, 'eval_noise')

  @jax.jit
  def at_sigma(params, base, batch, sigma):
    eps = jax.random.normal(key, batch['chosen'].shape, jnp.float32)   # fixed ε per pair
    s = jnp.full((eps.shape[0],), sigma, jnp.float32)
    s_pos, s_neg = _pair_scores(scorer, params, base, matching.interpolate(batch['chosen'], eps, s),
                                matching.interpolate(batch['rejected'], eps, s), s,
                                cond_from_batch(batch))
    return s_pos > s_neg

  @jax.jit
  def ensemble(params, base, batch):
    s_pos, s_neg = _ensemble_pair_scores(backbone, head_gd, params, base, batch['chosen'],
                                         batch['rejected'], cond_from_batch(batch), key, ens)
    return s_pos > s_neg

  kinds = np.asarray(eval_batch['kind'])

  def summarise(correct) -> dict:
    correct = np.asarray(jax.device_get(correct), np.float64)
    out = {'all': float(correct.mean())}
    for i, name in enumerate(pairs_lib.KINDS):
      if np.any(kinds == i):
        out[name] = float(correct[kinds == i].mean())
    return out

  def evaluate(params, base) -> dict:
    table = {f'{s:g}': summarise(at_sigma(params, base, batch, s)) for s in sigmas}
    if config.reward.kind == 'thurstone':
      table['ensemble'] = summarise(ensemble(params, base, batch))
    return table

  return evaluate


# ------------------------------------------------------------------------------------------------
# Train and load.
# ------------------------------------------------------------------------------------------------


def _tokenizer(config, workdir):
  base_dir = str(config.reward.get('base_workdir', ''))
  path = os.path.join(base_dir, 'tokenizer.json') if base_dir else ''
  if path and os.path.exists(path):
    tok = tokenizer_lib.load_tokenizer(path)
    os.makedirs(workdir, exist_ok=True)
    tokenizer_lib.save_tokenizer(tok, os.path.join(workdir, 'tokenizer.json'))
    return tok
  return tokenizer_lib.load_or_build(workdir, config.model.get('vocab_size'))


def make_pairs(config, tok, split: str, batch_size: int, seed: int):
  p = config.pairs
  if p.get('source', 'digits') == 'jsonl':
    return pairs_lib.JsonlPairs(p.path if split == 'train' else p.heldout_path, batch_size,
                                tokenizer=tok, max_len=int(p.max_text_len), seed=seed,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
  return pairs_lib.DigitPairs(batch_size, split=split, seed=seed, tokenizer=tok,
                              max_len=int(p.max_text_len), kinds=tuple(p.get('kinds',
                                                                            pairs_lib.KINDS)),
                              process_index=jax.process_index(),
                              process_count=jax.process_count())


def build_state(config, mesh, rules, *, abstract: bool = False):
  """(backbone, head graphdef, state, shardings, tx) with every array created sharded; with
  `abstract`, the same tree of `jax.ShapeDtypeStruct`s (the layout scanner's)."""
  backbone = latent_lib.make_backbone(config)
  base, base_shard = load_base(config, backbone, mesh, rules, abstract=abstract)
  hcfg = latent_lib.head_config(config, backbone)
  head_factory = latent_lib.head_factory(config, hcfg, rng_lib.key(config.seed, 'head_init'))
  if abstract:
    head_gd, (head,), (head_shard,) = sharding_lib.sharded_abstract(head_factory, mesh, rules)
  else:
    head_gd, (head,), (head_shard,) = sharding_lib.sharded_init(head_factory, mesh, rules)
  lora_shard = backbone.lora_shardings(jax.eval_shape(lambda b: backbone.init_lora(
      b, jax.random.key(0)), base), base_shard)
  lora = sharding_lib.materialize(
      lambda b: backbone.init_lora(b, rng_lib.key(config.seed, 'lora_init')), base,
      out_shardings=lora_shard, abstract=abstract)
  params, pshard = {'lora': lora, 'head': head}, {'lora': lora_shard, 'head': head_shard}
  tx = optim.make_optimizer(config.optax)
  opt_shard = optim.opt_state_shardings(tx, params, pshard, mesh)
  state = {'params': params, 'opt_state': sharding_lib.materialize(
      tx.init, params, out_shardings=opt_shard, abstract=abstract), 'base': base}
  shardings = {'params': pshard, 'opt_state': opt_shard, 'base': base_shard}
  return backbone, head_gd, state, shardings, tx


def train(config, workdir: str) -> dict:
  mesh, rules = common.setup_mesh(config)
  backbone, head_gd, state, shardings, tx = build_state(config, mesh, rules)
  logging.info('Latent reward %s: trainable LoRA %d + head %d params; frozen base %d params.',
               config.reward.kind, count_params(state['params']['lora']),
               count_params(state['params']['head']), count_params(state['base']))
  tok = _tokenizer(config, workdir)
  data_iter = make_pairs(config, tok, 'train', int(config.pairs.batch_size), int(config.seed))
  eval_batch = next(make_pairs(config, tok, 'heldout', int(config.eval.num_pairs),
                               rng_lib.seed_for(config.seed, 'heldout_pairs')))
  evaluate = make_evaluator(config, backbone, head_gd, eval_batch, mesh, rules)

  def to_device(batch):
    return sharding_lib.host_to_global({k: batch[k] for k in _BATCH_KEYS}, mesh, rules)

  eval_dir = os.path.join(workdir, 'eval')

  def eval_hook(st, step):
    table = evaluate(st['params'], st['base'])
    os.makedirs(eval_dir, exist_ok=True)
    if jax.process_index() == 0:
      with open(os.path.join(eval_dir, f'accuracy_{step}.json'), 'w', encoding='utf-8') as f:
        json.dump(table, f, indent=1)
    logging.info('step %d held-out pair accuracy: %s', step,
                 ', '.join(f'{k}: {v["all"]:.3f}' for k, v in table.items()))
    return {f'eval/acc_{k}': v['all'] for k, v in table.items()}

  hooks = [(int(config.eval.every), eval_hook)] if int(config.eval.get('every', 0)) > 0 else []
  step_fn = make_train_step(config, backbone, head_gd, tx)
  state, last = common.run_loop(
      config, workdir, desc=f'{config.reward.kind}_reward', state=state, shardings=shardings,
      step_fn=step_fn, data_iter=data_iter, to_device=to_device, mesh=mesh, rules=rules,
      hooks=hooks)
  return {'step': last}
