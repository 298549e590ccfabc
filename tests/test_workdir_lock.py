"""The workdir lock: refused while its holder lives, stale locks taken over, released on errors."""

import json
import os
import socket
import subprocess

import pytest

from rewarddance_jax import workdir_lock


def _write_lock(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lock.LOCK_NAME), 'w', encoding='utf-8') as f:
    f.write(holder.pop('raw', None) or json.dumps(holder))


def _dead_pid():
  proc = subprocess.Popen(['true'])
  proc.wait()
  return proc.pid


def test_lock_holds_host_and_pid_and_is_released(tmp_path):
  path = tmp_path / 'w' / workdir_lock.LOCK_NAME
  with workdir_lock.hold(str(tmp_path / 'w')) as held:
    assert held == str(path)
    holder = json.loads(path.read_text())
    assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f'pid {os.getpid()} on host'):
      with workdir_lock.hold(str(tmp_path / 'w')):
        pass
    assert path.exists()   # the refused attempt leaves the holder's lock alone
  assert not path.exists()
  with pytest.raises(KeyError):   # released on an error too
    with workdir_lock.hold(str(tmp_path / 'w')):
      raise KeyError('boom')
  assert not path.exists() and os.listdir(tmp_path / 'w') == []


def test_live_and_remote_holders_refuse_stale_ones_are_taken_over(tmp_path, caplog):
  sleeper = subprocess.Popen(['sleep', '30'])
  try:
    _write_lock(tmp_path / 'live', host=socket.gethostname(), pid=sleeper.pid, since='x')
    with pytest.raises(workdir_lock.WorkdirLockedError) as e:
      with workdir_lock.hold(str(tmp_path / 'live')):
        pass
    assert f'pid {sleeper.pid}' in str(e.value) and 'run.lock' in str(e.value)
  finally:
    sleeper.kill()
    sleeper.wait()
  _write_lock(tmp_path / 'remote', host='some-other-host', pid=_dead_pid(), since='x')
  with pytest.raises(workdir_lock.WorkdirLockedError, match='some-other-host'):
    with workdir_lock.hold(str(tmp_path / 'remote')):
      pass
  for name, holder in (('dead', dict(host=socket.gethostname(), pid=_dead_pid(), since='x')),
                       ('garbled', dict(raw='{"pid": '))):
    _write_lock(tmp_path / name, **holder)
    with workdir_lock.hold(str(tmp_path / name)):
      assert json.loads((tmp_path / name / 'run.lock').read_text())['pid'] == os.getpid()
    assert not (tmp_path / name / 'run.lock').exists()
  assert sum('stale lock' in r.getMessage() for r in caplog.records) == 2


def test_a_workdir_that_cannot_hold_a_lock_is_named(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(workdir_lock.WorkdirLockedError, match=f'workdir {blocker}/w is not writable'):
    with workdir_lock.hold(str(blocker / 'w')):
      pass
  with workdir_lock.hold('gs://bucket/run') as held:   # object stores are not locked
    assert held is None
