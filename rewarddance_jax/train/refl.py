"""ReFL alignment of the generator (`trainer: refl`; RD §3.3.1, docs/algorithms.md §7, §10 #18).

  1. Mesh, rules, the generator of `config.family` (`common.init_policy`: public weights,
     `config.init.generator`, or fresh).
  2. Pairwise VLM rewards (`kind: vlm_yes, mode: pairwise`) without `ref_images` get a best-of-N
     reference per digit prompt: N ODE samples per prompt from the frozen initial generator,
     every ordered pair (i, j) scored as P(j better than i | ref = i, generated = j), candidates
     ranked by win count (P > 0.5; ties by the summed P), the top `reference_top` per prompt
     written best first to `workdir/refl_reference.npz` (a samples file, reused when present) and
     loaded as consts['ref_images'] (10, T, ...): each step draws one of its label's top T per row
     as batch['ref_pixels'] (§10 #18: Top-2, one sampled per step); the reward also gets the file
     as `ref_images` (top-1) for scoring outside the step.
  3. Data (`common.image_or_prompt_data`): for token-conditioned families the digits training
     batches (images, labels, prompt tokens: the prompts drive the rollout, the images the
     optional flow-matching regulariser); for encoded families (FLUX, SD3.5) the pre-encoded
     prompt batches, with the family's guided velocity (CFG's negative rows) and codec.
  4. The step (pure, jitted once by the loop, state donated), per batch:
     a. mid ~ U{lo, ..., N−1} over the last `late_fraction` of the N steps (one for the batch);
     b. no-grad Euler ODE rollout with the current params from x_T ~ N(0, I) to x_mid
        (`lax.fori_loop` with a traced trip count: only mid model calls);
     c. ONE gradient step: x̂0 = x_mid − σ_mid·v_θ(x_mid, σ_mid, c); pixels = decode(x̂0);
     d. r = Σ_k w_k·R_k(pixels / x̂0); L = refl_loss(r) (`rl.refl`) + fm_weight·L_FM on the real
        digits of the batch (σ ~ U(0, 1), the flow pretraining loss);
     e. AdamW, optional EMA; a non-finite loss or gradient leaves the state unchanged.
  5. Hook every `config.samples.every` steps: ODE samples of the digit prompts, the judge's accuracy
     and the configured reward of those samples.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from rewarddance_jax import config_lib, families
from rewarddance_jax.data import label_table
from rewarddance_jax.families.base import Guidance, cond_from_batch, guided_velocity
from rewarddance_jax.data import samples as samples_lib
from rewarddance_jax.flow import matching, schedules, steps
from rewarddance_jax.parallel import rng as rng_lib
from rewarddance_jax.rewards import registry
from rewarddance_jax.rl import ema as ema_lib
from rewarddance_jax.rl import refl as refl_lib
from rewarddance_jax.train import common, generate, loop as loop_lib, optim

REFERENCE_FILE = 'refl_reference.npz'


@dataclasses.dataclass(frozen=True)
class ReFLConfig:
  """Static ReFL settings (from `config.refl`; defaults docs/algorithms.md §7, §10 #18)."""
  num_steps: int = 20
  schedule: str = 'linear'
  shift: float = 1.0
  late_fraction: float = 0.25
  loss: str = 'linear'
  scale: float = 1e-3
  target: float = 2.0
  fm_weight: float = 0.0
  ema_decay: float = 0.0
  reference_n: int = 16
  reference_top: int = 2

  RANGES = {'num_steps': '[1, inf)', 'shift': '(0, inf)', 'late_fraction': '(0, 1]',
            'scale': '[0, inf)', 'target': '(-inf, inf)', 'fm_weight': '[0, inf)',
            'ema_decay': '[0, 1]', 'reference_n': '[1, inf)',
            'reference_top': '[1, inf)'}

  def __post_init__(self):
    if self.loss not in refl_lib.LOSS_KINDS:
      raise ValueError(f'refl.loss={self.loss!r} is not one of {refl_lib.LOSS_KINDS}.')
    refl_lib.late_step_range(self.num_steps, self.late_fraction)
    if not 1 <= self.reference_top <= self.reference_n:
      raise ValueError(f'refl.reference_top={self.reference_top} must be in [1, reference_n='
                       f'{self.reference_n}].')

  @classmethod
  def from_config(cls, cfg) -> 'ReFLConfig':
    return config_lib.section(cls, cfg, 'config.refl')

  def sigmas(self, image_seq_len: int | None = None) -> np.ndarray:
    return schedules.get_sigmas(self.schedule, self.num_steps, shift=self.shift,
                                image_seq_len=image_seq_len)


def ode_to_step(velocity, params, x, sigmas: jax.Array, stop: jax.Array, cond) -> jax.Array:
  """Euler ODE from x at σ_0 through steps 0..stop−1 (traced `stop`), no gradient to params."""
  params = jax.lax.stop_gradient(params)
  b = x.shape[0]

  def body(i, x):
    v = velocity(params, x, jnp.full((b,), sigmas[i], jnp.float32), cond)
    return steps.flow_step('ode', v, x, sigmas[i], sigmas[i + 1]).x_next

  return jax.lax.stop_gradient(jax.lax.fori_loop(0, stop, body, x))


def reward_batch(batch: dict) -> dict:
  """The arrays rewards may read: everything but the real images."""
  return {k: v for k, v in batch.items() if k != 'images'}


def make_refl_step(graphdef, tx: optax.GradientTransformation, rcfg: ReFLConfig,
                   image_shape: tuple[int, ...], *, decode, image_seq_len: int | None = None,
                   velocity=None):
  """The pure ReFL step `(state, batch, key, consts) -> (state, metrics)` (module docstring);
  `velocity(params, x, σ, cond)`: the guided generator (default `graphdef` unguided).

  consts = {'rewards': WeightedRewards, 'ref_images': None or (10, T, H, W, C) best-of-N
  references (one of a label's T drawn per row per step → batch['ref_pixels']). The batch holds 'tokens', 'mask' (the prompts),
  'labels' (for digit rewards) and, when fm_weight > 0, 'images' in [0, 1].
  """
  sigmas_np = rcfg.sigmas(image_seq_len)
  lo, hi = refl_lib.late_step_range(rcfg.num_steps, rcfg.late_fraction)
  velocity = velocity or guided_velocity(graphdef, Guidance())

  def loss_fn(params, x_mid, sigma_mid, batch, cond, keys, rewards, decoder):
    v = velocity(params, x_mid, sigma_mid, cond)
    x0 = steps.predicted_x0(x_mid, sigma_mid, v)
    per = rewards.per_reward({'latents': x0, 'pixels': decode(x0, decoder)}, reward_batch(batch),
                             keys['reward'])
    total = rewards.combine(per)
    refl = refl_lib.refl_loss(total, rcfg.loss, scale=rcfg.scale, target=rcfg.target)
    loss, fm = refl, jnp.float32(0.0)
    if rcfg.fm_weight > 0:
      x_real = batch['images'] * 2.0 - 1.0
      sigma = matching.sample_sigmas(keys['fm_sigma'], x_real.shape[0])
      noise = jax.random.normal(keys['fm_noise'], x_real.shape, jnp.float32)
      v_fm = velocity(params, matching.interpolate(x_real, noise, sigma), sigma, cond)
      fm = matching.flow_matching_loss(v_fm, x_real, noise)
      loss = loss + rcfg.fm_weight * fm
    return loss, {'refl_loss': refl, 'fm_loss': fm, 'total': total, 'per': per}

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch, key, consts):
    keys = dict(zip(('mid', 'noise', 'reward', 'fm_sigma', 'fm_noise', 'ref'),
                    jax.random.split(key, 6)))
    rewards = consts['rewards']
    cond = cond_from_batch(batch)
    b = jax.tree.leaves(cond)[0].shape[0]
    if consts.get('ref_images') is not None:
      batch = dict(batch, ref_pixels=label_table.sample_table(consts['ref_images'],
                                                              batch['labels'], keys['ref']))
    sigmas = jnp.asarray(sigmas_np)
    mid = refl_lib.sample_step(keys['mid'], lo, hi)
    x_init = jax.random.normal(keys['noise'], (b,) + tuple(image_shape), jnp.float32)
    x_mid = ode_to_step(velocity, state['params'], x_init, sigmas, mid, cond)
    sigma_mid = jnp.full((b,), sigmas[mid], jnp.float32)
    (loss, aux), grads = grad_fn(state['params'], x_mid, sigma_mid, batch, cond, keys, rewards,
                                 consts.get('decoder'))
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = {'params': params, 'opt_state': opt_state}
    if 'ema' in state:
      new['ema'] = ema_lib.ema_update(state['ema'], params, rcfg.ema_decay)
    new, skipped = loop_lib.finite_or_skip({k: state[k] for k in new}, new, loss, grads)
    new['rl'] = {'iteration': state['rl']['iteration'] + 1}
    total = aux['total']
    metrics = {'loss': loss, 'skipped': skipped, 'refl_loss': aux['refl_loss'],
               'fm_loss': aux['fm_loss'], 'reward_mean': jnp.mean(total),
               'reward_std': jnp.std(total), 'grad_norm': optax.tree.norm(grads),
               'mid_step': mid.astype(jnp.float32)}
    if len(rewards.names) > 1:
      for name in rewards.names:
        metrics[f'reward/{name}_mean'] = jnp.mean(aux['per'][name])
    return new, metrics

  return step


def load_references(path: str, top: int) -> np.ndarray:
  """(10, top, H, W, C) from a reference samples file written by `build_reference`."""
  loaded = samples_lib.load_samples(path)
  out = []
  for label in range(10):
    rows = np.flatnonzero(loaded['labels'] == label)[:top]
    if len(rows) < top:
      raise ValueError(f'{path}: {len(rows)} reference image(s) for label {label}, need {top} '
                       f'(refl.reference_top); delete the file to rebuild it.')
    out.append(loaded['images'][rows])
  return np.stack(out).astype(np.float32)


def build_state(params, pshard, tx, mesh, ema_decay: float) -> tuple[dict, dict]:
  """(state, shardings): params, optimizer, optional EMA, 'rl' iteration counter."""
  state, shardings = common.policy_state(params, pshard, tx, mesh, ema_decay)
  replicated = NamedSharding(mesh, P())
  state['rl'] = {'iteration': jax.device_put(np.zeros((), np.int32), replicated)}
  shardings['rl'] = {'iteration': replicated}
  return state, shardings


# ----------------------------------------------------------------------------------------------
# Best-of-N pairwise reference (RD §3.3.1).
# ----------------------------------------------------------------------------------------------


def win_counts(pref: np.ndarray) -> np.ndarray:
  """Rank scores of N candidates from pref[i, j] = P(j better than i) (diagonal ignored).

  score_j = #{i ≠ j : pref[i, j] > 0.5} + Σ_{i≠j} pref[i, j] / (N + 1): the win count, with
  ties broken by the summed preference (which is < 1 after the division, so it never
  outweighs a win).
  """
  pref = np.asarray(pref, np.float64)
  n = pref.shape[0]
  off = ~np.eye(n, dtype=bool)
  wins = np.sum((pref > 0.5) & off, axis=0)
  soft = np.sum(np.where(off, pref, 0.0), axis=0) / (n + 1)
  return wins + soft


def pairwise_reward_entries(config) -> list[str]:
  """Names of config.rewards entries that are pairwise VLM rewards without reference images."""
  out = []
  for name, entry in dict(config.rewards).items():
    entry = dict(entry)
    if (entry.get('kind', name) == 'vlm_yes' and entry.get('mode') == 'pairwise'
        and not entry.get('ref_images')):
      out.append(name)
  return out


def build_reference(config, rcfg: ReFLConfig, workdir: str, graphdef, params, tok,
                    reward_name: str, shape: tuple[int, ...], batch_rows: int = 256) -> str:
  """Writes (or reuses) `workdir/refl_reference.npz`: the top candidates per digit prompt."""
  path = os.path.join(workdir, REFERENCE_FILE)
  if os.path.exists(path):
    logging.info('ReFL reference: reusing %s.', path)
    return path
  n = rcfg.reference_n
  sample_fn = generate.make_sampler(graphdef, config.sampler, shape)
  images, labels, prompts = generate.sample_digits(
      sample_fn, params, tok, per_class=n, max_len=int(config.data.max_text_len),
      key=rng_lib.key(config.seed, 'refl_reference'))
  entry = dict(config.rewards[reward_name])
  entry.pop('weight', None)
  reward = registry.build_rewards({reward_name: entry}).rewards[0]
  score = jax.jit(lambda r, gen, ref, lab: r({'pixels': gen}, {'labels': lab, 'ref_pixels': ref}))
  # All ordered pairs (i, j) within each prompt: ref = candidate i, generated = candidate j.
  groups = images.reshape((10, n) + images.shape[1:])
  ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing='ij')
  refs = groups[:, ii.ravel()].reshape((-1,) + images.shape[1:])
  gens = groups[:, jj.ravel()].reshape((-1,) + images.shape[1:])
  labs = np.repeat(np.arange(10, dtype=np.int32), n * n)
  probs = []
  for s in range(0, len(labs), batch_rows):
    sl = slice(s, s + batch_rows)
    probs.append(np.asarray(score(reward, gens[sl], refs[sl], labs[sl])))
  pref = np.concatenate(probs).reshape(10, n, n)
  keep_images, keep_labels, keep_prompts = [], [], []
  for p in range(10):
    order = np.argsort(-win_counts(pref[p]), kind='stable')[:rcfg.reference_top]
    keep_images.append(groups[p, order])
    keep_labels += [p] * len(order)
    keep_prompts += [prompts[p * n]] * len(order)
  samples_lib.save_samples(path, np.concatenate(keep_images), np.asarray(keep_labels),
                           keep_prompts)
  logging.info('ReFL reference: best %d of %d per prompt by pairwise wins → %s.',
               rcfg.reference_top, n, path)
  return path


def train(config, workdir: str) -> dict:
  mesh, rules = common.setup_mesh(config)
  rcfg = ReFLConfig.from_config(config.refl)
  fam = families.from_config(config)
  tok = fam.tokenizer(workdir)
  graphdef, params, pshard = common.init_policy(config, mesh, rules)

  rewards_cfg = {k: dict(v) for k, v in dict(config.rewards).items()}
  ref_images = None
  for name in pairwise_reward_entries(config):
    if tok is None:
      raise ValueError(f'config.rewards.{name}: the best-of-N pairwise reference is built per '
                       f'digit prompt; give it ref_images for family {fam.name}.')
    with common.mesh_context(mesh, rules):
      path = build_reference(config, rcfg, workdir, graphdef, params, tok, name,
                             fam.latent_shape)
    rewards_cfg[name]['ref_images'] = path   # top-1, for scoring outside the step (the hook)
    ref_images = jax.device_put(load_references(path, rcfg.reference_top),
                                NamedSharding(mesh, P()))
  rewards = registry.build_rewards(rewards_cfg, mesh, rules)
  if not rewards.differentiable:
    raise ValueError(f'ReFL needs differentiable rewards; config.rewards has '
                     f'{[r.name for r in rewards.rewards if not r.differentiable]} that are not.')

  tx = optim.make_optimizer(config.optax)
  state, shardings = build_state(params, pshard, tx, mesh, rcfg.ema_decay)
  consts = {'rewards': rewards, 'ref_images': ref_images}
  data_iter, to_device = common.image_or_prompt_data(config, fam, tok, 'refl', rcfg.fm_weight,
                                                     mesh, rules)
  codec = fam.codec(mesh, rules)
  consts['decoder'] = codec.params
  step_fn = make_refl_step(graphdef, tx, rcfg, fam.latent_shape,
                           decode=codec.decode,
                           velocity=fam.velocity(graphdef))
  hooks = [] if tok is None else generate.judge_hooks(config, graphdef, tok, workdir,
                                                      fam.latent_shape, rewards)
  state, last = common.run_loop(
      config, workdir, desc='refl', state=state, shardings=shardings, step_fn=step_fn,
      data_iter=data_iter, to_device=to_device, mesh=mesh, rules=rules, hooks=hooks, consts=consts)
  return {'step': last}
