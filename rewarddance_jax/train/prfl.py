"""PRFL: process reward feedback learning anywhere in the denoising chain (`trainer: prfl`).

PRFL (arXiv 2511.21541, Alg. 1; docs/algorithms.md §6.3). One jitted step per batch of real digits:
  1. s ~ U{0, …, N−2} (the whole trajectory, the paper's best "full" range); x_T ~ N(0, I);
     the first s Euler steps run without gradient (a `fori_loop` whose trip count is s, so the
     cost follows s) → x_s.
  2. One generator step with gradient: v = v_θ(x_s, σ_s, c), x_{s+1} = x_s + (σ_{s+1} − σ_s)·v.
  3. r = the frozen differentiable reward on x_{s+1}: the process reward (PAVRM) reads it as a
     noisy latent at σ_{s+1}, no decode; latent and pixel rewards get x̂0 = x_s − σ_s·v.
  4. L = λ·mean(relu(2 − r)) + w·L_FM on the batch's real images (`rl/prfl.py`); AdamW; EMA.
The reward's params come in as consts (never donated, never optimised).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rewarddance_jax import config_lib
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.families.digits import LATENT_SHAPE
from rewarddance_jax.families.base import unit_decode
from rewarddance_jax.data import pipeline
from rewarddance_jax.flow import matching, rollout as rollout_lib, schedules, steps
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.rewards import registry
from rewarddance_jax.rl import ema as ema_lib, prfl as prfl_lib
from rewarddance_jax.train import common, generate, loop as loop_lib, optim



@dataclasses.dataclass(frozen=True)
class PRFLConfig:
  schedule: str = 'linear'
  num_steps: int = 10
  shift: float = 1.0
  scale: float = 0.1
  fm_weight: float = 1.0
  ema_decay: float = 0.0

  RANGES = {'num_steps': '[2, inf)', 'shift': '(0, inf)', 'scale': '[0, inf)',
            'fm_weight': '[0, inf)', 'ema_decay': '[0, 1]'}

  @classmethod
  def from_config(cls, cfg) -> 'PRFLConfig':
    return config_lib.section(cls, cfg, 'config.prfl')


def make_prfl_step(graphdef, tx: optax.GradientTransformation, pcfg: PRFLConfig,
                   image_shape: tuple[int, ...]):
  """The pure step `(state, batch, key, consts) -> (state, metrics)`; consts = {'rewards'}."""
  sigmas_np = schedules.get_sigmas(pcfg.schedule, pcfg.num_steps, shift=pcfg.shift)

  def velocity(params, x, sigma, cond):
    return nnx.merge(graphdef, params)(x, jnp.full((x.shape[0],), sigma), cond)

  def loss_fn(params, batch, key, rewards):
    cond = {'tokens': batch['tokens'], 'mask': batch['mask']}
    b = batch['tokens'].shape[0]
    k_s, k_noise, k_fm, k_rew = jax.random.split(key, 4)
    sigmas = jnp.asarray(sigmas_np)
    s = jax.random.randint(k_s, (), 0, pcfg.num_steps - 1)
    x_init = rollout_lib.initial_noise(k_noise, (b,) + tuple(image_shape))
    frozen = jax.lax.stop_gradient(params)

    def ode(i, x):
      v = velocity(frozen, x, sigmas[i], cond)
      return steps.flow_step('ode', v, x, sigmas[i], sigmas[i + 1]).x_next

    x_s = jax.lax.stop_gradient(jax.lax.fori_loop(0, s, ode, x_init))
    sig, sig_next = sigmas[s], sigmas[s + 1]
    v = velocity(params, x_s, sig, cond)
    x_next = x_s + (sig_next - sig) * v
    x0_hat = x_s - sig * v
    samples = {'noisy_latents': x_next, 'sigma': jnp.full((b,), sig_next),
               'latents': x0_hat, 'pixels': unit_decode(x0_hat)}
    # The process reward reads the prompt (its backbone is the generator's text path).
    r = rewards.total(samples, {'labels': batch['labels'], **cond}, k_rew)

    x0 = batch['images'] * 2.0 - 1.0
    k_sig, k_eps = jax.random.split(k_fm)
    t = matching.sample_sigmas(k_sig, b)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    v_fm = nnx.merge(graphdef, params)(matching.interpolate(x0, eps, t), t, cond)
    fm = matching.flow_matching_loss(v_fm, x0, eps)
    loss, reward_term = prfl_lib.prfl_loss(r, fm, scale=pcfg.scale, fm_weight=pcfg.fm_weight)
    return loss, {'reward_mean': jnp.mean(r), 'reward_std': jnp.std(r), 'fm_loss': fm,
                  'reward_loss': reward_term, 'step_index': s.astype(jnp.float32)}

  def step(state, batch, key, consts):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], batch, key, consts['rewards'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = {'params': params, 'opt_state': opt_state}
    if 'ema' in state:
      new['ema'] = ema_lib.ema_update(state['ema'], params, pcfg.ema_decay)
    new, skipped = loop_lib.finite_or_skip(state, new, loss, grads)
    return new, dict(aux, loss=loss, grad_norm=optax.tree.norm(grads), skipped=skipped)

  return step


def train(config, workdir: str) -> dict:
  mesh, rules = common.setup_mesh(config)
  pcfg = PRFLConfig.from_config(config.prfl)
  tok = tokenizer_lib.load_or_build(workdir, config.model.get('vocab_size'))
  graphdef, params, pshard = common.init_policy(config, mesh, rules)
  tx = optim.make_optimizer(config.optax)
  state, shardings = common.policy_state(params, pshard, tx, mesh, pcfg.ema_decay)
  rewards = registry.build_rewards(config.rewards)
  if not rewards.differentiable:
    raise ValueError(f'PRFL needs differentiable rewards; config.rewards has '
                     f'{[r.name for r in rewards.rewards if not r.differentiable]} that are not.')
  data_iter = pipeline.digits_train_iter(int(config.data.batch_size), seed=int(config.seed),
                                         tokenizer=tok, max_len=int(config.data.max_text_len))

  def to_device(batch):
    return sharding_lib.host_to_global(
        {k: batch[k] for k in ('images', 'labels', 'tokens', 'mask')}, mesh, rules)

  state, last = common.run_loop(
      config, workdir, desc='prfl', state=state, shardings=shardings,
      step_fn=make_prfl_step(graphdef, tx, pcfg, LATENT_SHAPE), data_iter=data_iter,
      to_device=to_device, mesh=mesh, rules=rules,
      hooks=generate.judge_hooks(config, graphdef, tok, workdir, LATENT_SHAPE),
      consts={'rewards': rewards})
  return {'step': last}
