"""GRPO alignment of the generator (`trainer: grpo`; DanceGRPO / Flow-GRPO / MixGRPO knobs).

  1. Mesh, rules and the generator built sharded; params restored from `config.init.generator`
     (a flow or earlier alignment run's workdir) when given; AdamW state in the params' layout.
  2. Rewards from `config.rewards` (`rewards/registry.py`); a frozen copy of the initial params
     as the KL reference when `config.grpo.kl_beta > 0`. Both are passed to the step as consts.
     With `config.grpo.lora.rank` > 0 the state holds a LoRA of the generator (`init_lora`,
     sharded like the kernels it adapts) and the initial params become consts['base'], which is
     also the KL reference; checkpoints then hold the LoRA, its optimizer state and 'rl'.
  3. Prompts: `config.data.prompts` (a jsonl/csv prompt file) or the digit prompts; each batch has
     batch_size / G distinct prompts, each repeated G times adjacently (`data/pipeline.py`).
  4. The step (`train/grpo_step.py`): rollout, rewards, group advantages, M minibatch updates,
     all in one jitted function on device; checkpoints, resume, SIGTERM as every trainer.
  5. Hook every `config.samples.every` iterations: ODE samples of the digit prompts, the judge's
     accuracy and the configured reward of those samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rewarddance_jax.data import digits, pipeline, prompts as prompts_lib
from rewarddance_jax.nn import lora as lora_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.rewards import registry
from rewarddance_jax.train import common, generate, grpo_step, optim

IMAGE_SHAPE = (16, 16, 1)


def decode_unit(x0: jax.Array) -> jax.Array:
  """The digits' identity "VAE": model space [−1, 1] → pixels [0, 1] (differentiable inside)."""
  return jnp.clip((x0 + 1.0) * 0.5, 0.0, 1.0)


def prompt_records(config):
  path = config.data.get('prompts', '')
  return prompts_lib.load_prompt_file(path) if path else prompts_lib.digits_prompt_records()


def digits_host_batch(batch: dict) -> dict:
  """Arrays of a prompt batch, with the digit each prompt asks for as 'labels' (-1 if none)."""
  labels = []
  for text in batch['prompts']:
    try:
      labels.append(digits.label_from_prompt(text))
    except ValueError:
      labels.append(-1)
  return {'tokens': batch['tokens'], 'mask': batch['mask'],
          'labels': np.asarray(labels, np.int32)}


def build_state(config, params, pshard, tx, mesh, batch_size: int, gcfg) -> tuple[dict, dict]:
  """(state, shardings): params, optimizer, optional EMA, and 'rl' (iteration, reward window)."""
  del config
  state, shardings = common.policy_state(params, pshard, tx, mesh, gcfg.ema_decay)
  replicated = NamedSharding(mesh, P())
  rl = grpo_step.init_rl_state(gcfg, batch_size)
  state['rl'] = jax.device_put(rl, replicated)
  shardings['rl'] = jax.tree.map(lambda _: replicated, rl)
  return state, shardings


def init_lora(lcfg, params, pshard, key: jax.Array) -> tuple[dict, dict]:
  """(LoRA tree, its NamedShardings) for `params`, created sharded like the adapted kernels."""
  make = lambda p: lora_lib.init_lora(p, rank=lcfg.rank, alpha=lcfg.alpha,  # pylint: disable=unnecessary-lambda-assignment
                                      targets=lcfg.targets, key=key)
  shard = lora_lib.lora_shardings(jax.eval_shape(make, params), pshard)
  return jax.jit(make, out_shardings=shard)(params), shard


def lora_hooks(hooks, base, pshard, scale: float):
  """Hooks that read state['params'] (or 'ema') as a full generator, given a LoRA state."""
  merge = jax.jit(lambda b, l: lora_lib.merge(b, l, scale), out_shardings=pshard)

  def wrap(fn):
    return lambda st, step: fn({'params': merge(base, st.get('ema', st['params']))}, step)

  return [(every, wrap(fn)) for every, fn in hooks]


def train(config, workdir: str) -> dict:
  mesh, rules = common.setup_mesh(config)
  gcfg = grpo_step.GRPOConfig.from_config(config.grpo)
  batch_size = int(config.data.batch_size)
  if batch_size % gcfg.group_size or batch_size % gcfg.minibatches:
    raise ValueError(f'config.data.batch_size={batch_size} must be divisible by '
                     f'grpo.group_size={gcfg.group_size} and grpo.minibatches={gcfg.minibatches}.')
  tok = common.digits_tokenizer(workdir, config.model.get('vocab_size'))
  graphdef, params, pshard = common.init_policy(config, mesh, rules)

  tx = optim.make_optimizer(config.optax)
  base = ref = None
  trainable, tshard = params, pshard
  if gcfg.lora.rank:   # the base is a const (never donated), so it is also the KL reference
    base = params
    trainable, tshard = init_lora(gcfg.lora, params, pshard, jax.random.key(int(config.seed) + 3))
  if gcfg.kl_beta > 0:
    ref = base if base is not None else jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                                                out_shardings=pshard)(params)
  state, shardings = build_state(config, trainable, tshard, tx, mesh, batch_size, gcfg)
  rewards = registry.build_rewards(config.rewards)
  consts = {'rewards': rewards, 'ref': ref, 'base': base}

  max_len = int(config.data.max_text_len)
  data_iter = pipeline.prompt_iter(prompt_records(config), batch_size, seed=int(config.seed),
                                   tokenizer=tok, max_len=max_len, repeat_each=gcfg.group_size)

  def to_device(batch):
    return sharding_lib.host_to_global(digits_host_batch(batch), mesh, rules)

  step_fn = grpo_step.make_grpo_step(
      graphdef, tx, gcfg, IMAGE_SHAPE, reward_names=rewards.names,
      reward_weights=rewards.weights, decode=decode_unit)

  hooks = generate.judge_hooks(config, graphdef, tok, workdir, IMAGE_SHAPE, rewards)
  if gcfg.lora.rank:
    hooks = lora_hooks(hooks, base, pshard, gcfg.lora.scale)
  state, last = common.run_loop(
      config, workdir, desc='grpo', state=state, shardings=shardings, step_fn=step_fn,
      data_iter=data_iter, to_device=to_device, mesh=mesh, rules=rules, hooks=hooks, consts=consts)
  return {'step': last}
