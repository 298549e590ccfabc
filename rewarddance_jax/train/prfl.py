"""PRFL: process reward feedback learning anywhere in the denoising chain (`trainer: prfl`).

PRFL (arXiv 2511.21541, Alg. 1; docs/algorithms.md §6.3), on the generator of `config.family`
(its guided velocity and codec). One jitted step per batch (prompts; real images with fm_weight):
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

from rewarddance_jax import config_lib, families
from rewarddance_jax.families.base import Guidance, cond_from_batch, guided_velocity, unit_decode
from rewarddance_jax.flow import matching, rollout as rollout_lib, schedules, steps
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
                   image_shape: tuple[int, ...], *, velocity=None, decode=unit_decode):
  """The pure step `(state, batch, key, consts) -> (state, metrics)`; consts = {'rewards',
  optionally 'decoder' (the codec's params)}. `velocity(params, x, σ, cond)`: the family's guided
  generator (default `graphdef` unguided); `decode(x̂0, params)`: the codec."""
  sigmas_np = schedules.get_sigmas(pcfg.schedule, pcfg.num_steps, shift=pcfg.shift)
  velocity = velocity or guided_velocity(graphdef, Guidance())

  def loss_fn(params, batch, key, rewards, decoder):
    cond = cond_from_batch(batch)
    b = jax.tree.leaves(cond)[0].shape[0]
    k_s, k_noise, k_fm, k_rew = jax.random.split(key, 4)
    sigmas = jnp.asarray(sigmas_np)
    s = jax.random.randint(k_s, (), 0, pcfg.num_steps - 1)
    x_init = rollout_lib.initial_noise(k_noise, (b,) + tuple(image_shape))
    frozen = jax.lax.stop_gradient(params)

    def ode(i, x):
      v = velocity(frozen, x, jnp.full((b,), sigmas[i], jnp.float32), cond)
      return steps.flow_step('ode', v, x, sigmas[i], sigmas[i + 1]).x_next

    x_s = jax.lax.stop_gradient(jax.lax.fori_loop(0, s, ode, x_init))
    sig, sig_next = sigmas[s], sigmas[s + 1]
    v = velocity(params, x_s, jnp.full((b,), sig, jnp.float32), cond)
    x_next = x_s + (sig_next - sig) * v
    x0_hat = x_s - sig * v
    samples = {'noisy_latents': x_next, 'sigma': jnp.full((b,), sig_next),
               'latents': x0_hat, 'pixels': decode(x0_hat, decoder)}
    # The process reward reads the prompt (its backbone is the generator's text path).
    r = rewards.total(samples, {k: v for k, v in batch.items() if k != 'images'}, k_rew)

    fm = jnp.float32(0.0)
    if pcfg.fm_weight > 0:
      x0 = batch['images'] * 2.0 - 1.0
      k_sig, k_eps = jax.random.split(k_fm)
      t = matching.sample_sigmas(k_sig, b)
      eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
      fm = matching.flow_matching_loss(velocity(params, matching.interpolate(x0, eps, t), t,
                                                cond), x0, eps)
    loss, reward_term = prfl_lib.prfl_loss(r, fm, scale=pcfg.scale, fm_weight=pcfg.fm_weight)
    return loss, {'reward_mean': jnp.mean(r), 'reward_std': jnp.std(r), 'fm_loss': fm,
                  'reward_loss': reward_term, 'step_index': s.astype(jnp.float32)}

  def step(state, batch, key, consts):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], batch, key, consts['rewards'], consts.get('decoder'))
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
  fam = families.from_config(config)
  pcfg = PRFLConfig.from_config(config.prfl)
  tok = fam.tokenizer(workdir)
  graphdef, params, pshard = common.init_policy(config, mesh, rules)
  tx = optim.make_optimizer(config.optax)
  state, shardings = common.policy_state(params, pshard, tx, mesh, pcfg.ema_decay)
  rewards = registry.build_rewards(config.rewards, mesh, rules)
  if not rewards.differentiable:
    raise ValueError(f'PRFL needs differentiable rewards; config.rewards has '
                     f'{[r.name for r in rewards.rewards if not r.differentiable]} that are not.')
  codec = fam.codec(mesh, rules)
  data_iter, to_device = common.image_or_prompt_data(config, fam, tok, 'prfl', pcfg.fm_weight,
                                                     mesh, rules)
  hooks = [] if tok is None else generate.judge_hooks(config, graphdef, tok, workdir,
                                                      fam.latent_shape)
  state, last = common.run_loop(
      config, workdir, desc='prfl', state=state, shardings=shardings,
      step_fn=make_prfl_step(graphdef, tx, pcfg, fam.latent_shape,
                             velocity=fam.velocity(graphdef), decode=codec.decode),
      data_iter=data_iter, to_device=to_device, mesh=mesh, rules=rules, hooks=hooks,
      consts={'rewards': rewards, 'decoder': codec.params})
  return {'step': last}
