"""Layer stacks: a list of blocks or one block with stacked (scanned) weights, run with remat.

`make_stack(block_cls, cfg, depth, rngs)` builds `depth` blocks `block_cls(cfg, rngs)`: an
`nnx.List` when `cfg.scan_layers` is false, else one vmapped block whose params carry a leading
'layers' axis. `run_stack(stack, cfg, depth, carry)` threads `carry` (the blocks' input and output
alike) through them: a `lax.scan` over the stacked weights, or a Python loop, each block under
`REMAT_POLICIES[cfg.remat]` unless it is 'none'. `cfg` is any config with `scan_layers` and `remat`.
"""

from __future__ import annotations

import jax
from flax import nnx

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def make_stack(block_cls, cfg, depth: int, rngs: nnx.Rngs):
  """`depth` blocks `block_cls(cfg, rngs)`, stacked on a 'layers' axis when `cfg.scan_layers`."""
  if not cfg.scan_layers:
    return nnx.List([block_cls(cfg, rngs) for _ in range(depth)])

  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def create(r):
    return block_cls(cfg, r)

  return create(rngs)


def run_stack(stack, cfg, depth: int, carry):
  """`carry` through the `depth` blocks of `stack` (from `make_stack` with the same `cfg`)."""
  policy = REMAT_POLICIES[cfg.remat]
  if depth == 0:
    return carry
  if cfg.scan_layers:
    graphdef, state = nnx.split(stack)

    def body(c, s):
      return nnx.merge(graphdef, s)(c), None

    if cfg.remat != 'none':
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    carry, _ = jax.lax.scan(body, carry, state)
    return carry
  for block in stack:
    if cfg.remat != 'none':
      carry = nnx.remat(lambda b, c: b(c), policy=policy)(block, carry)
    else:
      carry = block(carry)
  return carry
