"""One run per workdir: `<workdir>/run.lock` names the host and pid of the run that holds it.

`hold(workdir)` is a context manager around a run:
  1. it creates the lock file atomically with its content (written to a temporary file, then
     hard-linked to the lock's name, which fails if the name exists), so a reader never sees a
     half-written lock;
  2. a lock held by a live process, or by any process on another host (which cannot be
     checked from here), refuses the run with `WorkdirLockedError` naming the holder;
  3. a stale lock (its pid is dead on this host, or the file is unreadable) is replaced, with a
     warning naming the old holder;
  4. the lock is removed on leaving the block, also on an error or an exception raised by a
     signal handler; a run killed with SIGKILL leaves a stale lock, which 3 takes over.
Object-store workdirs (`gs://...`) are not locked: they have no atomic create.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator

from absl import logging

from rewarddance_jax.errors import InputError

LOCK_NAME = 'run.lock'


class WorkdirLockedError(InputError):
  """Another run holds the workdir, or the workdir cannot hold a lock file."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def _read(path: str) -> dict | None:
  """The lock's holder, or None when the file is unreadable (garbled, or gone meanwhile)."""
  try:
    with open(path, encoding='utf-8') as f:
      holder = json.load(f)
  except (OSError, ValueError):
    return None
  ok = isinstance(holder, dict) and isinstance(holder.get('pid'), int) and 'host' in holder
  return holder if ok else None


def _describe(holder: dict) -> str:
  return f"pid {holder['pid']} on host {holder['host']} (since {holder.get('since', '?')})"


def _try_create(path: str, content: dict) -> bool:
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(content, f)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  finally:
    os.remove(tmp)


def _acquire(path: str, mine: dict) -> None:
  for _ in range(3):
    if _try_create(path, mine):
      return
    holder = _read(path)
    if holder is not None and (holder['host'] != mine['host'] or _pid_alive(holder['pid'])):
      raise WorkdirLockedError(
          f'workdir {os.path.dirname(path)} is in use by {_describe(holder)}: lock file {path}; '
          'wait for that run to end, or delete the lock file if it is gone.')
    logging.warning('Taking over the stale lock %s (%s).', path,
                    'unreadable' if holder is None else f'{_describe(holder)}, not running')
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
  raise WorkdirLockedError(f'could not take the lock file {path}: other runs keep taking it.')


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[str | None]:
  """Holds `workdir`'s lock for the block (module docstring); yields the lock's path (None
  when not `enabled`, e.g. on every process but the first of a multi-host run)."""
  if not enabled or '://' in workdir:
    yield None
    return
  path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
  mine = {'host': socket.gethostname(), 'pid': os.getpid(),
          'since': time.strftime('%Y-%m-%d %H:%M:%S')}
  try:
    os.makedirs(workdir, exist_ok=True)
    _acquire(path, mine)
  except OSError as e:
    raise WorkdirLockedError(f'workdir {workdir} is not writable: cannot create its lock file '
                             f'{path} ({e.strerror or e}).') from e
  try:
    yield path
  finally:
    holder = _read(path)
    if holder is not None and (holder['host'], holder['pid']) == (mine['host'], mine['pid']):
      os.remove(path)
