"""bench/faults.py, the table of docs/reliability.md: a few of its rows, and the resume faults
through the real launcher (kill during a save, SIGTERM; the slow ones: kill -9, two runs at once,
a stale lock, a corrupt newest checkpoint)."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _faults():
  spec = importlib.util.spec_from_file_location('faults', os.path.join(ROOT, 'bench', 'faults.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules['faults'] = module
  spec.loader.exec_module(module)
  return module


faults = _faults()


@pytest.fixture(scope='module')
def runner(tmp_path_factory):
  # Module-scoped: the uninterrupted reference run is made once for all the resume cases; the
  # children get their compile options from the environment, as under `child_jax_env`.
  from conftest import child_env  # pylint: disable=import-outside-toplevel
  return faults.Runner(str(tmp_path_factory.mktemp('faults')), env={**os.environ, **child_env()})


def _check(runner, *names):
  rows = faults.run_cases(names, runner, log=lambda line: None)
  for row in rows:
    assert row.ok, row
    assert row.expected_status not in (0, -9) or row.status == row.expected_status
    if row.expected_status == 2:
      assert row.last_line.startswith('error: ') and len(row.last_line) < 400, row
  return rows


def test_bad_inputs_are_one_line_and_status_2(runner):
  rows = _check(runner, 'unknown_config_key', 'lock_held_by_live_pid', 'sample_not_a_run',
                'convert_broken_config_json')
  assert 'run.lock' in rows[1].last_line and f'pid {os.getpid()}' in rows[1].last_line
  assert 'config.json' in rows[3].last_line
  assert '| 4 |' in faults.table(rows)


@pytest.mark.slow  # 68 s of CLI runs; tests/test_resume_faults.py covers the resumes in process
def test_kill_during_a_save_and_sigterm_resume_exactly(runner):
  rows = _check(runner, 'kill_during_save', 'sigterm')
  assert rows[0].status == -9 and rows[1].status == 143
  assert 'SIGTERM' in rows[1].last_line


@pytest.mark.slow
def test_kill_9_two_runs_stale_lock_and_corrupt_checkpoint(runner):
  _check(runner, 'kill_9', 'kill_9_before_first_checkpoint', 'second_run_same_workdir',
         'stale_lock', 'corrupt_truncated_data')
