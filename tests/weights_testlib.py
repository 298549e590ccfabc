"""Helpers shared by the weights parity tests."""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh


def mesh(shape=(1, 1, 1)) -> Mesh:
  n = int(np.prod(shape))
  return Mesh(np.array(jax.devices()[:n]).reshape(shape), ('data', 'fsdp', 'tensor'),
              axis_types=(AxisType.Auto,) * 3)


# XLA backend optimisation level 0: half the CPU compile time of the default, same fp32 math
# (the parity tolerances are unaffected).
O0 = {'xla_backend_optimization_level': 0}


def run_o0(fn, *args):
  """jit + run `fn(*args)` compiled with `O0` (call under the mesh context)."""
  return jax.jit(fn).lower(*args).compile(compiler_options=O0)(*args)
