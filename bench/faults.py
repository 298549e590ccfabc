"""Bad inputs and faults from the command line, as a user meets them; writes docs/reliability.md.

  PYTHONPATH=$PWD python bench/faults.py [--only=NAME,NAME] [--out=docs/reliability.md] \
      [--root=/tmp/rdj_faults]

Each case runs the real launchers (`python -m launch.train --config=configs/digits/flow.py:...`,
`launch.sample`, `launch.score`, ...) in subprocesses on tiny configs of a few steps, then checks
that nothing was lost: no checkpoint written by a refused run, an existing run's checkpoints
untouched, a corrupt checkpoint kept (set aside), no lock left behind, and, where a run resumes,
metrics and final params bitwise equal to one uninterrupted run (`reference`). A row records the
command, the last line the command printed, its exit status and that check. tests/test_faults.py
runs a few cases of this table.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLOW = 'configs/digits/flow.py:runlocal,steps=6'
TRAIN = ['launch.train', f'--config={FLOW}', '--config.samples.every=0', '--config.log_every=1',
         '--config.ckpt.every=2', '--config.ckpt.keep=3', '--config.mesh.num_devices=1']
LOOP_ONLY = ('steps_per_s',)

# Dropped into a PYTHONPATH folder of its own: kills the process (SIGKILL) when Orbax renames
# the finished temporary folder of step $FAULT_KILL_AT_SAVE into place, i.e. in the middle of a save.
_KILL_AT_SAVE = '''
import os, signal
_rename = os.rename
def _rename_or_die(src, dst, *a, **k):
  if 'orbax-checkpoint-tmp' in str(src) and os.path.basename(str(dst)) == os.environ.get(
      'FAULT_KILL_AT_SAVE'):
    os.kill(os.getpid(), signal.SIGKILL)
  return _rename(src, dst, *a, **k)
os.rename = _rename_or_die
'''


@dataclasses.dataclass
class Row:
  name: str
  what: str
  command: str
  status: int
  last_line: str
  expected_status: int
  lost_check: str
  nothing_lost: bool

  @property
  def ok(self) -> bool:
    return self.status == self.expected_status and self.nothing_lost


class Runner:
  """Runs launchers under `root`, one folder per case; keeps the reference run's results."""

  def __init__(self, root: str, env: dict | None = None):
    self.root = root
    os.makedirs(root, exist_ok=True)
    self.env = dict(os.environ if env is None else env)
    self.env['PYTHONPATH'] = ROOT + os.pathsep + self.env.get('PYTHONPATH', '')
    self.env.setdefault('JAX_PLATFORMS', 'cpu')
    self._reference = None

  def dir(self, name: str) -> str:
    path = os.path.join(self.root, name)
    shutil.rmtree(path, ignore_errors=True)
    return path

  def popen(self, *args, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**self.env, **(env_extra or {})}
    return subprocess.Popen([sys.executable, '-m', *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

  def run(self, *args, env_extra=None, timeout=300) -> tuple[int, str]:
    proc = self.popen(*args, env_extra=env_extra)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out

  def reference(self) -> dict:
    """Metrics and final params of one uninterrupted 6-step run."""
    if self._reference is None:
      work = self.dir('reference')
      status, out = self.run(*TRAIN, f'--workdir={work}')
      if status != 0:
        raise RuntimeError(f'the reference run failed ({status}): {last_line(out)}')
      self._reference = result(work)
    return self._reference

  def same_as_reference(self, work: str) -> tuple[bool, str]:
    got, ref = result(work), self.reference()
    if got['metrics'] != ref['metrics']:
      return False, f'metrics differ: steps {sorted(got["metrics"])} vs {sorted(ref["metrics"])}'
    if got['params'] != ref['params']:
      return False, 'final params differ'
    return True, 'metrics (each step once) and final params bitwise equal to an uninterrupted run'


def last_line(text: str) -> str:
  lines = [l.strip() for l in text.replace('\r', '\n').splitlines() if l.strip()]
  return lines[-1] if lines else ''


def metrics(work: str) -> dict:
  """{step: {name: value}} of the loss lines; a step logged twice is an error."""
  out = {}
  path = os.path.join(work, 'metrics.jsonl')
  for line in open(path, encoding='utf-8') if os.path.exists(path) else ():
    record = json.loads(line)
    if 'loss' in record:
      if record['step'] in out:
        raise ValueError(f'{path}: step {record["step"]} logged twice')
      out[record['step']] = {k: v for k, v in record.items() if k not in LOOP_ONLY}
  return out


def checkpoint_steps(work: str) -> list[int]:
  d = os.path.join(work, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def final_params(work: str) -> list[bytes]:
  """Bytes of every param leaf of the newest checkpoint."""
  from rewarddance_jax import checkpoint  # pylint: disable=import-outside-toplevel
  with checkpoint.Checkpointer(os.path.join(work, 'checkpoints'), async_save=False) as ckpt:
    params = ckpt.read_item(ckpt.latest_step(), 'params')
  import jax  # pylint: disable=import-outside-toplevel
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(params)]


def checkpoints_finite(work: str) -> bool:
  from rewarddance_jax import checkpoint  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  with checkpoint.Checkpointer(os.path.join(work, 'checkpoints'), async_save=False) as ckpt:
    for step in ckpt.all_steps():
      for item in ('params', 'opt_state'):
        leaves = jax.tree.leaves(ckpt.read_item(step, item))
        if not all(np.isfinite(np.asarray(x)).all() for x in leaves
                   if np.issubdtype(np.asarray(x).dtype, np.inexact)):
          return False
  return True


def result(work: str) -> dict:
  return {'metrics': metrics(work), 'params': final_params(work)}


def snapshot(work: str) -> dict:
  """{path: (size, mtime)} of every file under `work/checkpoints`: proves a run left them alone."""
  out = {}
  for path in glob.glob(os.path.join(work, 'checkpoints', '**'), recursive=True):
    if os.path.isfile(path):
      st = os.stat(path)
      out[path] = (st.st_size, st.st_mtime_ns)
  return out


def no_lock(work: str) -> bool:
  return not os.path.exists(os.path.join(work, 'run.lock'))


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 240):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None or time.time() - t0 > timeout:
      raise RuntimeError('the run ended (or hung) before the fault could be injected')
    time.sleep(0.05)


def logged_step(work: str, step: int) -> Callable[[], bool]:
  def seen():
    try:
      return step in metrics(work)
    except (OSError, ValueError):
      return False
  return seen


def cmd(*args) -> str:
  return 'python -m ' + ' '.join(a if ' ' not in a else repr(a) for a in args)


# ---------------------------------------------------------------------------------------------
# Cases: each returns a Row. `R` is the Runner.

CASES: dict[str, Callable[[Runner], Row]] = {}


def case(fn):
  CASES[fn.__name__] = fn
  return fn


def _refused_train(r: Runner, name: str, what: str, *overrides, config: str | None = None,
                   expected: int = 2) -> Row:
  """A train command that must fail on a fresh workdir, writing no checkpoint, no lock."""
  work = r.dir(name)
  args = list(TRAIN) + list(overrides) + [f'--workdir={work}']
  if config is not None:
    args[1] = f'--config={config}'
  status, out = r.run(*args)
  ok = not checkpoint_steps(work) and no_lock(work)
  return Row(name, what, cmd(*args[:1], *args[1:2], *overrides, '--workdir=W'), status,
             last_line(out), expected, 'no checkpoint written, no lock left', ok)


@case
def unknown_config_key(r):
  return _refused_train(r, 'unknown_config_key', 'misspelt config key', '--config.optax.lrr=1')


@case
def bad_config_arg(r):
  return _refused_train(r, 'bad_config_arg', 'unknown config-file argument',
                        config='configs/digits/flow.py:runlocl')


@case
def missing_config_file(r):
  return _refused_train(r, 'missing_config_file', 'config file that does not exist',
                        config='configs/digits/nope.py')


@case
def config_value_type(r):
  return _refused_train(r, 'config_value_type', 'config value of the wrong type',
                        '--config.total_steps=abc')


@case
def negative_lr(r):
  return _refused_train(r, 'negative_lr', 'negative learning rate', '--config.optax.lr=-1')


@case
def negative_total_steps(r):
  return _refused_train(r, 'negative_total_steps', 'total_steps < 1', '--config.total_steps=-5')


@case
def ckpt_every_zero(r):
  return _refused_train(r, 'ckpt_every_zero', 'checkpoint cadence 0', '--config.ckpt.every=0')


@case
def log_every_zero(r):
  return _refused_train(r, 'log_every_zero', 'log cadence 0', '--config.log_every=0')


@case
def keep_zero(r):
  return _refused_train(r, 'keep_zero', 'keep no checkpoint', '--config.ckpt.keep=0')


@case
def zero_batch(r):
  return _refused_train(r, 'zero_batch', 'batch size 0', '--config.data.batch_size=0')


@case
def unknown_trainer(r):
  return _refused_train(r, 'unknown_trainer', 'trainer name that does not exist',
                        '--config.trainer=flw')


@case
def extra_argument(r):
  return _refused_train(r, 'extra_argument', 'stray positional argument', 'stray')


def _non_finite(r: Runner, name: str, what: str, override: str) -> Row:
  work = r.dir(name)
  args = TRAIN + [override, '--config.max_nonfinite=3', f'--workdir={work}']
  status, out = r.run(*args)
  ok = checkpoints_finite(work) and no_lock(work)
  return Row(name, what, cmd(*TRAIN[:2], override, '--config.max_nonfinite=3', '--workdir=W'),
             status, last_line(out), 2, 'every checkpoint left holds only finite values', ok)


@case
def nan_lr(r):
  return _non_finite(r, 'nan_lr', 'learning rate NaN', '--config.optax.lr=nan')


@case
def huge_lr(r):
  return _non_finite(r, 'huge_lr', 'learning rate 1e30', '--config.optax.lr=1e30')


@case
def adam_eps_zero(r):
  return _non_finite(r, 'adam_eps_zero', 'Adam eps 0 (finite grads, NaN params)',
                     '--config.optax.eps=0.0')


@case
def nan_flow_shift(r):
  return _non_finite(r, 'nan_flow_shift', 'NaN in the model input (flow.shift)',
                     '--config.flow.shift=nan')


def _resume_changed(r: Runner, name: str, what: str, changes: list[str], expected: int) -> Row:
  work = r.dir(name)
  status, out = r.run(*TRAIN, '--config.total_steps=4', f'--workdir={work}')
  if status:
    raise RuntimeError(f'{name}: first run failed: {last_line(out)}')
  before = snapshot(work)
  status, out = r.run(*TRAIN, *changes, f'--workdir={work}')
  if expected:
    ok, check = snapshot(work) == before and no_lock(work), 'checkpoints untouched'
  else:
    lines = [json.loads(l) for l in open(os.path.join(work, 'metrics.jsonl'), encoding='utf-8')]
    ok = checkpoint_steps(work)[-1] == 6 and any('config_changes' in l for l in lines)
    check = 'resumed to step 6; the change recorded as a config_changes metrics line'
  return Row(name, what, cmd(*TRAIN[:2], *changes, '--workdir=W') + ' (after 4 steps)', status,
             last_line(out), expected, check, ok)


@case
def resume_changed_lr(r):
  return _resume_changed(r, 'resume_changed_lr', 'resume with another optax.lr',
                         ['--config.optax.lr=5e-3'], 2)


@case
def resume_changed_batch(r):
  return _resume_changed(r, 'resume_changed_batch', 'resume with another data.batch_size',
                         ['--config.data.batch_size=32'], 2)


@case
def resume_with_changes(r):
  return _resume_changed(r, 'resume_with_changes', 'the same, accepted by the flag',
                         ['--config.optax.lr=5e-3', '--config.resume_with_changes=True'], 0)


def _resumed_exact(r: Runner, name: str, what: str, command: str, status: int, out: str,
                   expected: int, work: str, extra_check: tuple[bool, str] = (True, '')) -> Row:
  """Reruns the plain command on `work` and compares with the reference."""
  rerun_status, rerun_out = r.run(*TRAIN, f'--workdir={work}')
  same, check = r.same_as_reference(work) if rerun_status == 0 else (
      False, f'the rerun failed: {last_line(rerun_out)}')
  ok = same and extra_check[0] and no_lock(work)
  check = '; '.join(c for c in (extra_check[1], 'rerun: ' + check) if c)
  return Row(name, what, command, status, last_line(out), expected, check, ok)


@case
def resume_more_steps(r):
  work = r.dir('resume_more_steps')
  status, out = r.run(*TRAIN, '--config.total_steps=4', f'--workdir={work}')
  return _resumed_exact(r, 'resume_more_steps', 'stop at 4, then resume to 6 (loop-only key)',
                        cmd(*TRAIN[:2], '--config.total_steps=4', '--workdir=W') + '; rerun to 6',
                        status, out, 0, work)


@case
def kill_9(r):
  work = r.dir('kill_9')
  proc = r.popen(*TRAIN, f'--workdir={work}')
  wait_for(logged_step(work, 3), proc)
  proc.kill()
  out, _ = proc.communicate()
  return _resumed_exact(r, 'kill_9', 'kill -9 after step 3', cmd(*TRAIN[:2], '--workdir=W') +
                        '; kill -9 after step 3', proc.returncode, out, -9, work)


@case
def kill_9_before_first_checkpoint(r):
  work = r.dir('kill_9_before_first_checkpoint')
  args = TRAIN + ['--config.ckpt.every=100', f'--workdir={work}']
  proc = r.popen(*args)
  wait_for(logged_step(work, 2), proc)
  proc.kill()
  out, _ = proc.communicate()
  lines = len(metrics(work))
  rerun_status, rerun_out = r.run(*args)
  same, check = r.same_as_reference(work) if rerun_status == 0 else (False, last_line(rerun_out))
  # With ckpt.every=100 only the last step is saved; its params are the reference's step 6.
  return Row('kill_9_before_first_checkpoint', 'kill -9 before the first checkpoint',
             cmd(*TRAIN[:2], '--config.ckpt.every=100', '--workdir=W') + '; kill -9 after step 2',
             proc.returncode, last_line(out), -9,
             f'{lines} lines before the kill; rerun: ' + check, same and lines >= 2)


@case
def sigterm(r):
  work = r.dir('sigterm')
  proc = r.popen(*TRAIN, f'--workdir={work}')
  wait_for(logged_step(work, 2), proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate()
  saved = checkpoint_steps(work)
  return _resumed_exact(r, 'sigterm', 'SIGTERM (preemption) after step 2',
                        cmd(*TRAIN[:2], '--workdir=W') + '; kill -TERM after step 2',
                        proc.returncode, out, 143, work,
                        (bool(saved), f'checkpoints after SIGTERM: {saved}'))


@case
def kill_during_save(r):
  work = r.dir('kill_during_save')
  hook = os.path.join(r.root, 'kill_at_save')
  os.makedirs(hook, exist_ok=True)
  with open(os.path.join(hook, 'sitecustomize.py'), 'w', encoding='utf-8') as f:
    f.write(_KILL_AT_SAVE)
  env = {'PYTHONPATH': hook + os.pathsep + r.env['PYTHONPATH'], 'FAULT_KILL_AT_SAVE': '4'}
  status, out = r.run(*TRAIN, f'--workdir={work}', env_extra=env)
  saved = checkpoint_steps(work)
  return _resumed_exact(r, 'kill_during_save', 'kill -9 in the middle of the step-4 save',
                        cmd(*TRAIN[:2], '--workdir=W') + '; SIGKILL while Orbax commits step 4',
                        status, out, -9, work, (saved == [2], f'checkpoints after the kill: {saved}'))


def _corrupt(r: Runner, name: str, what: str, damage: Callable[[str], None]) -> Row:
  work = r.dir(name)
  status, out = r.run(*TRAIN, '--config.total_steps=4', f'--workdir={work}')
  if status:
    raise RuntimeError(f'{name}: first run failed: {last_line(out)}')
  damage(os.path.join(work, 'checkpoints', '4'))
  status, out = r.run(*TRAIN, f'--workdir={work}')
  kept = os.path.isdir(os.path.join(work, 'checkpoints_corrupt', '4'))
  warned = [l for l in out.splitlines() if 'checkpoints/4' in l and 'moved it to' in l]
  same, check = r.same_as_reference(work) if status == 0 else (False, 'the resume failed')
  return Row(name, what, cmd(*TRAIN[:2], '--workdir=W') + ' (resume; newest checkpoint 4 damaged)',
             status, last_line(warned[0] if warned else out), 0,
             'the corrupt step kept in checkpoints_corrupt/4, resumed from 2; ' + check,
             kept and len(warned) == 1 and same)


def _truncate_largest(step_dir):
  files = glob.glob(os.path.join(step_dir, 'params', 'ocdbt.process_0', 'd', '*'))
  biggest = max(files, key=os.path.getsize)
  os.truncate(biggest, 100)


def _garble(path):
  def damage(step_dir):
    with open(os.path.join(step_dir, path), 'w', encoding='utf-8') as f:
      f.write('garbage{')
  return damage


@case
def corrupt_truncated_data(r):
  return _corrupt(r, 'corrupt_truncated_data', 'newest checkpoint: truncated array data file',
                  _truncate_largest)


@case
def corrupt_no_commit_marker(r):
  return _corrupt(r, 'corrupt_no_commit_marker', 'newest checkpoint: commit marker missing',
                  lambda d: os.remove(os.path.join(d, 'commit_success.txt')))


@case
def corrupt_metadata(r):
  return _corrupt(r, 'corrupt_metadata', 'newest checkpoint: garbled params/_METADATA',
                  _garble('params/_METADATA'))


@case
def corrupt_json_item(r):
  return _corrupt(r, 'corrupt_json_item', 'newest checkpoint: garbled data_iter json',
                  _garble('data_iter/metadata'))


@case
def corrupt_config_item(r):
  return _corrupt(r, 'corrupt_config_item', 'newest checkpoint: garbled saved config',
                  _garble('config/metadata'))


@case
def second_run_same_workdir(r):
  work = r.dir('second_run_same_workdir')
  first = r.popen(*TRAIN, f'--workdir={work}')
  wait_for(lambda: os.path.exists(os.path.join(work, 'run.lock')), first)
  status, out = r.run(*TRAIN, f'--workdir={work}')
  first_out, _ = first.communicate()
  same, check = r.same_as_reference(work) if first.returncode == 0 else (
      False, f'the first run failed: {last_line(first_out)}')
  return Row('second_run_same_workdir', 'a second run on a workdir in use',
             cmd(*TRAIN[:2], '--workdir=W') + ' (twice at once)', status, last_line(out), 2,
             'the first run: ' + check, same and no_lock(work))


@case
def stale_lock(r):
  work = r.dir('stale_lock')
  os.makedirs(work)
  dead = subprocess.Popen(['true'])
  dead.wait()
  with open(os.path.join(work, 'run.lock'), 'w', encoding='utf-8') as f:
    json.dump({'host': os.uname().nodename, 'pid': dead.pid, 'since': 'earlier'}, f)
  status, out = r.run(*TRAIN, f'--workdir={work}')
  warned = [l for l in out.splitlines() if 'stale lock' in l]
  same, check = r.same_as_reference(work) if status == 0 else (False, 'the run failed')
  return Row('stale_lock', 'a lock left by a dead run (pid gone)',
             cmd(*TRAIN[:2], '--workdir=W') + ' (W/run.lock names a dead pid)', status,
             last_line(warned[0] if warned else out), 0, 'taken over with a warning; ' + check,
             bool(warned) and same and no_lock(work))


@case
def lock_held_by_live_pid(r):
  work = r.dir('lock_held_by_live_pid')
  os.makedirs(work)
  with open(os.path.join(work, 'run.lock'), 'w', encoding='utf-8') as f:
    json.dump({'host': os.uname().nodename, 'pid': os.getpid(), 'since': 'now'}, f)
  status, out = r.run(*TRAIN, f'--workdir={work}')
  ok = not checkpoint_steps(work) and os.path.exists(os.path.join(work, 'run.lock'))
  return Row('lock_held_by_live_pid', 'workdir locked by a live process',
             cmd(*TRAIN[:2], '--workdir=W') + ' (W/run.lock names a live pid)', status,
             last_line(out), 2, "nothing written, the holder's lock kept", ok)


@case
def read_only_workdir(r):
  work = r.dir('read_only_workdir')
  status, out = r.run(*TRAIN, '--config.total_steps=2', f'--workdir={work}')
  if status:
    raise RuntimeError(f'read_only_workdir: first run failed: {last_line(out)}')
  before = snapshot(work)
  protect = ['chattr', '+i', work] if os.geteuid() == 0 else ['chmod', 'a-w', work]
  subprocess.run(protect, check=True)
  try:
    status, out = r.run(*TRAIN, f'--workdir={work}')
  finally:
    subprocess.run(['chattr', '-i', work] if os.geteuid() == 0 else ['chmod', 'u+w', work],
                   check=True)
  return Row('read_only_workdir', 'resume in a workdir that is not writable',
             cmd(*TRAIN[:2], '--workdir=W') + f' (after `{" ".join(protect[:2])} W`)', status,
             last_line(out), 2, 'checkpoints untouched', snapshot(work) == before)


@case
def workdir_is_a_file(r):
  path = r.dir('workdir_is_a_file')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('not a directory')
  status, out = r.run(*TRAIN, f'--workdir={path}')
  return Row('workdir_is_a_file', '--workdir names a file', cmd(*TRAIN[:2], '--workdir=FILE'),
             status, last_line(out), 2, 'the file unchanged',
             open(path, encoding='utf-8').read() == 'not a directory')


def _flow_run(r: Runner) -> str:
  """A finished 2-step run to sample from (made once)."""
  work = os.path.join(r.root, 'flow_run')
  if not checkpoint_steps(work):
    shutil.rmtree(work, ignore_errors=True)
    status, out = r.run(*TRAIN, '--config.total_steps=2', f'--workdir={work}')
    if status:
      raise RuntimeError(f'flow run failed: {last_line(out)}')
  return work


def _simple(r: Runner, name: str, what: str, args: list[str], shown: str, expected: int = 2,
            check: tuple[str, Callable[[], bool]] = ('nothing written', lambda: True)) -> Row:
  status, out = r.run(*args)
  return Row(name, what, shown, status, last_line(out), expected, check[0], check[1]())


@case
def sample_not_a_run(r):
  d = r.dir('sample_not_a_run')
  os.makedirs(d)
  return _simple(r, 'sample_not_a_run', 'launch.sample on a folder that is no run',
                 ['launch.sample', f'--workdir={d}'], 'python -m launch.sample --workdir=EMPTY_DIR',
                 check=('nothing written', lambda: os.listdir(d) == []))


@case
def sample_missing_step(r):
  work = _flow_run(r)
  return _simple(r, 'sample_missing_step', 'launch.sample of a step that was not saved',
                 ['launch.sample', f'--workdir={work}', '--step=99'],
                 'python -m launch.sample --workdir=RUN --step=99',
                 check=('no samples written', lambda: not os.path.exists(f'{work}/samples')))


@case
def convert_missing_source(r):
  return _simple(r, 'convert_missing_source', 'launch.convert of a folder that does not exist',
                 ['launch.convert', '--family=flux', '--src=/nonexistent/flux'],
                 'python -m launch.convert --family=flux --src=/nonexistent/flux')


@case
def convert_broken_config_json(r):
  d = r.dir('convert_broken_config_json')
  os.makedirs(d)
  with open(os.path.join(d, 'config.json'), 'w', encoding='utf-8') as f:
    f.write('{"num_layers": 2,')
  return _simple(r, 'convert_broken_config_json', 'launch.convert: a broken config.json',
                 ['launch.convert', '--family=flux', f'--src={d}'],
                 'python -m launch.convert --family=flux --src=DIR (config.json cut short)')


@case
def convert_no_flags(r):
  return _simple(r, 'convert_no_flags', 'launch.convert without --family', ['launch.convert'],
                 'python -m launch.convert')


@case
def encode_prompts_missing_pipeline(r):
  return _simple(r, 'encode_prompts_missing_pipeline', 'launch.encode_prompts, no such pipeline',
                 ['launch.encode_prompts', '--pipeline=/nonexistent', '--prompts=p.jsonl',
                  f'--out={r.root}/enc'],
                 'python -m launch.encode_prompts --pipeline=/nonexistent --prompts=p.jsonl '
                 '--out=OUT', check=('nothing written', lambda: not os.path.exists(f'{r.root}/enc')))


def _reward(r: Runner) -> str:
  """A VLM reward saved by a 2-step reward run (made once)."""
  work = os.path.join(r.root, 'vlm_run')
  saved = os.path.join(work, 'reward_model')
  if not os.path.isdir(saved):
    shutil.rmtree(work, ignore_errors=True)
    status, out = r.run('launch.train', '--config=configs/digits/reward_vlm.py:runlocal,steps=2',
                        '--config.mesh.num_devices=1', f'--workdir={work}')
    if status:
      raise RuntimeError(f'reward run failed: {last_line(out)}')
  return saved


def _samples(r: Runner) -> str:
  path = os.path.join(r.root, 'samples.npz')
  if not os.path.exists(path):
    from rewarddance_jax.data import samples  # pylint: disable=import-outside-toplevel
    images = np.zeros((2, 16, 16, 1), np.float32)
    samples.save_samples(path, images=images, labels=np.array([1, 2]),
                         prompts=np.array(['a handwritten digit one', 'a handwritten digit two']))
  return path


def _score_damaged(r: Runner, name: str, what: str, damage: Callable[[str], None]) -> Row:
  d = r.dir(name)
  shutil.copytree(_reward(r), d)
  damage(d)
  return _simple(r, name, what, ['launch.score', f'--reward={d}', f'--images={_samples(r)}',
                                 f'--out={d}.csv'],
                 f'python -m launch.score --reward=RM --images=S.npz ({what})',
                 check=('no scores written', lambda: not os.path.exists(f'{d}.csv')))


def _edit_params(edit: Callable[[dict], None]):
  def damage(d):
    from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
    path = os.path.join(d, 'params.safetensors')
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
  return damage


@case
def score_missing_tensor(r):
  def drop(t):
    del t[sorted(t)[0]]
  return _score_damaged(r, 'score_missing_tensor', 'a tensor missing from params.safetensors',
                        _edit_params(drop))


@case
def score_misshaped_tensor(r):
  def reshape(t):
    key = sorted(t)[0]
    t[key] = np.zeros(t[key].shape + (2,), t[key].dtype)
  return _score_damaged(r, 'score_misshaped_tensor', 'a mis-shaped tensor in params.safetensors',
                        _edit_params(reshape))


@case
def score_garbled_safetensors(r):
  def garble(d):
    with open(os.path.join(d, 'params.safetensors'), 'r+b') as f:
      f.write(b'\xff' * 16)
  return _score_damaged(r, 'score_garbled_safetensors', 'a garbled safetensors header', garble)


@case
def score_broken_vlm_json(r):
  def garble(d):
    with open(os.path.join(d, 'vlm.json'), 'w', encoding='utf-8') as f:
      f.write('{"vlm": ')
  return _score_damaged(r, 'score_broken_vlm_json', 'a broken vlm.json', garble)


@case
def score_pickle_only(r):
  def pickle_only(d):
    os.remove(os.path.join(d, 'params.safetensors'))
    with open(os.path.join(d, 'params.bin'), 'wb') as f:
      f.write(b'\x80\x04not read')
  return _score_damaged(r, 'score_pickle_only', 'params only as a pickle (.bin)', pickle_only)


@case
def evaluate_missing_samples(r):
  return _simple(r, 'evaluate_missing_samples', 'launch.evaluate of a missing file',
                 ['launch.evaluate', '--samples=/nonexistent/s.npz'],
                 'python -m launch.evaluate --samples=/nonexistent/s.npz')


@case
def evaluate_not_npz(r):
  path = os.path.join(r.root, 'not.npz')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('text, not a zip')
  return _simple(r, 'evaluate_not_npz', 'launch.evaluate of a file that is no npz',
                 ['launch.evaluate', f'--samples={path}'], 'python -m launch.evaluate --samples=TEXT.npz')


@case
def summarize_missing_run(r):
  return _simple(r, 'summarize_missing_run', 'launch.summarize of a folder without results',
                 ['launch.summarize', '--runs=/nonexistent/run'],
                 'python -m launch.summarize --runs=/nonexistent/run')


@case
def scan_bad_topology(r):
  return _simple(r, 'scan_bad_topology', 'launch.scan_sharding for an unknown TPU',
                 ['launch.scan_sharding', f'--config={FLOW}', '--topology=v9x:2x2'],
                 f'python -m launch.scan_sharding --config={FLOW} --topology=v9x:2x2')


@case
def traceback_flag(r):
  work = r.dir('traceback_flag')
  args = TRAIN + ['--config.optax.lr=-1', '--traceback', f'--workdir={work}']
  status, out = r.run(*args)
  shown = 'Traceback (most recent call last)' in out
  return Row('traceback_flag', 'a bad value with --traceback', cmd(*TRAIN[:2], '--config.optax.lr=-1',
                                                                    '--traceback', '--workdir=W'),
             status, last_line(out), 2, 'the traceback printed above the line; nothing written',
             shown and not checkpoint_steps(work))


# ---------------------------------------------------------------------------------------------

def run_cases(names, runner: Runner, log=print) -> list[Row]:
  rows = []
  for name in names:
    t0 = time.time()
    try:
      row = CASES[name](runner)
    except Exception as e:  # pylint: disable=broad-exception-caught  # a failed case is a row
      row = Row(name, name, '', -1, f'{type(e).__name__}: {e}', 0, 'the case itself failed',
                False)
    log(f'{"ok " if row.ok else "BAD"} {name} ({time.time() - t0:.0f} s): status {row.status}, '
        f'{row.last_line[:160]}')
    rows.append(row)
  return rows


def _cell(text: str) -> str:
  return text.replace('|', '\\|').replace('\n', ' ')


def table(rows: list[Row]) -> str:
  head = ('| # | case | command | last line printed | exit | nothing lost |\n'
          '| --- | --- | --- | --- | --- | --- |\n')
  body = ''.join(
      f'| {i} | {_cell(r.what)} | `{_cell(r.command)}` | `{_cell(r.last_line)}` | {r.status}'
      f'{"" if r.status == r.expected_status else f" (expected {r.expected_status})"} | '
      f'{"✓" if r.nothing_lost else "✗"} {_cell(r.lost_check)} |\n'
      for i, r in enumerate(rows, 1))
  return head + body


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', default='', help='comma-separated case names')
  parser.add_argument('--out', default=os.path.join(ROOT, 'docs', 'reliability.md'))
  parser.add_argument('--root', default=os.path.join(tempfile.gettempdir(), 'rdj_faults'))
  args = parser.parse_args()
  names = [n for n in args.only.split(',') if n] or list(CASES)
  t0 = time.time()
  rows = run_cases(names, Runner(args.root))
  for row in rows:   # the table names the case folders relative to --root
    row.last_line = row.last_line.replace(args.root, '<root>')
  with open(args.out, encoding='utf-8') as f:
    doc = f.read()
  start, end = '<!-- faults:begin -->\n', '<!-- faults:end -->'
  head, rest = doc.split(start)
  stamp = (f'{len(rows)} cases, {sum(r.ok for r in rows)} as expected; '
           f'{time.time() - t0:.0f} s on this machine, {time.strftime("%Y-%m-%d")}.\n\n')
  with open(args.out, 'w', encoding='utf-8') as f:
    f.write(head + start + stamp + table(rows) + end + rest.split(end, 1)[1])
  print(f'{sum(r.ok for r in rows)}/{len(rows)} cases as expected; wrote {args.out}')
  return 0 if all(r.ok for r in rows) else 1


if __name__ == '__main__':
  sys.exit(main())
