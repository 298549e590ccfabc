"""Mean and spread over several pipeline runs (e.g. two seeds of the digits main job).

  python -m launch.train --config=configs/digits/pipeline.py --workdir=runs/digits
  python -m launch.train --config=configs/digits/pipeline.py:seed=1 --workdir=runs/digits_seed1
  python -m launch.summarize --runs=runs/digits,runs/digits_seed1 [--out=runs/seeds.md]

Reads each run's `results.json`, prints per method the judge accuracy, reward mean and reward std
as mean [min – max] over the runs, and writes the table to --out when given.
"""

from absl import flags

from launch import cli
from rewarddance_jax import evaluate

_RUNS = flags.DEFINE_list('runs', None, 'pipeline workdirs, comma-separated.')
_OUT = flags.DEFINE_string('out', None, 'optional markdown file for the table.')
flags.mark_flag_as_required('runs')


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {argv[1:]}')
  table, _ = evaluate.summarize_runs(_RUNS.value)
  print(table)
  if _OUT.value:
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      f.write(table)


if __name__ == '__main__':
  cli.run(main)
