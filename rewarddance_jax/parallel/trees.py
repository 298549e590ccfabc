"""`count_params(tree)`: the number of scalars in a tree's leaves (arrays or ShapeDtypeStructs)."""

from __future__ import annotations

import math
from typing import Any

import jax


def count_params(tree: Any) -> int:
  """Scalars in the leaves of `tree` (anything with a `shape`: arrays, `ShapeDtypeStruct`s)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
