"""One attention function that picks the kernel for the platform.

`attention(q, k, v, mask=None, impl='auto')`, q/k/v shaped (B, L, H, D), non-causal (MMDiT and
ViT attention are bidirectional). Implementations:
  1. 'xla'   — `jax.nn.dot_product_attention(implementation='xla')`: any platform, fp32 softmax.
  2. 'cudnn' — the cuDNN fused kernel (GPU, bf16/fp16).
  3. 'flash' — the Pallas TPU flash-attention kernel under `jax.shard_map`, batch and heads split
               as the active logical rules say (`act_batch`, `act_heads`). Compiles ahead of time
               for TPU topologies on a CPU host, so the TPU path is proven without a TPU.
  4. 'auto'  — 'xla' on CPU; 'cudnn' on GPU for bf16/fp16; 'flash' on TPU when the sequence lengths
               are multiples of 128, else 'xla'.
`mask` is an optional (B, Lk) boolean key mask (True = attend), e.g. text padding.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLS = ('auto', 'xla', 'cudnn', 'flash')


def resolve_impl(impl: str, q: jax.Array, k: jax.Array, platform: str | None = None) -> str:
  """The concrete implementation 'auto' stands for on `platform` (default: the JAX backend)."""
  if impl not in IMPLS:
    raise ValueError(f'attention impl {impl!r} is not one of {IMPLS}.')
  if impl != 'auto':
    return impl
  platform = platform or jax.default_backend()
  if platform == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  if platform == 'tpu' and q.shape[1] % 128 == 0 and k.shape[1] % 128 == 0:
    return 'flash'
  return 'xla'


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              impl: str = 'auto', platform: str | None = None) -> jax.Array:
  """Scaled dot-product attention over (B, L, H, D) inputs; returns (B, Lq, H, D)."""
  impl = resolve_impl(impl, q, k, platform)
  if impl == 'flash':
    return _tpu_flash(q, k, v, mask)
  full_mask = None if mask is None else mask[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=full_mask, implementation=impl)


def _tpu_flash(q, k, v, mask):
  # Imported lazily: the Pallas TPU module is only needed when this path is taken.
  from jax.experimental.pallas.ops.tpu import flash_attention as fa

  scale = q.shape[-1] ** -0.5
  spec = nn.logical_to_mesh_axes(('act_batch', 'act_heads', None, None))
  mesh = jax.sharding.get_abstract_mesh()
  qt, kt, vt = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))   # (B, H, L, D) for the kernel

  def kernel(qs, ks, vs, ms):
    seg = None
    if ms is not None:
      seg = fa.SegmentIds(q=jnp.ones((qs.shape[0], qs.shape[2]), jnp.int32),
                          kv=ms.astype(jnp.int32))
    return fa.flash_attention(qs, ks, vs, segment_ids=seg, sm_scale=scale)

  if mesh.empty:
    out = kernel(qt, kt, vt, mask)
  else:
    mask_spec = P(spec[0], None)
    fn = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
    if mask is None:
      out = fn(lambda a, b, c: kernel(a, b, c, None), in_specs=(spec,) * 3, out_specs=spec)(
          qt, kt, vt)
    else:
      out = fn(kernel, in_specs=(spec,) * 3 + (mask_spec,), out_specs=spec)(qt, kt, vt, mask)
  return jnp.swapaxes(out, 1, 2)
