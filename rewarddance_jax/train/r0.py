"""R0: regularised reward maximisation, few-step generator (`trainer: r0`; docs/algorithms.md §8).

  1. Mesh, rules, the generator of the run's family (`config.family`) restored from
     `config.init.generator` (the pretrained base) or public weights (`config.init.weights`,
     `common.init_policy`); a frozen copy θ0 of it is the L2 anchor (a const, not checkpointed).
  2. Data: prompts only (R0 trains without images), as the family conditions them
     (`GeneratorFamily.prompt_data`: tokens or pre-encoded, the negative prompt under CFG), the
     family's guided velocity, and its codec decoding x̂0 for pixel rewards (`config.vae`).
  3. The step (pure, jitted once by the loop, state donated):
     a. g_θ is K DDIM-η steps on `r0.sigmas` (K = 4): from z ~ N(0, I),
        x_{k+1} = (1 − σ_{k+1})·x̂0_k + σ_{k+1}·(sqrt(1 − η²)·ε̂_k + η·ξ_k) (`flow/ddim.py`), with a
        fresh η ~ U(0, eta_max) per step and sample (§8 regulariser b); σ_K = 0, so the last step
        returns x̂0;
     b. full mode: backpropagate through all K steps (each step rematerialised when `remat`);
        R0+ (`plus: True`): k ~ U{0..K−1}, steps 0..k−1 without gradient, then x̂0 = x_k − σ_k·v_θ
        with the gradient (intermediate supervision with stop-gradient through earlier steps);
     c. per-reward gradient normalisation in x̂0 space (`rl.r0.normalized_direction`; for the
        digits x̂0 space is pixel space up to the affine decode), the surrogate −⟨d, x̂0⟩ plus
        λ·‖θ − θ0‖² (`rl.r0`); with `reward_cap` τ > 0 the maximised reward is min(R, τ);
     d. AdamW, optional EMA; a non-finite loss or gradient leaves the state unchanged.
  4. Hook every `config.samples.every` steps (token-conditioned families): ODE samples (set `config.sampler` to
     the K-step grid: DDIM with η = 0 is the Euler step), the judge's accuracy and the reward.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rewarddance_jax import config_lib, families
from rewarddance_jax.families.base import Guidance, cond_from_batch, guided_velocity
from rewarddance_jax.flow import ddim, schedules, steps
from rewarddance_jax.rewards import registry
from rewarddance_jax.rl import ema as ema_lib
from rewarddance_jax.rl import r0 as r0_lib
from rewarddance_jax.train import common, generate, loop as loop_lib, optim
from rewarddance_jax.train import refl as refl_trainer

@dataclasses.dataclass(frozen=True)
class R0Config:
  """Static R0 settings (from `config.r0`; docs/algorithms.md §8, §10 #27)."""
  num_steps: int = 4
  schedule: str = 'linear'
  shift: float = 1.0
  eta_max: float = 1.0
  l2_weight: float = 1e-3
  norm_eps: float = 1e-8
  reward_cap: float = 0.0
  plus: bool = False
  remat: bool = True
  ema_decay: float = 0.0

  RANGES = {'num_steps': '[1, inf)', 'shift': '(0, inf)', 'eta_max': '[0, 1]',
            'l2_weight': '[0, inf)', 'norm_eps': '[0, inf)', 'reward_cap': '[0, inf)',
            'ema_decay': '[0, 1]'}

  @classmethod
  def from_config(cls, cfg) -> 'R0Config':
    return config_lib.section(cls, cfg, 'config.r0')

  def sigmas(self, image_seq_len: int | None = None) -> np.ndarray:
    return schedules.get_sigmas(self.schedule, self.num_steps, shift=self.shift,
                                image_seq_len=image_seq_len)


def make_r0_step(graphdef, tx: optax.GradientTransformation, rcfg: R0Config,
                 image_shape: tuple[int, ...], *, decode, image_seq_len: int | None = None,
                 velocity=None):
  """The pure R0 step `(state, batch, key, consts) -> (state, metrics)` (module docstring);
  `velocity(params, x, σ, cond)`: the guided generator (default `graphdef` unguided).

  consts = {'rewards': WeightedRewards (differentiable), 'init': θ0, and optionally 'decoder':
  the params of `decode(x̂0, params)` (the VAE's; absent: None, the digits' identity decode)}.
  """
  sigmas_np = rcfg.sigmas(image_seq_len)
  k_steps = rcfg.num_steps
  velocity = velocity or guided_velocity(graphdef, Guidance())

  def gen_step(params, x, k, eta, xi, cond):
    """DDIM-η step k: (x_{k+1}, x̂0_k)."""
    sigmas = jnp.asarray(sigmas_np)
    sigma = jnp.full((x.shape[0],), sigmas[k], jnp.float32)
    v = velocity(params, x, sigma, cond)
    return (ddim.ddim_eta_step(v, x, sigma, sigmas[k + 1], eta[k], xi[k]),
            steps.predicted_x0(x, sigma, v))

  def generate_x0(params, x, eta, xi, cond, k_star):
    """x̂0 with the gradient of the configured mode (full K steps or R0+)."""
    if not rcfg.plus:
      body = lambda x, k: (gen_step(params, x, k, eta, xi, cond)[0], None)  # pylint: disable=unnecessary-lambda-assignment
      if rcfg.remat:
        body = jax.checkpoint(body)
      x, _ = jax.lax.scan(body, x, jnp.arange(k_steps))
      return x   # σ_K = 0: the last step returns its x̂0
    frozen = jax.lax.stop_gradient(params)
    x_k = jax.lax.fori_loop(0, k_star, lambda k, x: gen_step(frozen, x, k, eta, xi, cond)[0], x)
    return gen_step(params, jax.lax.stop_gradient(x_k), k_star, eta, xi, cond)[1]

  def loss_fn(params, x_init, eta, xi, cond, rbatch, k_star, key, consts):
    rewards = consts['rewards']
    decoder = consts.get('decoder')
    x0 = generate_x0(params, x_init, eta, xi, cond, k_star)
    fns = {}
    for i, reward in enumerate(rewards.rewards):
      sub = jax.random.fold_in(key, i)
      fns[reward.name] = (lambda x, r=reward, s=sub: r(
          {'latents': x, 'pixels': decode(x, decoder)}, rbatch, s))
    direction, per = r0_lib.normalized_direction(fns, rewards.weights, x0, eps=rcfg.norm_eps,
                                                 cap=rcfg.reward_cap or None)
    surrogate = r0_lib.surrogate_loss(x0, direction)
    l2 = r0_lib.l2_to_init(params, consts['init'])
    loss = surrogate + rcfg.l2_weight * l2
    return loss, {'surrogate': surrogate, 'l2': l2, 'per': per, 'total': rewards.combine(per)}

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch, key, consts):
    keys = dict(zip(('noise', 'eta', 'xi', 'k', 'reward'), jax.random.split(key, 5)))
    cond = cond_from_batch(batch)
    b = jax.tree.leaves(cond)[0].shape[0]
    shape = (b,) + tuple(image_shape)
    x_init = jax.random.normal(keys['noise'], shape, jnp.float32)
    eta = rcfg.eta_max * jax.random.uniform(keys['eta'], (k_steps, b), jnp.float32)
    xi = jax.random.normal(keys['xi'], (k_steps,) + shape, jnp.float32)
    k_star = jax.random.randint(keys['k'], (), 0, k_steps, jnp.int32)
    rbatch = {k: v for k, v in batch.items() if k not in ('images',)}
    (loss, aux), grads = grad_fn(state['params'], x_init, eta, xi, cond, rbatch, k_star,
                                 keys['reward'], consts)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = {'params': params, 'opt_state': opt_state}
    if 'ema' in state:
      new['ema'] = ema_lib.ema_update(state['ema'], params, rcfg.ema_decay)
    new, skipped = loop_lib.finite_or_skip({k: state[k] for k in new}, new, loss, grads)
    new['rl'] = {'iteration': state['rl']['iteration'] + 1}
    total = aux['total']
    metrics = {'loss': loss, 'skipped': skipped, 'surrogate': aux['surrogate'], 'l2': aux['l2'],
               'reward_mean': jnp.mean(total), 'reward_std': jnp.std(total),
               'grad_norm': optax.tree.norm(grads)}
    if rcfg.plus:
      metrics['supervised_step'] = k_star.astype(jnp.float32)
    if len(rewards_names := tuple(aux['per'])) > 1:
      for name in rewards_names:
        metrics[f'reward/{name}_mean'] = jnp.mean(aux['per'][name])
    return new, metrics

  return step


def train(config, workdir: str) -> dict:
  mesh, rules = common.setup_mesh(config)
  fam = families.from_config(config)
  rcfg = R0Config.from_config(config.r0)
  batch_size = int(config.data.batch_size)
  tok = fam.tokenizer(workdir)
  graphdef, params, pshard = common.init_policy(config, mesh, rules)

  rewards = registry.build_rewards(config.rewards, mesh, rules)
  if not rewards.differentiable:
    raise ValueError(f'R0 needs differentiable rewards; config.rewards has '
                     f'{[r.name for r in rewards.rewards if not r.differentiable]} that are not.')
  tx = optim.make_optimizer(config.optax)
  state, shardings = refl_trainer.build_state(params, pshard, tx, mesh, rcfg.ema_decay)
  theta0 = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=pshard)(params)
  codec = fam.codec(mesh, rules)
  consts = {'rewards': rewards, 'init': theta0, 'decoder': codec.params}
  _, data_iter, to_device = fam.prompt_data(batch_size, 1, mesh, rules, tok=tok)

  step_fn = make_r0_step(graphdef, tx, rcfg, fam.latent_shape, decode=codec.decode,
                         velocity=fam.velocity(graphdef))
  hooks = [] if tok is None else generate.judge_hooks(config, graphdef, tok, workdir,
                                                      fam.latent_shape, rewards)
  state, last = common.run_loop(
      config, workdir, desc='r0', state=state, shardings=shardings, step_fn=step_fn,
      data_iter=data_iter, to_device=to_device, mesh=mesh, rules=rules, hooks=hooks, consts=consts)
  return {'step': last}
