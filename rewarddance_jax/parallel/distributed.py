"""Multi-process start-up: one JAX process per host, joined by `jax.distributed.initialize`.

`initialize(mode, ...)` must run before anything touches `jax.devices()`. Where the processes
come from:
  1. explicit: `coordinator` (host:port of process 0), `num_processes`, `process_id`; or the
     same three from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  2. detected by JAX itself (no arguments): TPU pod slices (the TPU VM metadata, or GKE's
     TPU_WORKER_HOSTNAMES), Slurm (SLURM_NTASKS > 1, one task per host) and Open MPI.
`mode='auto'` initialises when one of these describes several processes, 'on' always (a TPU VM
slice, whose worker list JAX reads from the metadata server), 'off' never.

A process that stops heartbeating for `heartbeat_timeout_s` is declared dead: every other
process then exits with JAX's error, which names the dead task ("The following tasks are
unhealthy (stopped sending heartbeats): 1"); the death of process 0 is noticed at once. A
process that fails with an error waits at most `shutdown_timeout_s` at exit for the others; then
all exit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
from absl import logging

MODES = ('auto', 'on', 'off')
# JAX's defaults are 100 s and 300 s. The heartbeat bounds how long a survivor waits on a dead
# peer; the shutdown barrier how long a process that failed waits for the others at exit.
HEARTBEAT_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 60


def _explicit(coordinator: str, num_processes: int, process_id: int,
              env: Mapping[str, str]) -> dict:
  """coordinator_address / num_processes / process_id from the arguments, else from the JAX_*
  variables; {} when neither names a coordinator. Raises naming the bad value."""
  if not coordinator and 'JAX_COORDINATOR_ADDRESS' in env:
    coordinator = env['JAX_COORDINATOR_ADDRESS']
    try:
      num_processes = int(env.get('JAX_NUM_PROCESSES', '0'))
      process_id = int(env.get('JAX_PROCESS_ID', '-1'))
    except ValueError as e:
      raise ValueError(f'JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers ({e}).') from None
  if not coordinator:
    return {}
  if ':' not in coordinator:
    raise ValueError(f'coordinator={coordinator!r} must be host:port (process 0 listens there).')
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f'with coordinator={coordinator!r}, num_processes={num_processes} must be '
                     f'>= 1 and process_id={process_id} in [0, num_processes).')
  return dict(coordinator_address=coordinator, num_processes=num_processes,
              process_id=process_id)


def _environment_has_processes(env: Mapping[str, str]) -> bool:
  """Whether a scheduler's variables describe several processes (JAX detects the rest)."""
  hosts = env.get('TPU_PROCESS_ADDRESSES', env.get('TPU_WORKER_HOSTNAMES', ''))
  counts = (env.get('SLURM_NTASKS', '1'), env.get('OMPI_COMM_WORLD_SIZE', '1'))
  return ',' in hosts or any(c.isdigit() and int(c) > 1 for c in counts)


def initialize(mode: str = 'auto', *, coordinator: str = '', num_processes: int = 0,
               process_id: int = -1, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
               shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S,
               env: Mapping[str, str] | None = None) -> bool:
  """Joins the processes of a multi-host run (module docstring); True when it initialised."""
  if mode not in MODES:
    raise ValueError(f'distributed={mode!r} must be one of {MODES}.')
  for name, value in (('heartbeat_timeout', heartbeat_timeout_s),
                      ('shutdown_timeout', shutdown_timeout_s)):
    if value < 1:
      raise ValueError(f'{name}={value} must be >= 1 second.')
  env = os.environ if env is None else env
  kwargs = _explicit(coordinator, num_processes, process_id, env)
  if mode == 'off' or jax.distributed.is_initialized():
    return False
  if mode == 'auto' and not kwargs and not _environment_has_processes(env):
    return False
  jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                             shutdown_timeout_seconds=int(shutdown_timeout_s))
  logging.info('jax.distributed initialised: process %d of %d, %d local devices.',
               jax.process_index(), jax.process_count(), jax.local_device_count())
  return True
