"""Flow-matching pretraining of the generator (`trainer: flow`).

  1. Mesh and rules from the config; the generator's fp32 params and the AdamW state are created
     directly in their shardings (`parallel/sharding.py`).
  2. Data: the digits Grain pipeline (images in [0, 1] → x0 in [−1, 1], prompt tokens).
  3. Step (pure, jitted once by the shared loop, state donated): σ ~ config.flow sampler,
     ε ~ N(0, I), loss = flow_matching_loss(v_θ(x_σ, σ, c), x0, ε); AdamW; EMA of params when
     `config.ema_decay > 0`; a non-finite loss or gradient leaves the state unchanged.
  4. Hook every `config.samples.every` steps: ODE samples of the ten digit prompts from a fixed key
     (EMA params if any) → `samples/samples_<step>.npz` + `.png`, and the judge's accuracy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.families.digits import LATENT_SHAPE
from rewarddance_jax.data import pipeline
from rewarddance_jax.flow import matching
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.train import common, generate, loop as loop_lib, optim



def make_train_step(graphdef, tx: optax.GradientTransformation, flow_cfg, ema_decay: float):
  """The pure step `(state, batch, key) -> (state, metrics)`."""
  kind = flow_cfg.get('sigma_sampler', 'uniform')
  shift = float(flow_cfg.get('shift', 1.0))

  def loss_fn(params, batch, key):
    x0 = batch['images'] * 2.0 - 1.0
    k_sigma, k_noise = jax.random.split(key)
    sigma = matching.sample_sigmas(k_sigma, x0.shape[0], kind=kind, shift=shift)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    model = nnx.merge(graphdef, params)
    v = model(matching.interpolate(x0, noise, sigma), sigma,
              {'tokens': batch['tokens'], 'mask': batch['mask']})
    return matching.flow_matching_loss(v, x0, noise)

  def step(state, batch, key):
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], batch, key)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = {'params': params, 'opt_state': opt_state}
    if 'ema' in state:
      new['ema'] = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                state['ema'], params)
    new, skipped = loop_lib.finite_or_skip(state, new, loss, grads)
    return new, {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'skipped': skipped}

  return step


def build_state(config, mesh, rules, *, abstract: bool = False):
  """(graphdef, state {'params', 'opt_state', ['ema']}, shardings, optimizer, model cfg): the
  trainer's state, and with `abstract` the layout scanner's (the same code, shapes only)."""
  graphdef, params, pshard, gen_cfg = common.build_generator(config, mesh, rules,
                                                             abstract=abstract)
  tx = optim.make_optimizer(config.optax)
  state, shardings = common.policy_state(params, pshard, tx, mesh,
                                         float(config.get('ema_decay', 0.0)), abstract=abstract)
  return graphdef, state, shardings, tx, gen_cfg


def train(config, workdir: str) -> dict:
  mesh, rules = common.setup_mesh(config)
  tok = tokenizer_lib.load_or_build(workdir, config.model.get('vocab_size'))
  graphdef, state, shardings, tx, _ = build_state(config, mesh, rules)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state['params']))
  logging.info('Generator %s: %.3fM params.', config.model.get('name', ''), n_params / 1e6)
  ema_decay = float(config.get('ema_decay', 0.0))

  max_len = int(config.data.max_text_len)
  data_iter = pipeline.digits_train_iter(int(config.data.batch_size), seed=int(config.seed),
                                         tokenizer=tok, max_len=max_len)

  def to_device(batch):
    return sharding_lib.host_to_global(
        {k: batch[k] for k in ('images', 'tokens', 'mask')}, mesh, rules)

  step_fn = make_train_step(graphdef, tx, config.flow, ema_decay)
  state, last = common.run_loop(
      config, workdir, desc='flow', state=state, shardings=shardings, step_fn=step_fn,
      data_iter=data_iter, to_device=to_device, mesh=mesh, rules=rules,
      hooks=generate.judge_hooks(config, graphdef, tok, workdir, LATENT_SHAPE))
  return {'step': last}
