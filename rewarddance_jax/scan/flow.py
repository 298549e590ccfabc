"""The abstract flow-matching train step for the layout scanner (scan/layouts.py 'flow').

Shape-only params (`sharding_lib.abstract_state`) with their NamedShardings from the config's
rules, the AdamW state from `jax.eval_shape`, a batch of `config.data.batch_size` and a key, all
sharded `jax.ShapeDtypeStruct`s; the step of `train/flow.py` is jitted as `train/loop.py` jits it
(state donated). Analytic FLOPs: 6 · params · tokens (image patches + text).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rewarddance_jax.models.generator import Generator, generator_config
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.parallel.trees import count_params
from rewarddance_jax.scan.step import AbstractStep, abstract, batch_leaf, key_struct
from rewarddance_jax.train import common, flow as flow_trainer, optim


def abstract_flow_train_step(config, mesh) -> AbstractStep:
  """The flow-matching train step of `config` on `mesh`, with nothing materialised.

  `build_generator` would run the initialisers on the (compile-only) devices, which cannot execute
  anything, so params come from a shape-only build.
  """
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  sharding_lib.check_rules(rules, mesh)
  gen_cfg = generator_config(config.model)
  graphdef, (state,) = sharding_lib.abstract_state(
      lambda: Generator(gen_cfg, rngs=nnx.Rngs(0)), mesh, rules)
  pshard = nnx.to_pure_dict(sharding_lib.state_shardings(state, mesh, rules))
  params = abstract(nnx.to_pure_dict(state), pshard)

  tx = optim.make_optimizer(config.optax)
  oshard = optim.opt_state_shardings(tx, params, pshard, mesh)
  opt_state = abstract(jax.eval_shape(tx.init, params), oshard)
  train_state = {'params': params, 'opt_state': opt_state}
  shardings = {'params': pshard, 'opt_state': oshard}

  b, text_len = int(config.data.batch_size), int(config.data.max_text_len)
  leaf = functools.partial(batch_leaf, mesh, rules)
  batch = {'images': leaf((b,) + flow_trainer.IMAGE_SHAPE, jnp.float32),
           'tokens': leaf((b, text_len), jnp.int32),
           'mask': leaf((b, text_len), jnp.bool_)}

  step = flow_trainer.make_train_step(graphdef, tx, config.flow, 0.0)
  with common.mesh_context(mesh, rules):
    # Same jit as `train/loop.py`: state shardings in and out, state donated.
    jitted = jax.jit(step, in_shardings=(shardings, None, None),
                     out_shardings=(shardings, None), donate_argnums=(0,))

  h, w, _ = flow_trainer.IMAGE_SHAPE
  p = gen_cfg.patch_size
  tokens = b * ((h // p) * (w // p) + text_len)
  return AbstractStep(jitted=jitted, args=(train_state, batch, key_struct(mesh)), mesh=mesh,
                      rules=rules, num_params=count_params(params), tokens=tokens,
                      flops_per_param_token=6)
