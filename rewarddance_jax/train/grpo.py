"""GRPO alignment of the generator (`trainer: grpo`; DanceGRPO / Flow-GRPO / MixGRPO knobs).

  1. Mesh, rules and the generator built sharded; params restored from `config.init.generator`
     (a flow or earlier alignment run's workdir) when given; AdamW state in the params' layout.
  2. Rewards from `config.rewards` (`rewards/registry.py`); a frozen copy of the initial params
     as the KL reference when `config.grpo.kl_beta > 0`. Both are passed to the step as consts.
     With `config.grpo.lora.rank` > 0 the state holds a LoRA of the generator (`init_lora`,
     sharded like the kernels it adapts) and the initial params become consts['base'], which is
     also the KL reference; checkpoints then hold the LoRA, its optimizer state and 'rl'.
     With `config.grpo.fm_weight` > 0, consts['fm_images'] holds the real training digits per
     label (`fm_table`) for the flow-matching term of the update.
  3. The generator family (`config.family`, families/): prompts as the family conditions them
     (token ids, or the T5/CLIP outputs `launch.encode_prompts` wrote, with the negative prompt
     under classifier-free guidance), each batch batch_size / G distinct prompts, each repeated
     G times adjacently; latents of `config.data.latent_shape`; the guided velocity; the codec
     (`config.vae`: x̂0 → VAE decode → pixels in [0, 1] inside the step, the VAE params a const,
     consts['decoder']; without it the identity). Public weights: `config.init.weights.src`.
  4. The step (`train/grpo_step.py`): rollout, rewards, group advantages, M minibatch updates,
     all in one jitted function on device, or with `grpo.split` as two (rollout + rewards, then
     the update; `loop.SplitStep`) for a program too big to compile as one; checkpoints, resume,
     SIGTERM as every trainer.
  5. Hook every `config.samples.every` iterations (token-conditioned families): ODE samples of the digit prompts,
     the judge's accuracy and the configured reward of those samples.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rewarddance_jax import families
from rewarddance_jax.data import digits, label_table, prompts as prompts_lib
from rewarddance_jax.nn import lora as lora_lib
from rewarddance_jax.parallel import rng as rng_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.rewards import registry
from rewarddance_jax.train import common, generate, grpo_step, loop as loop_lib, optim

def lora_base(params, pshard, lcfg, *, abstract: bool = False):
  """The frozen base of a LoRA run in `grpo.lora.base_dtype` (a const: never donated)."""
  dtype = jnp.dtype(lcfg.base_dtype)
  if all(a.dtype == dtype for a in jax.tree.leaves(params)):
    return params
  return sharding_lib.materialize(lambda p: jax.tree.map(lambda a: a.astype(dtype), p), params,
                                 out_shardings=pshard, abstract=abstract)


def fm_table(config, records) -> np.ndarray:
  """(10, T, 16, 16, 1): the real training digits of each label, for `grpo.fm_weight` (the
  flow-matching term on real images). Every prompt must name a digit."""
  texts = [getattr(rec, 'prompt', rec) for rec in records]
  for text, label in zip(texts, prompts_lib.prompt_labels(texts)):
    if label < 0:
      raise ValueError(f'grpo.fm_weight > 0 trains on real digits and needs digit prompts; '
                       f'{text!r} names no digit.')
  split = digits.load_split('train', int(config.seed))
  return label_table.build_table(split['images'], split['labels'], 10)


@dataclasses.dataclass
class Policy:
  """What a GRPO run trains (`build_policy`): the family, settings, the generator's graphdef,
  the state {'params' (the generator or its LoRA), 'opt_state', ['ema'], 'rl'} with its
  shardings, and the frozen trees 'base' (under a LoRA) and 'ref' (kl_beta > 0) or None."""
  fam: Any
  gcfg: grpo_step.GRPOConfig
  tx: Any
  graphdef: Any
  model_cfg: Any
  state: dict
  shardings: dict
  frozen: dict
  pshard: Any
  batch_size: int
  num_params: int          # the generator's


def check_batch(config, gcfg) -> int:
  batch_size = int(config.data.batch_size)
  trained = batch_size // gcfg.group_size * gcfg.best_of if gcfg.best_of else batch_size
  if batch_size % gcfg.group_size or trained % gcfg.minibatches:
    raise ValueError(f'config.data.batch_size={batch_size} must be divisible by '
                     f'grpo.group_size={gcfg.group_size}, and its {trained} trained rows '
                     f'(grpo.best_of={gcfg.best_of}) by grpo.minibatches={gcfg.minibatches}.')
  return batch_size


def build_state(config, params, pshard, tx, mesh, batch_size: int, gcfg, *,
                abstract: bool = False) -> tuple[dict, dict]:
  """(state, shardings): params, optimizer, optional EMA, and 'rl' (iteration, reward window)."""
  del config
  state, shardings = common.policy_state(params, pshard, tx, mesh, gcfg.ema_decay,
                                         abstract=abstract)
  replicated = NamedSharding(mesh, P())
  rl = grpo_step.init_rl_state(gcfg, batch_size)
  shardings['rl'] = jax.tree.map(lambda _: replicated, rl)
  state['rl'] = sharding_lib.materialize(lambda: rl, out_shardings=shardings['rl'],
                                         abstract=abstract)
  return state, shardings


def build_policy(config, mesh, rules, *, abstract: bool = False) -> Policy:
  """The GRPO state of `config` (the trainer's, and with `abstract` the layout scanner's: the
  same code with `jax.ShapeDtypeStruct`s, nothing loaded or run)."""
  fam = families.from_config(config)
  gcfg = grpo_step.GRPOConfig.from_config(config.grpo)
  batch_size = check_batch(config, gcfg)
  if abstract:
    graphdef, params, pshard, model_cfg = fam.init(mesh, rules, int(config.seed), abstract=True)
  else:
    graphdef, params, pshard = common.init_policy(config, mesh, rules)
    model_cfg = None
  tx = optim.make_optimizer(config.optax)
  base = ref = None
  trainable, tshard = params, pshard
  if gcfg.lora.rank:   # the base is a const (never donated), so it is also the KL reference
    base = lora_base(params, pshard, gcfg.lora, abstract=abstract)
    trainable, tshard = init_lora(gcfg.lora, params, pshard,
                                  rng_lib.key(config.seed, 'lora_init'), abstract=abstract)
  if gcfg.kl_beta > 0:
    ref = base if base is not None else sharding_lib.materialize(
        lambda p: jax.tree.map(jnp.copy, p), params, out_shardings=pshard, abstract=abstract)
  state, shardings = build_state(config, trainable, tshard, tx, mesh, batch_size, gcfg,
                                 abstract=abstract)
  return Policy(fam=fam, gcfg=gcfg, tx=tx, graphdef=graphdef, model_cfg=model_cfg, state=state,
                shardings=shardings, frozen={'base': base, 'ref': ref}, pshard=pshard,
                batch_size=batch_size,
                num_params=sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)))


def make_functions(pol: Policy, rewards, codec) -> grpo_step.GRPOFunctions:
  """The iteration's jittable parts for `pol` (rollout, score, update, fused step)."""
  return grpo_step.make_grpo_functions(
      pol.graphdef, pol.tx, pol.gcfg, pol.fam.latent_shape, reward_names=rewards.names,
      reward_weights=rewards.weights, decode=codec.decode, velocity=pol.fam.velocity(pol.graphdef))


def init_lora(lcfg, params, pshard, key: jax.Array, *, abstract: bool = False):
  """(LoRA tree, its NamedShardings) for `params`, created sharded like the adapted kernels."""
  make = lambda p: lora_lib.init_lora(p, rank=lcfg.rank, alpha=lcfg.alpha,  # pylint: disable=unnecessary-lambda-assignment
                                      targets=lcfg.targets, key=key)
  shard = lora_lib.lora_shardings(jax.eval_shape(make, params), pshard)
  return sharding_lib.materialize(make, params, out_shardings=shard, abstract=abstract), shard


def lora_hooks(hooks, base, pshard, scale: float):
  """Hooks that read state['params'] (or 'ema') as a full generator, given a LoRA state."""
  merge = jax.jit(lambda b, l: lora_lib.merge(b, l, scale), out_shardings=pshard)

  def wrap(fn):
    return lambda st, step: fn({'params': merge(base, st.get('ema', st['params']))}, step)

  return [(every, wrap(fn)) for every, fn in hooks]


def train(config, workdir: str) -> dict:
  mesh, rules = common.setup_mesh(config)
  pol = build_policy(config, mesh, rules)
  fam, gcfg = pol.fam, pol.gcfg
  tok = fam.tokenizer(workdir)
  rewards = registry.build_rewards(config.rewards, mesh, rules)
  codec = fam.codec(mesh, rules)
  consts = {'rewards': rewards, **pol.frozen, 'decoder': codec.params}
  records, data_iter, to_device = fam.prompt_data(pol.batch_size, gcfg.group_size, mesh, rules,
                                                  tok=tok)
  if gcfg.fm_weight > 0:
    consts['fm_images'] = jax.device_put(fm_table(config, records), NamedSharding(mesh, P()))
  fns = make_functions(pol, rewards, codec)
  step_fn = loop_lib.SplitStep(fns.first, fns.second) if gcfg.split else fns.step

  hooks = []
  if tok is not None:   # the judge hooks sample the digit prompts
    hooks = generate.judge_hooks(config, pol.graphdef, tok, workdir, fam.latent_shape, rewards)
    if gcfg.lora.rank:
      hooks = lora_hooks(hooks, pol.frozen['base'], pol.pshard, gcfg.lora.scale)
  state, last = common.run_loop(
      config, workdir, desc='grpo', state=pol.state, shardings=pol.shardings, step_fn=step_fn,
      data_iter=data_iter, to_device=to_device, mesh=mesh, rules=rules, hooks=hooks, consts=consts)
  return {'step': last}
