"""Abstract latent-reward train step for the layout scanner (scan/layouts.py 'latent_reward').

The DiNa-LRM / PAVRM train step of `train/latent_reward.py` (`make_train_step`, unchanged) on a
frozen generator backbone, every argument a sharded `jax.ShapeDtypeStruct`:
  1. Backbone: `config.model.family` 'sd3' → `models/backbone_sd3.SD3Backbone` over
     `models/sd3.SD3Generator` (the SD3Config fields of `config.model`); otherwise
     `rewards.latent.make_backbone` (the MMDiT generator). Base = `take(generator params)` in the
     model's param dtype, sharded by the config's rules.
  2. Trainable: the reward's LoRA (`backbone.init_lora`, shardings following the base kernels) and
     the head; AdamW over them only. State = {'params': {'lora', 'head'}, 'opt_state', 'base'},
     jitted as the trainer's loop jits it (state donated).
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
from flax import nnx

from rewarddance_jax import config_lib
from rewarddance_jax.models.backbone_sd3 import SD3_ATTENTION_TARGETS, SD3Backbone
from rewarddance_jax.models.generator import Generator, generator_config
from rewarddance_jax.models.sd3 import SD3Config, SD3Generator
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.parallel.trees import count_params
from rewarddance_jax.rewards import latent as latent_lib
from rewarddance_jax.scan.step import (AbstractStep, abstract, abstract_model, batch_leaf,
                                       key_struct)
from rewarddance_jax.train import common, optim
from rewarddance_jax.train import latent_reward as latent_trainer


def sd3_config(model_cfg):
  """`SD3Config` from a config.model dict with family='sd3' ('name', 'family' and
  'scan_layers' are not SD3Config fields: the last one is the backbone's `scan`)."""
  kw = {k: v for k, v in dict(model_cfg).items() if k not in ('scan_layers', 'name', 'family')}
  if 'dual_attention_layers' in kw:
    kw['dual_attention_layers'] = tuple(int(i) for i in kw['dual_attention_layers'])
  return config_lib.section(SD3Config, kw, 'config.model (family sd3)')


def make_backbone(config):
  """(backbone, generator factory, conditioning kind 'tokens' | 'external', context / pooled
  dims) for config.model."""
  r = config.reward
  if config.model.get('family', 'mmdit') == 'sd3':
    cfg = sd3_config(config.model)
    backbone = SD3Backbone(cfg, num_blocks=int(r.num_blocks),
                           layers=tuple(int(l) for l in r.layers), lora_rank=int(r.lora_rank),
                           lora_alpha=float(r.lora_alpha),
                           lora_targets=str(r.get('lora_targets', SD3_ATTENTION_TARGETS)),
                           scan=bool(config.model.get('scan_layers', False)))
    return (backbone, lambda: SD3Generator(cfg, rngs=nnx.Rngs(0)), 'external',
            (cfg.context_dim, cfg.pooled_dim), cfg.patch_size)
  backbone = latent_lib.make_backbone(config)
  gen_cfg = generator_config(config.model)
  return (backbone, lambda: Generator(gen_cfg, rngs=nnx.Rngs(0)), gen_cfg.text,
          (gen_cfg.mmdit.context_dim, gen_cfg.mmdit.pooled_dim), gen_cfg.patch_size)


def abstract_latent_reward_step(config, mesh) -> AbstractStep:
  """The latent-reward train step of `config` on `mesh` (module docstring)."""
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  sharding_lib.check_rules(rules, mesh)
  backbone, factory, text, (ctx_dim, pooled_dim), patch = make_backbone(config)
  _, gen_params, gen_shard = abstract_model(factory, mesh, rules)
  base_shard = backbone.take(gen_shard)
  base = backbone.take(gen_params)
  hcfg = latent_lib.head_config(config, backbone)
  head_gd, head, head_shard = abstract_model(latent_lib.head_factory(config, hcfg, 0), mesh, rules)
  lora = jax.eval_shape(lambda b: backbone.init_lora(b, jax.random.key(0)), base)
  lora_shard = backbone.lora_shardings(lora, base_shard)
  params = {'lora': abstract(lora, lora_shard), 'head': head}
  pshard = {'lora': lora_shard, 'head': head_shard}
  tx = optim.make_optimizer(config.optax)
  oshard = optim.opt_state_shardings(tx, params, pshard, mesh)
  state = {'params': params, 'opt_state': abstract(jax.eval_shape(tx.init, params), oshard),
           'base': base}
  shardings = {'params': pshard, 'opt_state': oshard, 'base': base_shard}

  p = config.pairs
  b, text_len = int(p.batch_size), int(p.max_text_len)
  latent = tuple(int(s) for s in p.latent_shape)
  leaf = functools.partial(batch_leaf, mesh, rules)
  batch = {'chosen': leaf((b,) + latent, jnp.float32),
           'rejected': leaf((b,) + latent, jnp.float32),
           'mask': leaf((b, text_len), jnp.bool_), 'kind': leaf((b,), jnp.int32)}
  if text == 'tokens':
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
