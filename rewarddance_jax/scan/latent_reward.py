"""Abstract latent-reward train step for the layout scanner (scan/layouts.py 'latent_reward').

The DiNa-LRM / PAVRM train step of `train/latent_reward.py` (`make_train_step`, unchanged) on a
frozen generator backbone, every argument a sharded `jax.ShapeDtypeStruct`:
  1-2. State: the trainer's own (`train/latent_reward.build_state`, abstract=True): the
     backbone of `config.family` (`rewards.latent.make_backbone`: SD3Backbone for sd3, else the
     MMDiT Backbone), base = `take(generator params)` sharded by the config's rules, the LoRA and
     head with AdamW over them only; {'params': {'lora', 'head'}, 'opt_state', 'base'}, jitted as
     the trainer's loop jits it (state donated).
  3. Batch of `config.pairs.batch_size` pairs: chosen / rejected latents
     (`config.pairs.latent_shape`), the conditioning (token ids, or external txt / pooled / mask
     of `config.pairs.max_text_len` tokens for 'sd3' and external-text MMDiTs) and the pair kind.
Analytic FLOPs: 6·P_backbone·S·2B (chosen and rejected in one batch; backward through the frozen
base included, head and attention L² terms not counted), S = image patches + text tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rewarddance_jax import families
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.parallel.trees import count_params
from rewarddance_jax.scan.step import AbstractStep, batch_leaf, key_struct
from rewarddance_jax.train import common
from rewarddance_jax.train import latent_reward as latent_trainer


def abstract_latent_reward_step(config, mesh) -> AbstractStep:
  """The latent-reward train step of `config` on `mesh` (module docstring): the trainer's own
  state (`train/latent_reward.build_state` with abstract=True)."""
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  sharding_lib.check_rules(rules, mesh)
  backbone, head_gd, state, shardings, tx = latent_trainer.build_state(config, mesh, rules,
                                                                      abstract=True)
  base = state['base']
  fam = families.from_config(config)
  model_cfg = fam.model_config()
  dims = getattr(model_cfg, 'mmdit', model_cfg)
  ctx_dim, pooled_dim, patch = dims.context_dim, dims.pooled_dim, model_cfg.patch_size

  p = config.pairs
  b, text_len = int(p.batch_size), int(p.max_text_len)
  latent = tuple(int(s) for s in (p.get('latent_shape', None) or fam.latent_shape))
  leaf = functools.partial(batch_leaf, mesh, rules)
  batch = {'chosen': leaf((b,) + latent, jnp.float32),
           'rejected': leaf((b,) + latent, jnp.float32),
           'mask': leaf((b, text_len), jnp.bool_), 'kind': leaf((b,), jnp.int32)}
  if fam.conditioning == 'tokens':
    batch['tokens'] = leaf((b, text_len), jnp.int32)
  else:
    batch['txt'] = leaf((b, text_len, ctx_dim), jnp.float32)
    batch['pooled'] = leaf((b, pooled_dim), jnp.float32)

  step = latent_trainer.make_train_step(config, backbone, head_gd, tx)
  with common.mesh_context(mesh, rules):
    jitted = jax.jit(step, in_shardings=(shardings, None, None),
                     out_shardings=(shardings, None), donate_argnums=(0,))
  num_params = count_params(base)
  s = (latent[0] // patch) * (latent[1] // patch) + text_len
  return AbstractStep(jitted=jitted, args=(state, batch, key_struct(mesh)), mesh=mesh, rules=rules,
                      num_params=num_params, tokens=2 * b * s, flops_per_param_token=6)
