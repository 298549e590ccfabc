"""The abstract flow-matching train step for the layout scanner (scan/layouts.py 'flow').

The trainer's own state (`train/flow.build_state` with abstract=True: params, AdamW state, EMA,
each a `jax.ShapeDtypeStruct` with its NamedSharding), a batch of `config.data.batch_size` and a
key; the step of `train/flow.py` is jitted as `train/loop.py` jits it (state donated). Analytic FLOPs: 6 · params · tokens (image patches + text).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rewarddance_jax.families.digits import LATENT_SHAPE
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.parallel.trees import count_params
from rewarddance_jax.scan.step import AbstractStep, batch_leaf, key_struct
from rewarddance_jax.train import common, flow as flow_trainer


def abstract_flow_train_step(config, mesh) -> AbstractStep:
  """The flow-matching train step of `config` on `mesh`, with nothing materialised: the
  trainer's own state builder (`train/flow.build_state`) with abstract=True."""
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  sharding_lib.check_rules(rules, mesh)
  graphdef, train_state, shardings, tx, gen_cfg = flow_trainer.build_state(config, mesh, rules,
                                                                           abstract=True)
  params = train_state['params']

  b, text_len = int(config.data.batch_size), int(config.data.max_text_len)
  leaf = functools.partial(batch_leaf, mesh, rules)
  batch = {'images': leaf((b,) + LATENT_SHAPE, jnp.float32),
           'tokens': leaf((b, text_len), jnp.int32),
           'mask': leaf((b, text_len), jnp.bool_)}

  step = flow_trainer.make_train_step(graphdef, tx, config.flow,
                                      float(config.get('ema_decay', 0.0)))
  with common.mesh_context(mesh, rules):
    # Same jit as `train/loop.py`: state shardings in and out, state donated.
    jitted = jax.jit(step, in_shardings=(shardings, None, None),
                     out_shardings=(shardings, None), donate_argnums=(0,))

  h, w, _ = LATENT_SHAPE
  p = gen_cfg.patch_size
  tokens = b * ((h // p) * (w // p) + text_len)
  return AbstractStep(jitted=jitted, args=(train_state, batch, key_struct(mesh)), mesh=mesh,
                      rules=rules, num_params=count_params(params), tokens=tokens,
                      flops_per_param_token=6)
