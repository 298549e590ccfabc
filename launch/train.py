"""Train: `python -m launch.train --config=configs/<family>/<job>.py[:args] --workdir=DIR`.

The same command runs on every host of a pod. `--config.a.b=value` overrides a field; an unknown
field is rejected with its name. Re-running with the same workdir resumes from its checkpoint.
The trainer is the one `config.trainer` names in rewarddance_jax/train.
Several processes (one per host): `--coordinator=HOST:PORT --num_processes=N --process_id=I`,
or the scheduler's environment (TPU pod, Slurm, Open MPI; `parallel/distributed.py`).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rewarddance_jax import logs
from rewarddance_jax.config_lib import parse_config_flags
from rewarddance_jax.parallel import distributed
from rewarddance_jax.train import get_trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, samples).')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', distributed.MODES,
                                 'auto: join other processes when flags or environment name them; '
                                 'on: always call jax.distributed.initialize(); off: never.')
_COORDINATOR = flags.DEFINE_string('coordinator', '', 'host:port of process 0 (multi-process).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Number of processes (with '
                                      '--coordinator).')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process, in [0, num_processes).')
_HEARTBEAT = flags.DEFINE_integer('heartbeat_timeout', distributed.HEARTBEAT_TIMEOUT_S,
                                  'Seconds without heartbeat before a process counts as dead '
                                  'and the others exit.')
_SHUTDOWN = flags.DEFINE_integer('shutdown_timeout', distributed.SHUTDOWN_TIMEOUT_S,
                                 'Seconds a process waits at exit for the others.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_libraries()
  if '://' in _WORKDIR.value:
    sys.exit(f'error: --workdir={_WORKDIR.value}: metrics, samples and the tokenizer are written '
             'with local file I/O; mount the bucket (e.g. gcsfuse) and pass the mounted path.')
  try:
    distributed.initialize(_DISTRIBUTED.value, coordinator=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                           heartbeat_timeout_s=_HEARTBEAT.value,
                           shutdown_timeout_s=_SHUTDOWN.value)
  except ValueError as e:
    sys.exit(f'error: {e}')
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
