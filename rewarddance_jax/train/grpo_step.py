"""One GRPO iteration on a rectified flow as a single pure function (docs/algorithms.md §3).

`make_grpo_step(...)` returns `step(state, batch, key, consts) -> (state, metrics)`, which the
shared loop jits once with the state donated. Inside, with nothing going back to the host:

  1. Rollout (no gradient): the B = P·G rows of the batch (each prompt repeated G times adjacently)
     start from x_T (one x_T per group with same noise), and `flow.rollout` runs N steps of the
     configured SDE kind under `lax.scan`, storing x_i, x_{i+1} and logp_i (fp32) of the N − 1
     trainable steps; the SDE mask and the per-sample trained steps come from `rl.timesteps`.
  2. Rewards on x̂0 of the last step ('latents', and 'pixels' = decode(x̂0)), every configured
     reward with its own key; advantages per group (`rl.advantages`), several rewards combined by
     advantage or reward aggregation (`rl.aggregate`); zero-advantage samples get weight 0. With
     `best_of` = k > 0 only each group's k/2 best and k/2 worst rollouts go on to the update
     (DanceGRPO's training on the extremes, `rl.extremes`).
  3. Update: the samples are shuffled and split into M minibatches (the rollout ran the generator
     on the same M chunks, see Ratio below); per minibatch the gradient of
     Σ_t L_t/T over its T trained steps is accumulated under `lax.scan` (one forward/backward per
     step in memory), then one optimizer step (M optimizer steps per iteration; DG/FG
     accumulate over samples × steps the same way, §3.4). L_t is the clipped surrogate
     (`rl.grpo_loss`) + β·velocity-form KL to the frozen reference (§3.3, `rl.kl`) + the optional
     MixGRPO KL to the rollout policy. With `fm_weight` > 0 each minibatch also adds
     fm_weight·L_FM on real images of its rows' prompts (PPO-ptx, InstructGPT §3; the FM
     regulariser of PRFL §6.3 / ReFL §10 #18): consts['fm_images'] is a (P, K, H, W, C) table of
     real images per prompt label, one drawn per row by key inside the step (so resume is exact).
     EMA after every optimizer step.
  4. A non-finite loss or gradient anywhere leaves params, optimizer and EMA unchanged.
  5. Metrics: reward mean/std (total and per reward), the reward-variance window (docs/algorithms.md
     §3.8: std/var of the raw rewards of the last W iterations, a ring buffer in the state, so
     resume is exact), advantage |A| mean, zero-std fraction, ratio mean/min/max, clipfrac,
     approx_kl, grad norm, loss.

The parts are separate functions (`make_grpo_functions`: rollout = item 1, score = the rewards of
item 2, update = advantages + items 3-5) and `step` is their composition, so the layout scanner
compiles the rollout and the update alone from the same code (scan/grpo.py).
`model_params(trainable, consts)` maps state['params'] to the generator's params: the identity
(full fine-tuning) or e.g. a LoRA merged into a frozen base in consts['base'].

`consts` holds the frozen trees: {'rewards': WeightedRewards (its params are the reward models),
'ref': reference params or None, 'base': the frozen base params with LoRA, else None, and
optionally 'decoder' (the VAE params for `decode`) and 'fm_images'}. They are
arguments (not closures), so large reward models are sharded inputs rather than constants baked
into the program.

LoRA (`grpo.lora.rank` > 0; rank 0 = full fine-tuning): state['params'] is the LoRA tree
(`nn/lora.py`) and the only tree the optimizer sees; rollouts and updates run the generator on
merge(consts['base'], lora) (W + (alpha/rank)·a@b). The base is a const rather than a part of
the state: it is never donated, has no optimizer state or EMA, and is not checkpointed (a resumed
run rebuilds it from `config.init.generator` or the seed, bit for bit). The KL reference is the
base itself (the trainer passes consts['ref'] = consts['base'], no copy).

Ratio: the update recomputes log-probs with the same step code as the rollout, and the rollout
runs the generator on the update's minibatches (`minibatch_perm`): the same rows in the same
places, so every matmul of the re-score rounds as the rollout's did. In the first minibatch
(params still those of the rollout) every log-ratio is then 0 and every ρ 1 up to how XLA fuses
the elementwise code of the two programs (docs/exactness.md); metrics 'ratio_first_min/max' and
'log_ratio_first_max_abs' report that minibatch. With `best_of` the trained rows are regrouped
after the rewards, so their matmuls differ and that bound does not apply.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rewarddance_jax import config_lib
from rewarddance_jax.data import label_table
from rewarddance_jax.families.base import COND_KEYS, Guidance, cond_from_batch, guided_velocity
from rewarddance_jax.flow import matching, rollout as rollout_lib
from rewarddance_jax.flow import schedules, steps
from rewarddance_jax.nn import lora as lora_lib
from rewarddance_jax.parallel.sharding import constrain
from rewarddance_jax.rl import advantages as adv_lib
from rewarddance_jax.rl import aggregate, ema as ema_lib, extremes, grpo_loss, kl as kl_lib
from rewarddance_jax.rl import timesteps

AGGREGATIONS = ('advantage', 'reward')


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """`config.grpo.lora`: rank 0 trains every weight; rank r > 0 trains a LoRA of the kernels
  whose path matches `targets` (a regex, `nn/lora.py`), scale alpha / rank, over the frozen
  base stored in `base_dtype` (bf16 halves its memory; the blocks may compute in bf16 anyway)."""
  rank: int = 0
  alpha: float = 16.0
  targets: str = lora_lib.ATTENTION_TARGETS
  base_dtype: str = 'float32'

  RANGES = {'rank': '[0, inf)', 'alpha': '(0, inf)'}

  def __post_init__(self):
    if self.base_dtype not in ('float32', 'bfloat16'):
      raise ValueError(f'grpo.lora.base_dtype={self.base_dtype!r} is not float32 or bfloat16.')

  @property
  def scale(self) -> float:
    return lora_lib.lora_scale(self.rank, self.alpha)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Static GRPO settings (from `config.grpo`; defaults: docs/algorithms.md §3.7, §10)."""
  group_size: int = 12
  step_kind: str = 'dance'
  noise_level: float = 0.3
  schedule: str = 'shift'
  num_steps: int = 16
  shift: float = 3.0
  selection: timesteps.TimestepSelection = timesteps.TimestepSelection()
  advantage: str = 'dance'
  global_std: bool = False
  adv_clip: float = 5.0
  aggregation: str = 'advantage'
  clip_range: float = 1e-4
  minibatches: int = 2
  kl_beta: float = 0.0
  rollout_kl: float = 0.0
  same_noise: bool = True
  ema_decay: float = 0.0
  variance_window: int = 1000
  fm_weight: float = 0.0
  best_of: int = 0
  split: bool = False
  lora: LoRAConfig = LoRAConfig()

  RANGES = {'group_size': '[2, inf)', 'noise_level': '[0, inf)', 'num_steps': '[2, inf)',
            'shift': '(0, inf)', 'adv_clip': '(0, inf)', 'clip_range': '(0, inf)',
            'minibatches': '[1, inf)', 'kl_beta': '[0, inf)', 'rollout_kl': '[0, inf)',
            'ema_decay': '[0, 1]', 'variance_window': '[1, inf)',
            'fm_weight': '[0, inf)', 'best_of': '[0, inf)'}

  def __post_init__(self):
    steps.check_step_kind(self.step_kind)
    if self.step_kind == 'ode':
      raise ValueError('grpo.step_kind="ode" has no log-probs; use dance, flow_grpo or cps.')
    if self.advantage not in adv_lib.ADVANTAGE_MODES:
      raise ValueError(f'grpo.advantage={self.advantage!r} is not one of '
                       f'{adv_lib.ADVANTAGE_MODES}.')
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f'grpo.aggregation={self.aggregation!r} is not one of {AGGREGATIONS}.')
    if self.kl_beta > 0 and self.step_kind not in kl_lib.VELOCITY_KL_KINDS:
      raise ValueError(f'grpo.kl_beta > 0 needs step_kind in {kl_lib.VELOCITY_KL_KINDS}, got '
                       f'{self.step_kind!r}.')
    if self.selection.num_steps != self.num_steps:
      raise ValueError(f'grpo.selection.num_steps={self.selection.num_steps} must equal '
                       f'grpo.num_steps={self.num_steps}.')
    extremes.check_keep(self.group_size, self.best_of)

  @classmethod
  def from_config(cls, cfg) -> 'GRPOConfig':
    cfg = dict(cfg)
    num_steps = cfg.get('num_steps', cls.num_steps)
    cfg['selection'] = {'num_steps': num_steps, **dict(cfg.get('selection', {}))}
    return config_lib.section(cls, cfg, 'config.grpo')

  def sigmas(self, image_seq_len: int | None = None) -> np.ndarray:
    return schedules.get_sigmas(self.schedule, self.num_steps, shift=self.shift,
                                image_seq_len=image_seq_len)


def _batch_size(batch: dict) -> int:
  for k in COND_KEYS:
    if k in batch:
      return batch[k].shape[0]
  raise ValueError(f'a GRPO batch needs conditioning: one of {COND_KEYS}; got {sorted(batch)}.')


def _rows(a: jax.Array, axis: int = 0) -> jax.Array:
  """Pins `a`'s sample axis to the batch sharding (`act_batch`), the rest unsharded. Without it
  GSPMD may replicate the initial noise (the whole rollout on every chip) or the minibatches
  after the shuffle-and-split (every chip running the full minibatch's gradients)."""
  names = [None] * a.ndim
  names[axis] = 'act_batch'
  return constrain(a, names)


def init_rl_state(gcfg: GRPOConfig, batch_size: int) -> dict:
  """state['rl']: the iteration counter and the reward-variance ring buffer (host numpy)."""
  return {'iteration': np.zeros((), np.int32),
          'reward_window': np.zeros((gcfg.variance_window, batch_size), np.float32)}


def _reward_window(window: jax.Array, rewards: jax.Array, iteration: jax.Array):
  w = window.shape[0]
  window = jax.lax.dynamic_update_index_in_dim(window, rewards, iteration % w, axis=0)
  valid = (jnp.arange(w) <= iteration)[:, None]
  count = jnp.sum(valid) * window.shape[1]
  mean = jnp.sum(jnp.where(valid, window, 0.0)) / count
  var = jnp.sum(jnp.where(valid, jnp.square(window - mean), 0.0)) / count
  return window, mean, var


KEY_NAMES = ('noise', 'rollout', 'select', 'reward', 'shuffle')


def split_keys(key: jax.Array) -> dict:
  """The iteration's keys by use: noise, rollout, select (rollout), reward (score), shuffle."""
  return dict(zip(KEY_NAMES, jax.random.split(key, len(KEY_NAMES))))


def minibatch_perm(key: jax.Array, rows: int) -> jax.Array:
  """The shuffle of the update: minibatch c is rows perm[c·rows/M : (c+1)·rows/M], in order.

  The rollout runs the generator on the same chunks, in the same order, so the first minibatch
  re-scores each transition with the velocity of an identical GEMM: a matmul's rounding depends
  on its row count and on where a row sits (the kernel's tiling, chosen per shape and CPU), so the
  same rows in other places or in a bigger batch need not give bitwise the same v.
  """
  return jax.random.permutation(key, rows)


def policy_params(gcfg: 'GRPOConfig', trainable, consts):
  """The generator's params: merge(consts['base'], LoRA) when training a LoRA, else the
  trainable tree itself."""
  if gcfg.lora.rank:
    return lora_lib.merge(consts['base'], trainable, gcfg.lora.scale)
  return trainable


@dataclasses.dataclass(frozen=True)
class GRPOFunctions:
  """The parts of one GRPO iteration; `step` is their composition (module docstring).

    rollout(params, batch, keys, iteration) -> {'x', 'x_next', 'logp', 'idx', 'x0_hat'}
        item 1: generator params (already merged), keys from `split_keys`.
    score(rewards, rollout, batch, key, decoder=None) -> {reward name: (B,)}   item 2, the
        rewards; `decoder` = the decode's params (consts['decoder'], e.g. the VAE) or None
    update(state, consts, rollout, per, batch, key) -> (state, metrics)  items 2 (advantages)-5
    first(state, batch, key, consts) -> (trajectory, per)     rollout + score (split mode's 1st)
    second(state, (trajectory, per), batch, key, consts) -> (state, metrics)   update (2nd)
    step(state, batch, key, consts) -> (state, metrics)   second ∘ first: the fused iteration
  """
  rollout: Callable
  score: Callable
  update: Callable
  step: Callable
  first: Callable
  second: Callable


def make_grpo_step(graphdef, tx: optax.GradientTransformation, gcfg: GRPOConfig,
                   image_shape: tuple[int, ...], *, reward_names: tuple[str, ...],
                   reward_weights: dict[str, float],
                   decode: Callable[[jax.Array], jax.Array], image_seq_len: int | None = None,
                   model_params: Callable | None = None, velocity: Callable | None = None):
  """The pure GRPO iteration `(state, batch, key, consts) -> (state, metrics)` (module docstring);
  `make_grpo_functions(...).step`."""
  return make_grpo_functions(graphdef, tx, gcfg, image_shape, reward_names=reward_names,
                             reward_weights=reward_weights, decode=decode,
                             image_seq_len=image_seq_len, model_params=model_params,
                             velocity=velocity).step


def make_grpo_functions(graphdef, tx: optax.GradientTransformation, gcfg: GRPOConfig,
                        image_shape: tuple[int, ...], *, reward_names: tuple[str, ...],
                        reward_weights: dict[str, float],
                        decode: Callable[[jax.Array], jax.Array],
                        image_seq_len: int | None = None,
                        model_params: Callable | None = None,
                        velocity: Callable | None = None) -> GRPOFunctions:
  """Rollout, score, update and their composition `step` (see `GRPOFunctions`).

  Args:
    graphdef: the generator's graphdef.
    tx: the optimizer (over the trainable tree state['params']).
    gcfg: static GRPO settings.
    image_shape: latent shape of one sample (H, W, C).
    reward_names / reward_weights: of the WeightedRewards passed in consts (static).
    decode: (latents x̂0, decoder params) → pixels in [0, 1]; the params are consts['decoder']
      (the VAE's: a const, not a closure, so its weights are a sharded input rather than
      constants in the program) or None (the digits' identity-to-unit, `grpo.decode_unit`).
    image_seq_len: for the 'flux_dynamic' schedule.
    model_params: (trainable tree, consts) → generator params. Default: from `gcfg.lora`, the
      identity for full fine-tuning, merge(consts['base'], LoRA) for a LoRA (gradients and
      optimizer state then cover the LoRA tree only).
    velocity: (params, x, σ, cond) → v of the guided generator (`GeneratorFamily.velocity`);
      default: `graphdef` without guidance.
  """
  sigmas_np = gcfg.sigmas(image_seq_len)
  n = gcfg.num_steps
  sel = gcfg.selection
  t_train = sel.num_trained
  kind, eta, g = gcfg.step_kind, gcfg.noise_level, gcfg.group_size

  if model_params is None:
    model_params = lambda trainable, consts: policy_params(gcfg, trainable, consts)  # pylint: disable=unnecessary-lambda-assignment

  velocity = velocity or guided_velocity(graphdef, Guidance())

  def rollout(params, batch, keys, iteration):
    b = _batch_size(batch)
    if b % g:
      raise ValueError(f'the GRPO batch ({b} rows) must be divisible by group_size={g}.')
    cond = cond_from_batch(batch)
    sigmas = jnp.asarray(sigmas_np)
    idx, sde_mask = timesteps.select(sel, keys['select'], b, iteration)
    x_init = rollout_lib.initial_noise(keys['noise'], (b,) + tuple(image_shape), group_size=g,
                                       same_noise=gcfg.same_noise)

    def run(x0, chunk_cond, key):
      traj = rollout_lib.rollout(lambda x, s: velocity(params, x, s, chunk_cond), _rows(x0),
                                 sigmas, key, kind=kind, noise_level=eta, sde_mask=sde_mask,
                                 keep_steps=range(n - 1))
      return traj.x, traj.x_next, traj.logp, traj.x0_hat

    if gcfg.best_of:   # the trained rows are picked after the rewards: no layout to match
      x, x_next, logp, x0_hat = run(x_init, cond, keys['rollout'])
    else:
      # Row r of chunk c is row r of the update's minibatch c (same permutation): the generator
      # then sees the same rows in the same places in both programs (see `minibatch_perm`).
      m = gcfg.minibatches
      if b % m:
        raise ValueError(f'the GRPO batch ({b} rows) must be divisible by minibatches={m}.')
      perm = minibatch_perm(keys['shuffle'], b)
      inverse = jnp.argsort(perm)

      def chunk(a):   # (B, ...) → (m, B/m, ...) in the update's minibatch order
        return jnp.take(a, perm, axis=0).reshape((m, b // m) + a.shape[1:])

      def steps_first(a):   # (m, K, B/m, ...) → (K, B, ...) in batch order
        return jnp.take(jnp.moveaxis(a, 0, 1).reshape((a.shape[1], b) + a.shape[3:]), inverse,
                        axis=1)

      out = jax.lax.map(lambda xs: run(*xs), (chunk(x_init), jax.tree.map(chunk, cond),
                                               jax.random.split(keys['rollout'], m)))
      x, x_next, logp = (steps_first(a) for a in out[:3])
      x0_hat = jnp.take(out[3].reshape((b,) + out[3].shape[2:]), inverse, axis=0)
    return {'x': x, 'x_next': x_next, 'logp': logp, 'idx': idx, 'x0_hat': _rows(x0_hat)}

  def score(rewards, ro, batch, key, decoder=None):
    samples = {'latents': ro['x0_hat'], 'pixels': decode(ro['x0_hat'], decoder)}
    reward_batch = {k: v for k, v in batch.items() if not isinstance(v, str)}
    return rewards.per_reward(samples, reward_batch, key)

  def advantages(per):
    agg = (aggregate.advantage_aggregation if gcfg.aggregation == 'advantage'
           else aggregate.reward_aggregation)
    return agg(per, reward_weights, g, mode=gcfg.advantage, global_std=gcfg.global_std,
               clip=gcfg.adv_clip)

  def combine(per):
    """Σ_k w_k·r_k, as `WeightedRewards.combine` (static weights)."""
    total = None
    for name in reward_names:
      term = jnp.float32(reward_weights[name]) * per[name]
      total = term if total is None else total + term
    return total

  def fm_loss(trainable, consts, x_real, cond, key):
    """fm_weight·L_FM of the minibatch's real images (x_real in model space)."""
    k_sigma, k_noise = jax.random.split(key)
    sigma = matching.sample_sigmas(k_sigma, x_real.shape[0])
    noise = jax.random.normal(k_noise, x_real.shape, jnp.float32)
    v = velocity(model_params(trainable, consts), matching.interpolate(x_real, noise, sigma),
                 sigma, cond)
    fm = matching.flow_matching_loss(v, x_real, noise)
    return gcfg.fm_weight * fm, fm

  fm_grad_fn = jax.grad(fm_loss, has_aux=True)

  def step_loss(trainable, consts, mb, cond):
    """L_t/T of one trained step t of a minibatch, and its statistics."""
    x, x_next, logp_old, sigma, sigma_next, adv, mask = mb
    v = velocity(model_params(trainable, consts), x, sigma, cond)
    logp = steps.flow_step(kind, v, x, sigma, sigma_next, noise_level=eta, x_next=x_next).logp
    loss, stats = grpo_loss.clipped_surrogate(logp, logp_old, adv, gcfg.clip_range, mask)
    if gcfg.kl_beta > 0:
      v_ref = jax.lax.stop_gradient(velocity(consts['ref'], x, sigma, cond))
      kl = kl_lib.velocity_kl(v, v_ref, sigma, sigma_next - sigma, eta, kind)
      kl_mean = jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)
      loss = loss + gcfg.kl_beta * kl_mean
      stats['kl'] = kl_mean
    if gcfg.rollout_kl > 0:
      loss = loss + gcfg.rollout_kl * grpo_loss.rollout_kl(logp, logp_old, mask)
    stats['loss'] = loss
    return loss / t_train, stats

  grad_fn = jax.grad(step_loss, has_aux=True)

  def minibatch_updates(state, consts, data, cond, fm_data=None):
    """M optimizer steps, each accumulating the gradients of its T trained steps."""
    def minibatch(carry, xs):
      params, opt_state, ema = carry
      mb, mb_cond, fm_xs = xs
      x, x_next, logp_old, sigma, sigma_next, adv, mask = mb

      def per_step(acc, ts):
        grads, stats = grad_fn(params, consts, ts + (adv, mask), mb_cond)
        return jax.tree.map(jnp.add, acc, grads), stats

      # (b, T, ...) → (T, b, ...): scan over the trained steps.
      over_t = tuple(jnp.moveaxis(a, 1, 0) for a in (x, x_next, logp_old, sigma, sigma_next))
      grads, stats = jax.lax.scan(per_step, jax.tree.map(jnp.zeros_like, params), over_t)
      if fm_xs is not None:
        x_real, fm_key = fm_xs
        fm_grads, fm = fm_grad_fn(params, consts, x_real, mb_cond, fm_key)
        grads = jax.tree.map(jnp.add, grads, fm_grads)
        stats = dict(stats, fm_loss=fm)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      if ema is not None:
        ema = ema_lib.ema_update(ema, params, gcfg.ema_decay)
      stats = dict(stats, grad_norm=optax.tree.norm(grads))
      return (params, opt_state, ema), stats

    carry = (state['params'], state['opt_state'], state.get('ema'))
    (params, opt_state, ema), stats = jax.lax.scan(minibatch, carry, (data, cond, fm_data))
    return params, opt_state, ema, stats

  def update(state, consts, ro, per, batch, key):
    iteration = state['rl']['iteration']
    cond = cond_from_batch(batch)
    adv = advantages(per)
    mask = adv_lib.nonzero_advantage_mask(adv)
    sigmas = jnp.asarray(sigmas_np)
    idx = ro['idx']
    per_sample = (timesteps.gather_steps(ro['x'], idx), timesteps.gather_steps(ro['x_next'], idx),
                  timesteps.gather_steps(ro['logp'], idx), sigmas[idx], sigmas[idx + 1], adv,
                  mask)
    labels = batch.get('labels')
    if gcfg.best_of:
      # Train on each group's best_of/2 best and worst rollouts only (rl/extremes.py).
      rows = extremes.extreme_rows(adv, g, gcfg.best_of)
      take = lambda a: _rows(jnp.take(a, rows, axis=0))  # pylint: disable=unnecessary-lambda-assignment
      per_sample = tuple(take(a) for a in per_sample)
      cond = jax.tree.map(take, cond)
      labels = None if labels is None else jnp.take(labels, rows, axis=0)
      mask = per_sample[-1]

    b = mask.shape[0]
    if b % gcfg.minibatches:
      raise ValueError(f'the {b} trained rows (best_of={gcfg.best_of} per group) must be '
                       f'divisible by minibatches={gcfg.minibatches}.')
    m = gcfg.minibatches
    perm = minibatch_perm(key, b)

    def split(a):
      a = jnp.take(a, perm, axis=0)
      return _rows(a.reshape((m, b // m) + a.shape[1:]), axis=1)

    data = tuple(split(a) for a in per_sample)
    fm_data = None
    if gcfg.fm_weight > 0:
      if consts.get('fm_images') is None or labels is None:
        raise ValueError('grpo.fm_weight > 0 needs consts["fm_images"] (real images per prompt '
                         'label) and batch["labels"].')
      k_pick, k_fm = jax.random.split(jax.random.fold_in(key, 1))
      real = label_table.sample_table(consts['fm_images'], labels, k_pick) * 2.0 - 1.0
      fm_data = (split(real), jax.random.split(k_fm, m))
    params, opt_state, ema, stats = minibatch_updates(state, consts, data,
                                                      jax.tree.map(split, cond), fm_data)

    total = combine(per)
    ok = jnp.all(jnp.isfinite(stats['loss'])) & jnp.all(jnp.isfinite(stats['grad_norm']))
    new = {'params': params, 'opt_state': opt_state}
    if ema is not None:
      new['ema'] = ema
    kept = {k: state[k] for k in new}
    new = jax.tree.map(lambda a, o: jnp.where(ok, a, o), new, kept)
    window, w_mean, w_var = _reward_window(state['rl']['reward_window'], total, iteration)
    new['rl'] = {'iteration': iteration + 1, 'reward_window': window}

    metrics = {
        'loss': jnp.mean(stats['loss']), 'skipped': (~ok).astype(jnp.int32),
        'reward_mean': jnp.mean(total), 'reward_std': jnp.std(total),
        'reward_window_mean': w_mean, 'reward_window_std': jnp.sqrt(w_var),
        'reward_window_var': w_var,
        'adv_abs_mean': jnp.mean(jnp.abs(adv)), 'kept_fraction': jnp.mean(mask),
        'zero_std_fraction': adv_lib.zero_std_fraction(total, g),
        'grad_norm': jnp.mean(stats['grad_norm']), 'grad_norm_max': jnp.max(stats['grad_norm']),
        'ratio_mean': jnp.mean(stats['ratio_mean']), 'ratio_min': jnp.min(stats['ratio_min']),
        'ratio_max': jnp.max(stats['ratio_max']), 'clipfrac': jnp.mean(stats['clipfrac']),
        # The first minibatch's T steps: the update with the rollout's own params (ρ = 1).
        'ratio_first_min': jnp.min(stats['ratio_min'][0]),
        'ratio_first_max': jnp.max(stats['ratio_max'][0]),
        'log_ratio_first_max_abs': jnp.max(stats['log_ratio_max_abs'][0]),
        'log_ratio_max_abs': jnp.max(stats['log_ratio_max_abs']),
        'approx_kl': jnp.mean(stats['approx_kl']),
    }
    if 'kl' in stats:
      metrics['kl'] = jnp.mean(stats['kl'])
    if 'fm_loss' in stats:
      metrics['fm_loss'] = jnp.mean(stats['fm_loss'])
    if len(reward_names) > 1:
      for name in reward_names:
        metrics[f'reward/{name}_mean'] = jnp.mean(per[name])
        metrics[f'reward/{name}_std'] = jnp.std(per[name])
    return new, metrics

  def first(state, batch, key, consts):
    """Rollout + rewards: (trajectory without x̂0, per-reward scores)."""
    if gcfg.lora.rank and consts.get('base') is None:
      raise ValueError('grpo.lora.rank > 0 needs consts["base"] (the frozen generator params).')
    keys = split_keys(key)
    params = model_params(jax.lax.stop_gradient(state['params']), consts)
    ro = rollout(params, batch, keys, state['rl']['iteration'])
    per = score(consts['rewards'], ro, batch, keys['reward'], consts.get('decoder'))
    return {k: v for k, v in ro.items() if k != 'x0_hat'}, per

  def second(state, carry, batch, key, consts):
    ro, per = carry
    return update(state, consts, ro, per, batch, split_keys(key)['shuffle'])

  def step(state, batch, key, consts):
    return second(state, first(state, batch, key, consts), batch, key, consts)

  return GRPOFunctions(rollout=rollout, score=score, update=update, step=step, first=first,
                       second=second)
