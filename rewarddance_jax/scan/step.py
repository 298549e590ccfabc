"""The scanner's abstract step and the helpers its step builders share.

`AbstractStep`: a jitted step with sharded `jax.ShapeDtypeStruct` arguments, its analytic FLOPs
and the arrays resident on the chips beside it; `compile_report()` compiles it (parallel/aot.py).
Helpers: `abstract(tree, shardings)` pairs shapes with shardings, `abstract_model(factory, ...)`
builds a module's abstract params, `batch_leaf` / `key_struct` a data-sharded batch leaf and a
replicated PRNG key, `per_chip_bytes` one chip's bytes (elements: `parallel.trees.count_params`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rewarddance_jax.parallel import aot
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.train import common


@dataclasses.dataclass
class AbstractStep:
  """A jitted step with abstract (sharded `ShapeDtypeStruct`) arguments, ready to compile."""
  jitted: Callable
  args: tuple
  mesh: jax.sharding.Mesh
  rules: Any
  num_params: int
  tokens: int                # tokens processed by one step, over all chips
  flops_per_param_token: int  # 6 for a train step (fwd + bwd), 2 for a forward
  analytic_flops: float | None = None  # set by steps whose FLOPs are not 6·P·tokens (GRPO)
  # Arrays on the chips while this step runs that are not its arguments (a part of an iteration:
  # e.g. the optimizer state during the rollout); None for a self-contained step.
  resident: Any = None

  @property
  def resident_bytes(self) -> int:
    """Per-chip bytes of `resident` (each leaf's shard)."""
    if self.resident is None:
      return 0
    return per_chip_bytes(self.resident)

  @property
  def model_flops(self) -> float:
    """Analytic FLOPs of one step over all chips (matmul weights only)."""
    if self.analytic_flops is not None:
      return float(self.analytic_flops)
    return float(self.flops_per_param_token * self.num_params * self.tokens)

  def compile_report(self) -> dict[str, Any]:
    """`aot.compile_report` under the step's mesh and logical rules."""
    with common.mesh_context(self.mesh, self.rules):
      return aot.compile_report(self.jitted, *self.args)


def abstract(tree, shardings):
  """`tree`'s leaves as `ShapeDtypeStruct`s with the matching leaves of `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def abstract_model(factory, mesh, rules):
  """(graphdef, abstract params with shardings, param shardings) of `factory()`."""
  graphdef, (state,) = sharding_lib.abstract_state(factory, mesh, rules)
  pshard = nnx.to_pure_dict(sharding_lib.state_shardings(state, mesh, rules))
  return graphdef, abstract(nnx.to_pure_dict(state), pshard), pshard


def key_struct(mesh):
  """A replicated PRNG key struct on `mesh`."""
  return jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                              sharding=NamedSharding(mesh, P()))


def batch_leaf(mesh, rules, shape, dtype):
  """A batch struct of `shape`, its leading axis sharded as the data (`data_sharding`)."""
  return jax.ShapeDtypeStruct(shape, dtype,
                              sharding=sharding_lib.data_sharding(mesh, rules, len(shape)))


def per_chip_bytes(tree) -> int:
  """Bytes one chip holds of a tree of sharded `ShapeDtypeStruct`s (its shard of every leaf)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total
