"""parallel.trees.count_params: the one parameter counter."""

import jax
import jax.numpy as jnp
import numpy as np

from rewarddance_jax.parallel.trees import count_params


def test_count_params_counts_arrays_and_shape_structs():
  shapes_only = jax.ShapeDtypeStruct((4, 1, 2), jnp.bfloat16)
  tree = {'a': jnp.zeros((2, 3)), 'b': [np.zeros(5), shapes_only], 'c': jnp.zeros(())}
  assert count_params(tree) == 6 + 5 + 8 + 1
  assert count_params({}) == 0
