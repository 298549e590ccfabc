"""Abstract GRPO and reward steps for the layout scanner (scan/layouts.py STEP_BUILDERS).

Everything is a sharded `jax.ShapeDtypeStruct`; no parameter is ever materialised:

  1. `abstract_rewards(config, mesh, rules)`: with a `config.scan.reward` section, one abstract
     VLM yes-token reward (RewardDance, docs/algorithms.md §4.1) of the configured InternVL size on
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
     jits it (state donated), with the trainer's own state (`train/grpo.build_policy` with
     abstract=True: params or LoRA, AdamW state, [EMA], rl counters, frozen base); batch =
     conditioning (external T5/CLIP embeddings or token ids) + the reward's inputs; consts =
     {'rewards', 'ref' (abstract params when kl_beta > 0)}.
  3. `abstract_reward_step(config, mesh)`: the reward forward alone on a batch of
     `config.data.batch_size` samples.
  4. `abstract_grpo_rollout_step` / `abstract_grpo_update_step`: the iteration's rollout and its
     update (advantages + M minibatch updates) alone, jitted from the same
     `grpo_step.make_grpo_functions` parts the fused step composes. A step of an iteration
     carries `resident`: the arrays on the chips while it runs that are not its arguments
     (rollout: optimizer state, EMA, reward params; reward: policy state + trajectory; update:
     reward params), so the iteration's per-chip peak is max over its steps of (step total +
     resident) (docs/scaling.md).
  5. `config.grpo.lora` (rank > 0): the trainable tree is a LoRA (nn/lora.py) on the kernels
     matching `targets`, the frozen base (in `grpo.lora.base_dtype`) an argument; the generator sees
     merge(base, lora) in the rollout and in every update step (`grpo_step.policy_params`).
Analytic model FLOPs (matmul weights only, attention L² terms and VAE convolutions not counted):
  rollout 2·P·S·B·N, update 6·P·S·B·T (+2·P·S·B·T for the KL reference), reward
  2·(P_vit·S_vit·tiles + P_proj·S_img + P_lm·L + P_head)·B, with P the generator's parameters,
  S its tokens per sample (image patches + text), N rollout steps, T trained steps per sample.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rewarddance_jax import families
from rewarddance_jax.families.base import IDENTITY_CODEC
from rewarddance_jax.models.vae import VAE_PRESETS, AutoencoderKL
from rewarddance_jax.models.vlm import InternVL, vlm_config
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.parallel.trees import count_params
from rewarddance_jax.rewards import base, registry
from rewarddance_jax.rewards.vlm_losses import yes_probability
from rewarddance_jax.rewards.vlm_yes import TileSpec, answer_logits, vlm_tiles
from rewarddance_jax.scan.step import AbstractStep, abstract_model, batch_leaf, key_struct
from rewarddance_jax.train import common, grpo_step
from rewarddance_jax.train import grpo as grpo_trainer


def _replicated(mesh, tree):
  rep = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x),
                                                     sharding=rep), tree)


def vlm_reward_flops(vlm_cfg, params, max_len: int) -> float:
  """Matmul FLOPs of one sample through the VLM reward (see the module docstring)."""
  model = params['model']
  grid = vlm_cfg.vision.grid
  lm = {k: v for k, v in model['lm'].items() if k != 'embed'}
  head = model.get('lm_head') or model['lm']['embed']
  return 2.0 * (count_params(model['vision']) * (grid * grid + 1) + count_params(model['projector'])
                * vlm_cfg.tokens_per_tile + count_params(lm) * max_len + count_params(head))


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
  rcfg = config.get('scan', {}).get('reward', None)
  if rcfg is not None:
    reward, extra, flops = abstract_vlm_reward(
        rcfg, mesh, rules, scan_layers=bool(config.model.get('scan_layers', False)))
    return base.WeightedRewards([(reward, 1.0)]), extra, flops
  rewards = registry.build_rewards(config.rewards)
  # Rule rewards read the digit labels; their params are small constants, replicated.
  return _replicated(mesh, rewards), {'labels': ((), jnp.int32)}, 0.0


def _cond_batch(fam, model_cfg, mesh, rules, b: int) -> dict:
  return {k: batch_leaf(mesh, rules, shape, dtype)
          for k, (shape, dtype) in fam.cond_shapes(b, model_cfg).items()}


def _generator_tokens(config, fam, model_cfg) -> int:
  h, w = fam.latent_shape[:2]
  p = model_cfg.patch_size
  return (h // p) * (w // p) + int(config.data.max_text_len)


def _rows_leaf(mesh, rules, shape, dtype, axis):
  """A struct whose `axis` follows the batch sharding (`act_batch`), the rest unsharded."""
  names = [None] * len(shape)
  names[axis] = 'act_batch'
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(
      mesh, sharding_lib.logical_to_spec(tuple(names), rules)))


@dataclasses.dataclass
class Policy:
  """The abstract GRPO policy of a config: the trainer's own (`train/grpo.build_policy` with
  `abstract=True`) plus what the scanner adds: the rollout's trajectory and the conditioning
  batch as sharded structs.

  state: {'params' (trainable: the generator params, or the LoRA tree), 'opt_state', ['ema'],
  'rl'}; frozen: {'ref' (or None), 'base' (the frozen generator params under a LoRA, or None)};
  trajectory: the rollout's outputs (x, x_next, logp (N−1, B, ...), idx (B, T), x0_hat (B, ...)).
  """
  trainer: Any             # train/grpo.Policy
  state: dict
  shardings: dict
  frozen: dict
  num_params: int          # the generator's parameters (the FLOPs count)
  trajectory: dict
  cond: dict

  @property
  def gcfg(self):
    return self.trainer.gcfg

  @property
  def batch_size(self) -> int:
    return self.trainer.batch_size


def abstract_policy(config, mesh, rules) -> Policy:
  """The trainer's GRPO state built abstractly, the trajectory and the conditioning batch."""
  pol = grpo_trainer.build_policy(config, mesh, rules, abstract=True)
  b, gcfg = pol.batch_size, pol.gcfg
  image = pol.fam.latent_shape
  k, t = gcfg.num_steps - 1, gcfg.selection.num_trained
  trajectory = {
      'x': _rows_leaf(mesh, rules, (k, b) + image, jnp.float32, 1),
      'x_next': _rows_leaf(mesh, rules, (k, b) + image, jnp.float32, 1),
      'logp': _rows_leaf(mesh, rules, (k, b), jnp.float32, 1),
      'idx': _rows_leaf(mesh, rules, (b, t), jnp.int32, 0),
      'x0_hat': _rows_leaf(mesh, rules, (b,) + image, jnp.float32, 0)}
  return Policy(trainer=pol, state=pol.state, shardings=pol.shardings, frozen=pol.frozen,
                num_params=pol.num_params, trajectory=trajectory,
                cond=_cond_batch(pol.fam, pol.model_cfg, mesh, rules, b))


def _grpo_setup(config, mesh):
  """(rules, policy, rewards, batch, GRPO functions, FLOPs {rollout, update, reward})."""
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  sharding_lib.check_rules(rules, mesh)
  pol = abstract_policy(config, mesh, rules)
  b, gcfg = pol.batch_size, pol.gcfg
  rewards, extra, reward_flops = abstract_rewards(config, mesh, rules)
  batch = dict(pol.cond)
  for name, (tail, dtype) in extra.items():
    batch[name] = batch_leaf(mesh, rules, (b,) + tuple(tail), dtype)
  fns = grpo_trainer.make_functions(pol.trainer, rewards, IDENTITY_CODEC)
  s = _generator_tokens(config, pol.trainer.fam, pol.trainer.model_cfg)
  flops = {'rollout': 2.0 * pol.num_params * s * b * gcfg.num_steps,
           'update': ((6.0 + (2.0 if gcfg.kl_beta > 0 else 0.0)) * pol.num_params * s * b
                      * gcfg.selection.num_trained),
           'reward': reward_flops * b}
  return rules, pol, rewards, batch, fns, flops, s


def abstract_grpo_step(config, mesh) -> AbstractStep:
  """The full GRPO iteration of `config` on `mesh` (module docstring, item 2)."""
  rules, pol, rewards, batch, fns, flops, s = _grpo_setup(config, mesh)
  consts = dict(pol.frozen, rewards=rewards)
  with common.mesh_context(mesh, rules):
    jitted = jax.jit(fns.step, in_shardings=(pol.shardings, None, None, None),
                     out_shardings=(pol.shardings, None), donate_argnums=(0,))
  return AbstractStep(jitted=jitted, args=(pol.state, batch, key_struct(mesh), consts), mesh=mesh,
                      rules=rules, num_params=pol.num_params, tokens=s * pol.batch_size,
                      flops_per_param_token=0, analytic_flops=sum(flops.values()))


def abstract_grpo_rollout_step(config, mesh) -> AbstractStep:
  """The GRPO rollout alone: (trainable, frozen, batch, key, iteration) → trajectory.

  Resident while it runs (not arguments): the optimizer state, EMA, rl counters and the reward
  params (the reference too when kl_beta > 0)."""
  rules, pol, rewards, batch, fns, flops, s = _grpo_setup(config, mesh)
  frozen = {k: v for k, v in pol.frozen.items() if k == 'base'}

  def rollout_step(trainable, frozen, batch, key, iteration):
    params = grpo_step.policy_params(pol.gcfg, jax.lax.stop_gradient(trainable), frozen)
    return fns.rollout(params, batch, grpo_step.split_keys(key), iteration)

  cond = dict(pol.cond)
  with common.mesh_context(mesh, rules):
    jitted = jax.jit(rollout_step)
  resident = {k: v for k, v in pol.state.items() if k != 'params'}
  resident.update(rewards=rewards, ref=pol.frozen['ref'])
  return AbstractStep(jitted=jitted, args=(pol.state['params'], frozen, cond, key_struct(mesh),
                                           pol.state['rl']['iteration']),
                      mesh=mesh, rules=rules, num_params=pol.num_params,
                      tokens=s * pol.batch_size, flops_per_param_token=0,
                      analytic_flops=flops['rollout'], resident=resident)


def abstract_grpo_update_step(config, mesh) -> AbstractStep:
  """The GRPO update alone: (state, frozen, trajectory, per-reward scores, batch, key) → state,
  donated as in the fused step. Resident while it runs: the reward params."""
  rules, pol, rewards, batch, fns, flops, s = _grpo_setup(config, mesh)
  b = pol.batch_size
  per = {name: batch_leaf(mesh, rules, (b,), jnp.float32) for name in rewards.names}
  trajectory = {k: v for k, v in pol.trajectory.items() if k != 'x0_hat'}
  with common.mesh_context(mesh, rules):
    jitted = jax.jit(fns.update, in_shardings=(pol.shardings, None, None, None, None, None),
                     out_shardings=(pol.shardings, None), donate_argnums=(0,))
  return AbstractStep(jitted=jitted, args=(pol.state, pol.frozen, trajectory, per, pol.cond,
                                           key_struct(mesh)),
                      mesh=mesh, rules=rules, num_params=pol.num_params,
                      tokens=s * b, flops_per_param_token=0, analytic_flops=flops['update'],
                      resident={'rewards': rewards})


def abstract_reward_step(config, mesh) -> AbstractStep:
  """The reward forward of `config` on `config.data.batch_size` samples (module docstring)."""
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  sharding_lib.check_rules(rules, mesh)
  rewards, extra, reward_flops = abstract_rewards(config, mesh, rules)
  b = int(config.data.batch_size)
  shape = (b,) + families.from_config(config).latent_shape
  samples = {'latents': batch_leaf(mesh, rules, shape, jnp.float32)}
  if 'pixels' in rewards.inputs:
    samples['pixels'] = batch_leaf(mesh, rules, shape, jnp.float32)
  batch = {name: batch_leaf(mesh, rules, (b,) + tuple(tail), dtype)
           for name, (tail, dtype) in extra.items()}

  def forward(r, samples, batch, key):
    return r.total(samples, batch, key)

  with common.mesh_context(mesh, rules):
    jitted = jax.jit(forward)
  num_params = count_params(rewards)
  resident = None
  if 'grpo' in config:   # inside a GRPO iteration: the policy and the trajectory stay resident
    pol = abstract_policy(config, mesh, rules)
    resident = {'state': pol.state, 'frozen': pol.frozen,
                'trajectory': {k: v for k, v in pol.trajectory.items() if k != 'x0_hat'}}
  return AbstractStep(jitted=jitted, args=(rewards, samples, batch, key_struct(mesh)), mesh=mesh,
                      rules=rules, num_params=num_params, tokens=b, flops_per_param_token=0,
                      analytic_flops=reward_flops * b, resident=resident)
