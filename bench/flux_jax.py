"""GPU benchmark of our FLUX-architecture generator: forward, train step and one GRPO iteration.

Same configs as the PyTorch/diffusers peer that bench/gpu_all.sh runs as $PEER (one device call):
  flux-bench: 6 double + 12 single blocks, 12 heads × 128 (0.955B), B=4, 1024 image + 512 text
              tokens, guidance embeds; forward (bf16 weights) and train step (fp32 master weights,
              bf16 compute, AdamW, flow-matching loss, state donated).
  flux-dev:   19 double + 38 single blocks, 24 heads × 128 (11.9B), B=1, forward only.
  grpo:       one full GRPO iteration at flux-bench size (`train/grpo_step.py`, the trainer's own
              step): P prompts × G rollouts of N steps on device, a stand-in reward on x̂0,
              group advantages, M minibatch updates over T trained steps each.

Usage:
  python bench/flux_jax.py forward flux-dev [--batch=1] [--scan] [--attention=cudnn|xla]
  python bench/flux_jax.py train flux-bench [--batch=4] [--remat=none|dots|full]
  python bench/flux_jax.py grpo flux-bench [--prompts=1] [--group=12] [--steps=16] [--minibatches=3]
  python bench/flux_jax.py matmul
  CPU smoke: add --latent=8 --txt=16 --depth_double=1 --depth_single=1 --num_heads=2
Prints one JSON line per measurement: time, model TFLOP/s (analytic count, backward = 2×
forward), peak device memory.
"""

from __future__ import annotations

import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rewarddance_jax.models.generator import Generator, generator_config
from rewarddance_jax.models.presets import model_preset
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel import sharding as sharding_lib

IMG_TOKENS, TXT_TOKENS = 1024, 512
LATENT = (64, 64, 16)  # 64×64×16 latent, patch 2 → 1024 tokens of 64 channels


def parse_flags(argv):
  flags = {}
  for a in argv:
    if a.startswith('--'):
      k, _, v = a[2:].partition('=')
      flags[k] = v if v else True
  return flags


def forward_flops(cfg, batch: int) -> float:
  """Analytic matmul + attention FLOPs of one forward (2 per multiply-add)."""
  n_img, n_txt = IMG_TOKENS, TXT_TOKENS
  m = cfg.mmdit
  h, r = m.hidden, m.mlp_ratio
  l = n_img + n_txt
  per_token_double = (3 + 1 + 2 * r) * h * h
  double = m.depth_double * ((n_img + n_txt) * per_token_double + 4 * l * l * h / 2)
  single = m.depth_single * (l * (3 + r + 1 + r) * h * h + 4 * l * l * h / 2)
  embed = n_img * m.in_channels * h + n_txt * m.context_dim * h + n_img * h * m.in_channels
  return 2.0 * batch * (double + single + embed)


def timeit(fn, n=10, warm=3):
  for _ in range(warm):
    jax.block_until_ready(fn())
  t = time.perf_counter()
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / n


def peak_gib() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use', 0) / 2**30


def build(name: str, flags, param_dtype: str):
  overrides = {k: int(flags[k]) for k in ('depth_double', 'depth_single', 'num_heads')
               if k in flags}  # smaller variants for a CPU smoke run
  overrides.update(dtype='bfloat16', param_dtype=param_dtype,
                   scan_layers=bool(flags.get('scan', False)),
                   remat=flags.get('remat', 'none'), attention=flags.get('attention', 'auto'))
  cfg = generator_config(model_preset(name, **overrides))
  mesh = mesh_lib.create_mesh({'axes': ('data', 'fsdp', 'tensor'), 'ici': (1, -1, 1),
                               'dcn': (1, 1, 1), 'num_devices': 1})
  rules = sharding_lib.DEFAULT_RULES
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    graphdef, (params,), _ = sharding_lib.sharded_init(
        lambda: Generator(cfg, rngs=nnx.Rngs(0)), mesh, rules)
  return cfg, graphdef, params, mesh, rules


def inputs(batch: int, key):
  ks = jax.random.split(key, 4)
  return (jax.random.normal(ks[0], (batch,) + LATENT, jnp.bfloat16),
          {'txt': jax.random.normal(ks[1], (batch, TXT_TOKENS, 4096), jnp.bfloat16),
           'pooled': jax.random.normal(ks[2], (batch, 768), jnp.bfloat16)})


def bench_forward(name, flags):
  batch = int(flags.get('batch', 1 if name == 'flux-dev' else 4))
  cfg, graphdef, params, mesh, rules = build(name, flags, 'bfloat16')
  x, cond = inputs(batch, jax.random.key(1))
  sigma = jnp.full((batch,), 0.5, jnp.float32)
  guidance = jnp.full((batch,), 3.5, jnp.float32)

  @jax.jit
  def fwd(params, x, cond):
    return nnx.merge(graphdef, params)(x, sigma, cond, guidance)

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    t = timeit(lambda: fwd(params, x, cond))
  flops = forward_flops(cfg, batch)
  return dict(bench='forward', config=name, batch=batch, fwd_ms=t * 1e3,
              fwd_tflops=flops / t / 1e12, fwd_flops=flops, peak_mem_gib=peak_gib())


def bench_train(name, flags):
  batch = int(flags.get('batch', 4))
  cfg, graphdef, params, mesh, rules = build(name, flags, 'float32')
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5, weight_decay=1e-4))
  state = {'params': params, 'opt_state': jax.jit(tx.init)(params)}
  x0, cond = inputs(batch, jax.random.key(1))

  def loss_fn(params, key):
    k1, k2 = jax.random.split(key)
    sigma = jax.random.uniform(k1, (batch,))
    noise = jax.random.normal(k2, x0.shape, jnp.float32)
    s = sigma[:, None, None, None]
    xt = (1 - s) * x0.astype(jnp.float32) + s * noise
    v = nnx.merge(graphdef, params)(xt, sigma, cond, jnp.full((batch,), 3.5))
    return jnp.mean(jnp.square(v.astype(jnp.float32) - (noise - x0.astype(jnp.float32))))

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, key):
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], key)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    return {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state}, loss

  box = [state]

  def run():
    box[0], loss = step(box[0], jax.random.key(0))
    return loss

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    t = timeit(run)
  flops = 3 * forward_flops(cfg, batch)
  return dict(bench='train', config=name, batch=batch, remat=cfg.mmdit.remat,
              fwdbwd_ms=t * 1e3, fwdbwd_tflops=flops / t / 1e12, fwdbwd_flops=flops,
              peak_mem_gib=peak_gib())


def bench_grpo(name, flags):
  from rewarddance_jax.rewards import base as rewards_base, rules as rules_lib  # noqa
  from rewarddance_jax.families.base import Guidance, guided_velocity
  from rewarddance_jax.train import grpo_step
  prompts = int(flags.get('prompts', 1))
  group = int(flags.get('group', 12))
  num_steps = int(flags.get('steps', 16))
  minibatches = int(flags.get('minibatches', 3))
  batch = prompts * group
  cfg, graphdef, params, mesh, rules = build(name, flags, 'float32')
  gcfg = grpo_step.GRPOConfig.from_config(dict(
      group_size=group, step_kind='dance', noise_level=0.3, schedule='shift', num_steps=num_steps,
      shift=3.0, selection=dict(kind='fraction', fraction=0.6), minibatches=minibatches,
      clip_range=1e-4, variance_window=10))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5, weight_decay=1e-4))
  rewards = rewards_base.WeightedRewards([(rules_lib.mean_intensity(), 1.0)])
  step = grpo_step.make_grpo_step(
      graphdef, tx, gcfg, LATENT, reward_names=rewards.names, reward_weights=rewards.weights,
      decode=lambda z, _: jnp.clip((z[..., :3] + 1) * 0.5, 0, 1),
      velocity=guided_velocity(graphdef, Guidance('distilled', 3.5)))
  state = {'params': params, 'opt_state': jax.jit(tx.init)(params),
           'rl': jax.tree.map(jnp.asarray, grpo_step.init_rl_state(gcfg, batch))}
  _, cond = inputs(prompts, jax.random.key(1))
  cond = jax.tree.map(lambda a: jnp.repeat(a, group, axis=0), cond)
  jitted = jax.jit(step, donate_argnums=(0,))
  consts = {'rewards': rewards, 'ref': None}
  box = [state]

  def run():
    box[0], m = jitted(box[0], cond, jax.random.key(0), consts)
    return m['loss']

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    t = timeit(run, n=3, warm=2)  # the 2nd call recompiles for the donated output layout
  trained = gcfg.selection.num_trained
  flops = forward_flops(cfg, batch) * (num_steps + 3 * trained)
  return dict(bench='grpo', config=name, prompts=prompts, group=group, steps=num_steps,
              trained_steps=trained, minibatches=minibatches, iter_s=t,
              trajectories_per_s=batch / t, tflops=flops / t / 1e12, peak_mem_gib=peak_gib())


def bench_matmul(_name, _flags):
  n = 8192
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  f = jax.jit(lambda a: a @ a)
  t = timeit(lambda: f(a), n=20)
  return dict(bench='matmul', n=n, tflops=2 * n**3 / t / 1e12)


def set_smoke_shape(flags):
  """CPU smoke runs (--latent=8 --txt=16): smaller latent and text than the benchmark's."""
  global IMG_TOKENS, TXT_TOKENS, LATENT
  if 'latent' in flags:
    side = int(flags['latent'])
    LATENT, IMG_TOKENS = (side, side, 16), (side // 2) ** 2
    TXT_TOKENS = int(flags.get('txt', TXT_TOKENS))


def main(argv):
  what = argv[1]
  name = argv[2] if len(argv) > 2 and not argv[2].startswith('--') else 'flux-bench'
  flags = parse_flags(argv[2:])
  set_smoke_shape(flags)
  fn = {'forward': bench_forward, 'train': bench_train, 'grpo': bench_grpo,
        'matmul': bench_matmul}[what]
  res = fn(name, flags)
  res.update(device=jax.devices()[0].device_kind, jax=jax.__version__,
             flags={k: v for k, v in flags.items()})
  print(json.dumps(res), flush=True)


if __name__ == '__main__':
  main(sys.argv)
