"""Train: `python -m launch.train --config=configs/<family>/<job>.py[:args] --workdir=DIR`.

The same command runs on every host of a pod. `--config.a.b=value` overrides a field; an unknown
field is rejected with its name. Re-running with the same workdir resumes from its checkpoint;
a second run on a workdir in use is refused (`workdir_lock`). Bad input ends the run with one
line and status 2, SIGTERM with a checkpoint and status 143 (`launch/cli.py`).
The trainer is the one `config.trainer` names in rewarddance_jax/train.
Several processes (one per host): `--coordinator=HOST:PORT --num_processes=N --process_id=I`,
or the scheduler's environment (TPU pod, Slurm, Open MPI; `parallel/distributed.py`).
"""

import jax
from absl import flags, logging
from ml_collections import config_flags

from launch import cli
from rewarddance_jax import logs, workdir_lock
from rewarddance_jax.parallel import distributed
from rewarddance_jax.train import get_trainer, loop

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
    raise ValueError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_libraries()
  if '://' in _WORKDIR.value:
    raise ValueError(f'--workdir={_WORKDIR.value}: metrics, samples and the tokenizer are written '
                     'with local file I/O; mount the bucket (e.g. gcsfuse) and pass the mounted '
                     'path.')
  distributed.initialize(_DISTRIBUTED.value, coordinator=_COORDINATOR.value,
                         num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                         heartbeat_timeout_s=_HEARTBEAT.value, shutdown_timeout_s=_SHUTDOWN.value)
  config = _CONFIG.value
  try:
    trainer_name = config.get('trainer', None)
  except OSError as e:  # config_flags defers a failed load until first use
    detail = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    raise ValueError(f'--config={flags.FLAGS["config"].serialize().split("=", 1)[-1]}: '
                     f'{detail}') from e
  trainer = get_trainer(trainer_name)
  logging.info('Trainer %s, workdir %s', config.trainer, _WORKDIR.value)
  stops = len(loop.SIGTERM_STOPS)
  with workdir_lock.hold(_WORKDIR.value, enabled=jax.process_index() == 0):
    trainer(config, _WORKDIR.value)
  if len(loop.SIGTERM_STOPS) > stops:
    raise cli.Terminated(f'stopped by SIGTERM after step {loop.SIGTERM_STOPS[-1]}, checkpoint '
                         f'saved in {_WORKDIR.value}; run the same command again to resume.')


if __name__ == '__main__':
  cli.run(main)
