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
  3. Prompts: `config.data.encoded_prompts` (a directory written by `launch.encode_prompts`: the
     T5/CLIP outputs per prompt, for a generator with external text embeddings such as FLUX),
     else `config.data.prompts` (a jsonl/csv prompt file) or the digit prompts, tokenized; each
     batch has batch_size / G distinct prompts, each repeated G times adjacently
     (`data/pipeline.py`). Latents are `config.data.latent_shape` (H, W, C), default the
     digits' 16×16×1.
  Real weights: `config.init.weights` (a diffusers FLUX directory, `common.init_policy`) and
  `config.vae` = dict(src=<diffusers AutoencoderKL directory or pipeline root>, cache_dir='')
  for rewards that read pixels: x̂0 → VAE decode → [0, 1] inside the step, the VAE params a
  const (consts['decoder']). Without `config.vae` the pixels are the digits' identity decode.
  4. The step (`train/grpo_step.py`): rollout, rewards, group advantages, M minibatch updates,
     all in one jitted function on device; checkpoints, resume, SIGTERM as every trainer.
  5. Hook every `config.samples.every` iterations (digits only): ODE samples of the digit prompts,
     the judge's accuracy and the configured reward of those samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rewarddance_jax import config_lib
from rewarddance_jax.data import digits, label_table, pipeline, prompts as prompts_lib
from rewarddance_jax.nn import lora as lora_lib
from rewarddance_jax.parallel import rng as rng_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.rewards import registry
from rewarddance_jax.train import common, generate, grpo_step, optim

IMAGE_SHAPE = (16, 16, 1)


def decode_unit(x0: jax.Array, params=None) -> jax.Array:
  """The digits' identity "VAE": model space [−1, 1] → pixels [0, 1] (differentiable inside).
  `params` is the decoder-params slot of the decode protocol (`vae_decoder`); it has none."""
  del params
  return jnp.clip((x0 + 1.0) * 0.5, 0.0, 1.0)


def image_shape(config) -> tuple[int, ...]:
  """The latent shape (H, W, C) of one sample: `config.data.latent_shape`, else the digits'."""
  shape = config.data.get('latent_shape')
  return tuple(int(d) for d in shape) if shape else IMAGE_SHAPE


def vae_decoder(config, mesh, rules):
  """(decode(x̂0, params) → pixels in [0, 1], VAE params) from `config.vae`, or (None, None)."""
  vcfg = dict(config.get('vae', {}))
  if not vcfg.get('src'):
    return None, None
  config_lib.check_keys(vcfg, ('src', 'cache_dir'), 'config.vae')
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from rewarddance_jax.weights import vae as vae_weights  # pylint: disable=import-outside-toplevel
  graphdef, params, _ = vae_weights.load(vcfg['src'], mesh, rules,
                                         cache_dir=vcfg.get('cache_dir') or None)

  def decode(x0, vae_params):
    vae = nnx.merge(graphdef, vae_params)
    return jnp.clip((vae.decode_latents(x0) + 1.0) * 0.5, 0.0, 1.0)

  return decode, params


def prompt_records(config):
  path = config.data.get('prompts', '')
  return prompts_lib.load_prompt_file(path) if path else prompts_lib.digits_prompt_records()


def prompt_labels(prompts) -> np.ndarray:
  """(b,) int32: the digit each prompt asks for, −1 where it names none."""
  labels = []
  for text in prompts:
    try:
      labels.append(digits.label_from_prompt(text))
    except ValueError:
      labels.append(-1)
  return np.asarray(labels, np.int32)


def digits_host_batch(batch: dict) -> dict:
  """Arrays of a tokenized prompt batch, with the digit of each prompt as 'labels'."""
  return {'tokens': batch['tokens'], 'mask': batch['mask'],
          'labels': prompt_labels(batch['prompts'])}


def prompt_data(config, tok, batch_size: int, repeat_each: int, mesh, rules):
  """(prompt records, data iterator, to_device) of a prompt-only trainer (GRPO, R0): the
  pre-encoded prompts of `config.data.encoded_prompts` (batches of txt/pooled/mask/ids), else
  the prompt file or the digit prompts tokenized with `tok`; each prompt `repeat_each` times."""
  encoded_dir = config.data.get('encoded_prompts', '')
  if encoded_dir:
    from rewarddance_jax.weights import text_pipeline  # pylint: disable=import-outside-toplevel
    encoded = text_pipeline.EncodedPrompts(encoded_dir)
    records = encoded.prompts
    data_iter = pipeline.encoded_prompt_iter(encoded, batch_size, seed=int(config.seed),
                                             repeat_each=repeat_each)
    host_fn = encoded_host_batch
  else:
    records = prompt_records(config)
    data_iter = pipeline.prompt_iter(records, batch_size, seed=int(config.seed), tokenizer=tok,
                                     max_len=int(config.data.max_text_len),
                                     repeat_each=repeat_each)
    host_fn = digits_host_batch

  def to_device(batch):
    return sharding_lib.host_to_global(host_fn(batch), mesh, rules)

  return records, data_iter, to_device


def fm_table(config, records) -> np.ndarray:
  """(10, T, 16, 16, 1): the real training digits of each label, for `grpo.fm_weight` (the
  flow-matching term on real images). Every prompt must name a digit."""
  texts = [getattr(rec, 'prompt', rec) for rec in records]
  for text, label in zip(texts, prompt_labels(texts)):
    if label < 0:
      raise ValueError(f'grpo.fm_weight > 0 trains on real digits and needs digit prompts; '
                       f'{text!r} names no digit.')
  split = digits.load_split('train', int(config.seed))
  return label_table.build_table(split['images'], split['labels'], 10)


def encoded_host_batch(batch: dict) -> dict:
  """Arrays of a pre-encoded prompt batch: the generator's external text conditioning, 'ids'
  (each row's index in the prompt set, for reward prompt tables) and the digit of each prompt as
  'labels' (−1 where it names none)."""
  return {'txt': batch['txt'], 'pooled': batch['pooled'], 'mask': batch['mask'],
          'ids': np.asarray(batch['ids'], np.int32), 'labels': prompt_labels(batch['prompts'])}


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
  trained = batch_size // gcfg.group_size * gcfg.best_of if gcfg.best_of else batch_size
  if batch_size % gcfg.group_size or trained % gcfg.minibatches:
    raise ValueError(f'config.data.batch_size={batch_size} must be divisible by '
                     f'grpo.group_size={gcfg.group_size}, and its {trained} trained rows '
                     f'(grpo.best_of={gcfg.best_of}) by grpo.minibatches={gcfg.minibatches}.')
  encoded_dir = config.data.get('encoded_prompts', '')
  tok = None if encoded_dir else common.digits_tokenizer(workdir, config.model.get('vocab_size'))
  graphdef, params, pshard = common.init_policy(config, mesh, rules)
  shape = image_shape(config)

  tx = optim.make_optimizer(config.optax)
  base = ref = None
  trainable, tshard = params, pshard
  if gcfg.lora.rank:   # the base is a const (never donated), so it is also the KL reference
    base = params
    trainable, tshard = init_lora(gcfg.lora, params, pshard, rng_lib.key(config.seed, 'lora_init'))
  if gcfg.kl_beta > 0:
    ref = base if base is not None else jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                                                out_shardings=pshard)(params)
  state, shardings = build_state(config, trainable, tshard, tx, mesh, batch_size, gcfg)
  rewards = registry.build_rewards(config.rewards, mesh, rules)
  consts = {'rewards': rewards, 'ref': ref, 'base': base}
  decode, consts['decoder'] = vae_decoder(config, mesh, rules)

  records, data_iter, to_device = prompt_data(config, tok, batch_size, gcfg.group_size, mesh,
                                              rules)
  if gcfg.fm_weight > 0:
    consts['fm_images'] = jax.device_put(fm_table(config, records), NamedSharding(mesh, P()))

  step_fn = grpo_step.make_grpo_step(
      graphdef, tx, gcfg, shape, reward_names=rewards.names,
      reward_weights=rewards.weights, decode=decode or decode_unit)

  hooks = []
  if not encoded_dir:   # the judge hooks sample the digit prompts
    hooks = generate.judge_hooks(config, graphdef, tok, workdir, shape, rewards)
    if gcfg.lora.rank:
      hooks = lora_hooks(hooks, base, pshard, gcfg.lora.scale)
  state, last = common.run_loop(
      config, workdir, desc='grpo', state=state, shardings=shardings, step_fn=step_fn,
      data_iter=data_iter, to_device=to_device, mesh=mesh, rules=rules, hooks=hooks, consts=consts)
  return {'step': last}
