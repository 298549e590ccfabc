"""Train: `python -m launch.train --config=configs/<family>/<job>.py[:args] --workdir=DIR`.

The same command runs on every host of a pod. `--config.a.b=value` overrides a field; an unknown
field is rejected with its name. Re-running with the same workdir resumes from its checkpoint.
The trainer is the one `config.trainer` names in rewarddance_jax/train.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rewarddance_jax import logs
from rewarddance_jax.config_lib import parse_config_flags
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.train import get_trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, samples).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_libraries()
  mesh_lib.maybe_initialize_distributed()
  config = _CONFIG.value
  try:
    trainer_name = config.get('trainer', None)
  except OSError as e:  # config_flags defers a failed load until first use
    detail = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    sys.exit(f'error: --config={flags.FLAGS["config"].serialize().split("=", 1)[-1]}: {detail}')
  trainer = get_trainer(trainer_name)
  logging.info('Trainer %s, workdir %s', config.trainer, _WORKDIR.value)
  trainer(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_config_flags)
