"""Set-up every trainer shares: mesh and rules, the generator of the run's family.

  1. `setup_mesh(config)`: the mesh from `config.mesh` and the logical rules from
     `config.sharding_rules`, checked against each other.
  2. `mesh_context(mesh, rules)`: the context (mesh + logical rules) under which steps trace.
  3. `build_generator(config, mesh, rules)`: graphdef + fp32 params created shard by shard;
     `init_policy`: the generator to align (public weights, a run's checkpoint, or fresh);
     `restore_generator`: a run's newest generator (a LoRA run merged into its base).
  4. `step_cache_key(config, mesh)`: what identifies a trainer's step function, so a second run
     with the same config in one process reuses the compiled step (`loop.run`'s `step_key`).
"""

from __future__ import annotations

import contextlib
import json
import os

import jax
from flax import nnx

from rewarddance_jax import config_lib, families
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel import rng as rng_lib
from rewarddance_jax.parallel import sharding as sharding_lib


def setup_mesh(config):
  """The run's mesh and logical rules (after the plain sections' numbers are range-checked)."""
  config_lib.check_plain_sections(config)
  mesh = mesh_lib.create_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  sharding_lib.check_rules(rules, mesh)
  return mesh, rules


@contextlib.contextmanager
def mesh_context(mesh, rules):
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    yield


def build_generator(config, mesh, rules, seed: int | None = None, *, abstract: bool = False):
  """Returns (graphdef, params, param_shardings, model cfg) of `config.model` in the run's
  family (`families.GeneratorFamily.init`). `abstract`: params are `jax.ShapeDtypeStruct`s with
  their shardings (no init runs), the target of a restore."""
  seed = config.seed if seed is None else seed
  return families.from_config(config).init(mesh, rules, int(seed), abstract=abstract)


def restore_generator(directory: str, params, shardings, *, use_ema: bool = False,
                      step: int | None = None):
  """The generator params saved by a trainer under `directory/checkpoints` (the newest, or
  `step`), restored straight into `shardings` (any mesh). `use_ema` takes the EMA params when
  the run kept them. A GRPO run with LoRA (`grpo.lora.rank > 0`) saved only the LoRA: it is
  merged into its base, the generator of the run's `init.generator` (restored the same way) or
  its public weights (`init.weights.src`)."""
  from rewarddance_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  path = os.path.join(directory, 'checkpoints')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no generator checkpoints at {path} (config.init.generator).')
  with ckpt_lib.Checkpointer(path, max_to_keep=None, async_save=False) as ckpt:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no finished checkpoint step in {path} (config.init.generator).')
    item = 'params'
    step_dir = str(ckpt.step_directory(step))
    run_cfg = (ckpt.restore(step, json=('config',)).get('config') or {}
               if os.path.isdir(os.path.join(step_dir, 'config')) else {})
    if use_ema and os.path.isdir(os.path.join(step_dir, 'ema')):
      item = 'ema'
    lora = ((run_cfg.get('grpo') or {}).get('lora') or {})
    if not lora.get('rank'):
      restored = ckpt.restore(step, arrays={item: ckpt_lib.abstract_like(params, shardings)})
      return restored[item]
    from rewarddance_jax.nn import lora as lora_lib  # pylint: disable=import-outside-toplevel
    from rewarddance_jax.train import grpo_step  # pylint: disable=import-outside-toplevel
    lcfg = grpo_step.LoRAConfig(**lora)
    init = run_cfg.get('init') or {}
    base_dir = init.get('generator', '')
    if base_dir:
      base = restore_generator(base_dir, params, shardings, use_ema=bool(init.get('use_ema')))
    elif (init.get('weights') or {}).get('src'):
      import ml_collections  # pylint: disable=import-outside-toplevel
      mesh = jax.tree.leaves(shardings)[0].mesh
      rules = sharding_lib.rules_from_config(run_cfg['sharding_rules'])
      _, base, _, _ = families.from_config(ml_collections.ConfigDict(run_cfg)).load(
          mesh, rules, progress=False)
    else:
      raise ValueError(f'{directory}: a LoRA run without config.init.generator or '
                       'init.weights.src; its base (a fresh initialisation) is not saved, so it '
                       'cannot be restored.')
    dtype = jax.numpy.dtype(lcfg.base_dtype)   # the base as the run trained on it
    base = jax.tree.map(lambda a: a.astype(dtype), base)
    make = lambda p: lora_lib.init_lora(p, rank=lcfg.rank, alpha=lcfg.alpha,  # pylint: disable=unnecessary-lambda-assignment
                                        targets=lcfg.targets, key=jax.random.key(0))
    abstract = jax.eval_shape(make, base)
    target = ckpt_lib.abstract_like(abstract, lora_lib.lora_shardings(abstract, shardings))
    adapter = ckpt.restore(step, arrays={item: target})[item]
  return jax.jit(lambda b, a: lora_lib.merge(b, a, lcfg.scale), out_shardings=shardings)(
      base, adapter)


def init_policy(config, mesh, rules):
  """The generator to align: (graphdef, params, shardings): public weights when
  `config.init.weights.src` is set (the family's loader), else restored from
  `config.init.generator` (a flow or alignment run's workdir) when set, else freshly initialised
  (with a warning)."""
  from absl import logging  # pylint: disable=import-outside-toplevel
  fam = families.from_config(config)
  init = config.get('init', {}).get('generator', '')
  if fam.has_weights:
    if init:
      raise ValueError('config.init: set generator (a workdir) or weights.src, not both.')
    graphdef, params, pshard, _ = fam.load(mesh, rules)
    logging.info('Starting from the %s weights in %s.', fam.name, fam.weights['src'])
    return graphdef, params, pshard
  graphdef, params, pshard, _ = build_generator(config, mesh, rules, abstract=bool(init))
  if init:
    params = restore_generator(init, params, pshard,
                               use_ema=bool(config.init.get('use_ema', False)))
    logging.info('Starting from the generator in %s.', init)
  else:
    logging.warning('config.init.generator is empty: starting from a random generator.')
  return graphdef, params, pshard


def policy_state(params, pshard, tx, mesh, ema_decay: float, *,
                 abstract: bool = False) -> tuple[dict, dict]:
  """(state, shardings) of a trained generator: params, optimizer state, EMA if ema_decay > 0
  (`abstract`: `jax.ShapeDtypeStruct`s, `sharding_lib.materialize`)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from rewarddance_jax.train import optim  # pylint: disable=import-outside-toplevel
  opt_shard = optim.opt_state_shardings(tx, params, pshard, mesh)
  state = {'params': params, 'opt_state': sharding_lib.materialize(
      tx.init, params, out_shardings=opt_shard, abstract=abstract)}
  shardings = {'params': pshard, 'opt_state': opt_shard}
  if ema_decay > 0:
    state['ema'] = sharding_lib.materialize(lambda p: jax.tree.map(jnp.copy, p), params,
                                            out_shardings=pshard, abstract=abstract)
    shardings['ema'] = pshard
  return state, shardings


def image_or_prompt_data(config, fam, tok, trainer: str, fm_weight: float, mesh, rules):
  """(data iterator, to_device) of a reward-feedback trainer (ReFL, PRFL): token-conditioned
  families train on the digits training split (real images with their prompts, for the
  flow-matching term of fm_weight > 0); encoded families on their prompt batches."""
  from rewarddance_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  batch_size = int(config.data.batch_size)
  if fam.conditioning == 'tokens':
    data_iter = pipeline.digits_train_iter(batch_size, seed=int(config.seed), tokenizer=tok,
                                           max_len=int(config.data.max_text_len))
    keys = ('images', 'labels', 'tokens', 'mask')
    return data_iter, lambda b: sharding_lib.host_to_global(
        fam.with_negative({k: b[k] for k in keys}), mesh, rules)
  if fm_weight > 0:
    raise ValueError(f'{trainer}.fm_weight > 0 trains on real images, which only the digits '
                     f'data provides so far; set it to 0 for family {fam.name}.')
  _, data_iter, to_device = fam.prompt_data(batch_size, 1, mesh, rules, tok=tok)
  return data_iter, to_device


def step_cache_key(config, mesh) -> tuple:
  """(trainer config without `loop.LOOP_ONLY_KEYS` as canonical JSON, mesh): equal keys mean
  equal step functions, because every trainer builds its step closure from the config alone
  (graphdefs, optimizer, static settings); the arrays a step reads (params, rewards, references,
  a VAE) come in as state or consts, never as captured constants. Paths in the config are part
  of the key, so a run that loads other files gets its own step."""
  from rewarddance_jax.train.loop import LOOP_ONLY_KEYS  # pylint: disable=import-outside-toplevel
  cfg = {k: v for k, v in config.to_dict().items() if k not in LOOP_ONLY_KEYS}
  return json.dumps(cfg, sort_keys=True, default=repr), mesh


def run_loop(config, workdir: str, *, desc: str, state, shardings, step_fn, data_iter, to_device,
             mesh, rules, hooks=(), consts=None):
  """`loop.run` with what every trainer takes from its config: loop settings, the base key from
  `config.seed`, the config saved with each checkpoint, and the mesh + rules context."""
  from rewarddance_jax.train import loop as loop_lib  # pylint: disable=import-outside-toplevel
  return loop_lib.run(
      workdir=workdir, loop=loop_lib.LoopConfig.from_config(config, desc=desc), state=state,
      state_shardings=shardings, step_fn=step_fn, data_iter=data_iter, to_device=to_device,
      key=rng_lib.key(config.seed, 'loop'), mesh=mesh, hooks=hooks, config_json=config.to_dict(),
      context=lambda: mesh_context(mesh, rules), consts=consts,
      step_key=step_cache_key(config, mesh))
