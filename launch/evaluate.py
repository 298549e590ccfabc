"""Scores a samples file with the independent digits judge.

  python -m launch.evaluate --samples=/path/samples.npz [--cache_dir=DIR] [--json_out=FILE]

1. loads and validates the samples file (`rewarddance_jax/data/samples.py` format);
2. loads the cached judge (or trains it once, about a second) from `rewarddance_jax/judge.py`;
3. prints the prompt-alignment accuracy and the per-class accuracy, and optionally writes them as
   JSON; bad input ends the program with status 2 and one line naming the file (launch/cli.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags

from launch import cli
from rewarddance_jax import judge

_SAMPLES = flags.DEFINE_string('samples', None, 'samples .npz written by a trainer or sampler.')
_CACHE_DIR = flags.DEFINE_string(
    'cache_dir', None, 'judge cache dir (default: $RDJ_CACHE_DIR, else ~/.cache/rewarddance_jax).')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'optional path for the results as JSON.')
flags.mark_flag_as_required('samples')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {" ".join(argv[1:])}')
  result = judge.evaluate_samples(_SAMPLES.value, cache_dir=_CACHE_DIR.value)
  print(f'samples {_SAMPLES.value}: n={result["n"]} accuracy={result["accuracy"]:.4f}')
  print('per class: ' + ' '.join(f'{c}={acc:.3f}' for c, acc in result['per_class'].items()))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, 'w', encoding='utf-8') as f:
      json.dump({'samples': _SAMPLES.value, **result}, f, indent=2)


if __name__ == '__main__':
  cli.run(main)
