"""Where the time of one generator forward goes on a GPU: a kernel-time table from the profiler.

Runs `bench/flux_jax.py`'s forward (same model, shapes and flags), traces a few calls with
`jax.profiler`, reads the XSpace back with `jax.profiler.ProfileData` and prints one JSON line:
per-call device time by kernel class (matmul / attention / fused elementwise / other), the top
kernels with their share, and the kernel count per call. Also times the projection GEMM shapes of
one block alone, separate and concatenated, to show what wave quantisation costs at batch 1.

Usage: python bench/profile_forward.py flux-dev [--batch=1] [--attention=cudnn] [--dump=hlo.txt]
       python bench/profile_forward.py --gemms
       (XLA_FLAGS set by the caller compare compiler options in separate processes.)
"""

from __future__ import annotations

import collections
import glob
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
import flux_jax  # noqa: E402  (the benchmark's builder and inputs)

CALLS = 3


def kernel_class(name: str) -> str:
  n = name.lower()
  if any(s in n for s in ('fmha', 'flash', 'cudnn', 'sdpa', 'attn')):
    return 'attention'
  if any(s in n for s in ('gemm', 'xmma', 'cutlass', 'nvjet', 'matmul', 'dot', 'sm90')):
    return 'matmul'
  if any(s in n for s in ('fusion', 'loop_', 'input_', 'reduce', 'convert', 'triton')):
    return 'fused elementwise'
  return 'other'


def device_events(trace_dir: str):
  path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True))[-1]
  data = jax.profiler.ProfileData.from_file(path)
  for plane in data.planes:
    if not plane.name.startswith('/device:GPU'):
      continue
    for line in plane.lines:
      if 'stream' not in line.name.lower():
        continue
      for ev in line.events:
        yield ev.name, ev.duration_ns


def profile(name, flags):
  batch = int(flags.get('batch', 1))
  cfg, graphdef, params, mesh, rules = flux_jax.build(name, flags, 'bfloat16')
  x, cond = flux_jax.inputs(batch, jax.random.key(1))
  sigma = jnp.full((batch,), 0.5, jnp.float32)
  guidance = jnp.full((batch,), 3.5, jnp.float32)
  fwd = jax.jit(lambda p, x, c: nnx.merge(graphdef, p)(x, sigma, c, guidance))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    t = flux_jax.timeit(lambda: fwd(params, x, cond))
    if 'dump' in flags:  # the optimised HLO, to read which ops the compiler made of the model
      with open(flags['dump'], 'w') as f:
        f.write(fwd.lower(params, x, cond).compile().as_text())
    with tempfile.TemporaryDirectory() as d:
      with jax.profiler.trace(d):
        for _ in range(CALLS):
          out = fwd(params, x, cond)
        jax.block_until_ready(out)
      events = list(device_events(d))
  by_class, by_name = collections.Counter(), collections.Counter()
  for n, dur in events:
    by_class[kernel_class(n)] += dur / CALLS / 1e6
    by_name[n[:90]] += dur / CALLS / 1e6
  total = sum(by_class.values())
  return dict(bench='profile', config=name, batch=batch, fwd_ms=t * 1e3, kernel_ms=total,
              kernels_per_call=len(events) // CALLS,
              by_class={k: round(v, 3) for k, v in by_class.most_common()},
              top=[(k, round(v, 3), round(100 * v / total, 1)) for k, v in by_name.most_common(25)],
              xla_flags=os.environ.get('XLA_FLAGS', ''))


def gemm_shapes(tokens: int = 1536, d: int = 3072, mlp: int = 12288):
  """One block's projection GEMMs at batch 1, alone and concatenated (TFLOP/s each)."""
  rows = {}
  key = jax.random.key(0)
  x = jax.random.normal(key, (tokens, d), jnp.bfloat16)
  for label, n in (('q|k|v|out (N=d)', d), ('qkv fused (N=3d)', 3 * d), ('mlp_in (N=4d)', mlp),
                   ('qkv+mlp_in fused (N=7d)', 3 * d + mlp)):
    w = jax.random.normal(key, (d, n), jnp.bfloat16)
    f = jax.jit(lambda x, w: x @ w)
    t = flux_jax.timeit(lambda: f(x, w), n=50)
    rows[label] = dict(us=round(t * 1e6, 1), tflops=round(2 * tokens * d * n / t / 1e12, 1))
  w = jax.random.normal(key, (mlp, d), jnp.bfloat16)
  h = jax.random.normal(key, (tokens, mlp), jnp.bfloat16)
  f = jax.jit(lambda h, w: h @ w)
  t = flux_jax.timeit(lambda: f(h, w), n=50)
  rows['mlp_out (K=4d)'] = dict(us=round(t * 1e6, 1), tflops=round(2 * tokens * d * mlp / t / 1e12, 1))
  return dict(bench='gemm_shapes', tokens=tokens, rows=rows,
              xla_flags=os.environ.get('XLA_FLAGS', ''))


def main(argv):
  name = argv[1] if len(argv) > 1 and not argv[1].startswith('--') else 'flux-dev'
  flags = flux_jax.parse_flags(argv[1:])
  flux_jax.set_smoke_shape(flags)
  res = gemm_shapes() if 'gemms' in flags else profile(name, flags)
  res.update(device=jax.devices()[0].device_kind, jax=jax.__version__)
  print(json.dumps(res), flush=True)


if __name__ == '__main__':
  main(sys.argv)
