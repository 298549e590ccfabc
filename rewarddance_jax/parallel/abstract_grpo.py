"""Abstract GRPO and reward steps for the layout scanner (`parallel/scan.py` STEP_BUILDERS).

Everything is a sharded `jax.ShapeDtypeStruct`; no parameter is ever materialised:

  1. `abstract_rewards(config, mesh, rules)`: with a `config.scan.reward` section, one abstract
     VLM yes-token reward (RewardDance, ALGORITHMS.md §4.1) of the configured InternVL size on
     latents: pixels = (VAE.decode_latents(x̂0) + 1)/2, one 448² tile, r = P("yes") from the LM
     head at `batch['vlm_pos']` of `batch['vlm_ids']` (two_way normalisation). Its params are
     {'model': InternVL, 'vae': AutoencoderKL}, sharded by the config's rules (the VAE, 84M,
     replicated). With vae='' the decode is a stand-in of the same output size (no weights):
     compiling the FLUX VAE decoder at 768² through libtpu took over 10 minutes on the 2-core
     CPU host, past the scan budget; the real-size configs scan without it (docs/scaling.md).
     Without that
     section the config's own `config.rewards` (rule rewards) are built and their (small) params
     replaced by replicated structs.
  2. `abstract_grpo_step(config, mesh)`: the whole GRPO iteration of `train/grpo_step.py`
     (rollout of N steps + reward + group advantages + M minibatch updates) jitted as the loop
     jits it (state donated), with state = params, AdamW state, [EMA], rl counters; batch =
     conditioning (external T5/CLIP embeddings or token ids) + the reward's inputs; consts =
     {'rewards', 'ref' (abstract params when kl_beta > 0)}.
  3. `abstract_reward_step(config, mesh)`: the reward forward alone on a batch of
     `config.data.batch_size` samples.
Analytic model FLOPs (matmul weights only, attention L² terms and VAE convolutions not counted):
  rollout 2·P·S·B·N, update 6·P·S·B·T (+2·P·S·B·T for the KL reference), reward
  2·(P_vit·S_vit·tiles + P_proj·S_img + P_lm·L + P_head)·B, with P the generator's parameters,
  S its tokens per sample (image patches + text), N rollout steps, T trained steps per sample.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.parallel.scan import AbstractStep, _abstract


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_model(factory, mesh, rules):
  """(graphdef, abstract params with shardings, param shardings) of `factory()`."""
  graphdef, (state,) = sharding_lib.abstract_state(factory, mesh, rules)
  pshard = nnx.to_pure_dict(sharding_lib.state_shardings(state, mesh, rules))
  return graphdef, _abstract(nnx.to_pure_dict(state), pshard), pshard


def _replicated(mesh, tree):
  rep = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x),
                                                     sharding=rep), tree)


def _key(mesh):
  return jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                              sharding=NamedSharding(mesh, P()))


def _batch_leaf(mesh, rules, shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype,
                              sharding=sharding_lib.data_sharding(mesh, rules, len(shape)))


def vlm_reward_flops(vlm_cfg, params, max_len: int) -> float:
  """Matmul FLOPs of one sample through the VLM reward (see the module docstring)."""
  model = params['model']
  grid = vlm_cfg.vision.grid
  lm = {k: v for k, v in model['lm'].items() if k != 'embed'}
  head = model.get('lm_head') or model['lm']['embed']
  return 2.0 * (_size(model['vision']) * (grid * grid + 1) + _size(model['projector'])
                * vlm_cfg.tokens_per_tile + _size(lm) * max_len + _size(head))


def stand_in_pixels(latents: jax.Array, factor: int) -> jax.Array:
  """Pixels in [0, 1] of the decoded size without a VAE: the first 3 latent channels, each
  value repeated factor×factor (the scans' stand-in for the VAE decode, see the module doc)."""
  x = jax.nn.sigmoid(latents[..., :3])
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def abstract_vlm_reward(rcfg, mesh, rules, *, scan_layers: bool = False):
  """(Reward with abstract params, extra batch leaves {name: (shape tail, dtype)}, FLOPs/sample).

  `rcfg` is `config.scan.reward`: vlm (a `models.vlm.presets` dict), vae (a VAE_PRESETS name),
  vae_dtype (its compute dtype; vae='' uses `stand_in_pixels` with pixel_factor), max_len (prompt tokens), yes_id / no_id.
  """
  # pylint: disable=import-outside-toplevel
  from rewarddance_jax.models.vae import VAE_PRESETS, AutoencoderKL
  from rewarddance_jax.models.vlm import InternVL, vlm_config
  from rewarddance_jax.rewards import base
  from rewarddance_jax.rewards.vlm_losses import yes_probability
  from rewarddance_jax.rewards.vlm_yes import TileSpec, answer_logits, vlm_tiles

  vlm_dict = dict(rcfg.vlm)
  vlm_dict['scan_layers'] = bool(scan_layers)
  vcfg = vlm_config(vlm_dict)
  if rcfg.vae and rcfg.vae not in VAE_PRESETS:
    raise ValueError(f'config.scan.reward.vae={rcfg.vae!r} is not one of {sorted(VAE_PRESETS)} '
                     'or "".')
  vlm_def, vlm_params, _ = abstract_model(lambda: InternVL(vcfg, rngs=nnx.Rngs(0)), mesh, rules)
  # The VAE (84M) is replicated: with its conv kernels split over fsdp, GSPMD shards the
  # decoder's activations by channel and gathers the batch, ~1.5 GB per image at 768².
  params = {'model': vlm_params}
  if rcfg.vae:
    vae_cfg = dataclasses.replace(VAE_PRESETS[rcfg.vae], dtype=rcfg.get('vae_dtype', 'float32'))
    vae_rules = tuple((n, a if n.startswith('act_') else None) for n, a in rules)
    vae_def, params['vae'], _ = abstract_model(
        lambda: AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0)), mesh, vae_rules)
  factor = int(rcfg.get('pixel_factor', 8))
  tile_spec = TileSpec(size=vcfg.vision.image_size, max_tiles=1, thumbnail=False)
  yes_ids, no_ids = (int(rcfg.yes_id),), (int(rcfg.no_id),)

  def fn(p, samples, batch, key):
    del key
    if 'vae' in p:
      vae = nnx.merge(vae_def, p['vae'])
      pixels = jnp.clip((vae.decode_latents(samples['latents']) + 1.0) * 0.5, 0.0, 1.0)
    else:
      pixels = stand_in_pixels(samples['latents'], factor)
    tiles = vlm_tiles(tile_spec, 'pointwise', pixels)
    logits = answer_logits(vlm_def, p['model'], batch['vlm_ids'], batch['vlm_pos'], tiles)
    return yes_probability(logits, yes_ids, no_ids, 'two_way')

  reward = base.Reward(name='vlm_yes', fn=fn, inputs='latents', differentiable=True,
                       params=params)
  max_len = int(rcfg.max_len)
  extra = {'vlm_ids': ((max_len,), jnp.int32), 'vlm_pos': ((), jnp.int32)}
  return reward, extra, vlm_reward_flops(vcfg, params, max_len)


def abstract_rewards(config, mesh, rules):
  """(WeightedRewards with abstract params, extra batch leaves, reward FLOPs per sample)."""
  from rewarddance_jax.rewards import base, registry  # pylint: disable=import-outside-toplevel
  rcfg = config.get('scan', {}).get('reward', None)
  if rcfg is not None:
    reward, extra, flops = abstract_vlm_reward(
        rcfg, mesh, rules, scan_layers=bool(config.model.get('scan_layers', False)))
    return base.WeightedRewards([(reward, 1.0)]), extra, flops
  rewards = registry.build_rewards(config.rewards)
  # Rule rewards read the digit labels; their params are small constants, replicated.
  return _replicated(mesh, rewards), {'labels': ((), jnp.int32)}, 0.0


def _latent_shape(config) -> tuple[int, ...]:
  shape = config.data.get('latent_shape', None)
  if shape is not None:
    return tuple(int(s) for s in shape)
  from rewarddance_jax.train import grpo  # pylint: disable=import-outside-toplevel
  return grpo.IMAGE_SHAPE


def _cond_batch(config, gen_cfg, mesh, rules, b: int) -> dict:
  text_len = int(config.data.max_text_len)
  leaf = lambda shape, dtype: _batch_leaf(mesh, rules, shape, dtype)  # pylint: disable=unnecessary-lambda-assignment
  if gen_cfg.text == 'tokens':
    return {'tokens': leaf((b, text_len), jnp.int32), 'mask': leaf((b, text_len), jnp.bool_)}
  mm = gen_cfg.mmdit
  return {'txt': leaf((b, text_len, mm.context_dim), jnp.float32),
          'pooled': leaf((b, mm.pooled_dim), jnp.float32),
          'mask': leaf((b, text_len), jnp.bool_)}


def _generator_tokens(config, gen_cfg) -> int:
  h, w = _latent_shape(config)[:2]
  p = gen_cfg.patch_size
  return (h // p) * (w // p) + int(config.data.max_text_len)


def abstract_grpo_step(config, mesh) -> AbstractStep:
  """The full GRPO iteration of `config` on `mesh` (module docstring, item 2)."""
  # pylint: disable=import-outside-toplevel
  from rewarddance_jax.models.generator import Generator, generator_config
  from rewarddance_jax.train import common, grpo, grpo_step, optim

  rules = sharding_lib.rules_from_config(config.sharding_rules)
  sharding_lib.check_rules(rules, mesh)
  gen_cfg = generator_config(config.model)
  gcfg = grpo_step.GRPOConfig.from_config(config.grpo)
  b = int(config.data.batch_size)
  if b % gcfg.group_size or b % gcfg.minibatches:
    raise ValueError(f'config.data.batch_size={b} must be divisible by grpo.group_size='
                     f'{gcfg.group_size} and grpo.minibatches={gcfg.minibatches}.')
  graphdef, params, pshard = abstract_model(lambda: Generator(gen_cfg, rngs=nnx.Rngs(0)),
                                            mesh, rules)
  tx = optim.make_optimizer(config.optax)
  oshard = optim.opt_state_shardings(tx, params, pshard, mesh)
  state = {'params': params, 'opt_state': _abstract(jax.eval_shape(tx.init, params), oshard)}
  shardings = {'params': pshard, 'opt_state': oshard}
  if gcfg.ema_decay > 0:
    state['ema'], shardings['ema'] = params, pshard
  rl = _replicated(mesh, grpo_step.init_rl_state(gcfg, b))
  state['rl'] = rl
  shardings['rl'] = jax.tree.map(lambda x: x.sharding, rl)

  rewards, extra, reward_flops = abstract_rewards(config, mesh, rules)
  batch = _cond_batch(config, gen_cfg, mesh, rules, b)
  for name, (tail, dtype) in extra.items():
    batch[name] = _batch_leaf(mesh, rules, (b,) + tuple(tail), dtype)
  consts = {'rewards': rewards, 'ref': params if gcfg.kl_beta > 0 else None}

  image_shape = _latent_shape(config)
  step = grpo_step.make_grpo_step(graphdef, tx, gcfg, image_shape, reward_names=rewards.names,
                                  reward_weights=rewards.weights, decode=grpo.decode_unit)
  with common.mesh_context(mesh, rules):
    jitted = jax.jit(step, in_shardings=(shardings, None, None, None),
                     out_shardings=(shardings, None), donate_argnums=(0,))

  num_params = _size(params)
  s = _generator_tokens(config, gen_cfg)
  t = gcfg.selection.num_trained
  flops = (2.0 * num_params * s * b * gcfg.num_steps
           + (6.0 + (2.0 if gcfg.kl_beta > 0 else 0.0)) * num_params * s * b * t
           + reward_flops * b)
  return AbstractStep(jitted=jitted, args=(state, batch, _key(mesh), consts), mesh=mesh,
                      rules=rules, num_params=num_params, tokens=s * b,
                      flops_per_param_token=0, analytic_flops=flops)


def abstract_reward_step(config, mesh) -> AbstractStep:
  """The reward forward of `config` on `config.data.batch_size` samples (module docstring)."""
  from rewarddance_jax.train import common  # pylint: disable=import-outside-toplevel
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  sharding_lib.check_rules(rules, mesh)
  rewards, extra, reward_flops = abstract_rewards(config, mesh, rules)
  b = int(config.data.batch_size)
  shape = (b,) + _latent_shape(config)
  samples = {'latents': _batch_leaf(mesh, rules, shape, jnp.float32)}
  if 'pixels' in rewards.inputs:
    samples['pixels'] = _batch_leaf(mesh, rules, shape, jnp.float32)
  batch = {name: _batch_leaf(mesh, rules, (b,) + tuple(tail), dtype)
           for name, (tail, dtype) in extra.items()}

  def forward(r, samples, batch, key):
    return r.total(samples, batch, key)

  with common.mesh_context(mesh, rules):
    jitted = jax.jit(forward)
  num_params = _size(rewards)
  return AbstractStep(jitted=jitted, args=(rewards, samples, batch, _key(mesh)), mesh=mesh,
                      rules=rules, num_params=num_params, tokens=b, flops_per_param_token=0,
                      analytic_flops=reward_flops * b)
