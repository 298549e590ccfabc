"""The launchers as a user runs them: train → resume → sample → evaluate, and config errors."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures('child_jax_env')


def _run(*args, timeout=300):
  # The child inherits the `child_jax_env` fixture's environment (conftest.py; every test here).
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def _last_line(text):
  return [l for l in text.strip().splitlines() if l.strip()][-1]


def test_unknown_override_key_is_named():
  out = _run('launch.train', '--config=configs/digits/flow.py:runlocal',
             '--config.optax.lrr=1', '--workdir=/tmp/never_written')
  assert out.returncode != 0
  assert _last_line(out.stderr) == (
      "error: --config.optax.lrr=1: unknown config key 'lrr' (did you mean 'lr'?)")
  assert not os.path.exists('/tmp/never_written')


def test_bad_config_arg_and_missing_file():
  out = _run('launch.train', '--config=configs/digits/flow.py:runlocl', '--workdir=/tmp/nw')
  assert out.returncode != 0 and "unknown config arg 'runlocl'" in _last_line(out.stderr)
  out = _run('launch.train', '--config=configs/digits/nope.py', '--workdir=/tmp/nw')
  assert out.returncode != 0
  assert _last_line(out.stderr).startswith('error: --config=configs/digits/nope.py:')


def test_object_store_workdir_and_bad_distributed_flags_are_named():
  out = _run('launch.train', '--config=configs/digits/flow.py:runlocal', '--workdir=gs://b/run')
  assert out.returncode != 0 and _last_line(out.stderr).startswith('error: --workdir=gs://b/run:')
  out = _run('launch.train', '--config=configs/digits/flow.py:runlocal', '--workdir=/tmp/nw',
             '--coordinator=127.0.0.1:1', '--num_processes=2')
  assert out.returncode != 0
  assert _last_line(out.stderr) == ("error: with coordinator='127.0.0.1:1', num_processes=2 must "
                                    "be >= 1 and process_id=-1 in [0, num_processes).")
  assert not os.path.exists('/tmp/nw')


def test_train_resume_sample_evaluate(tmp_path):
  work = str(tmp_path / 'run')
  common = ['launch.train', '--config=configs/digits/flow.py:runlocal,steps=4',
            '--config.samples.every=4', f'--workdir={work}']
  out = _run(*common, '--config.total_steps=2')
  assert out.returncode == 0, out.stderr[-2000:]
  assert sorted(os.listdir(os.path.join(work, 'checkpoints'))) == ['2']
  out = _run(*common)   # resumes at 2, runs to 4
  assert out.returncode == 0, out.stderr[-2000:]
  steps = [json.loads(l)['step'] for l in open(os.path.join(work, 'metrics.jsonl'))
           if 'loss' in json.loads(l)]
  assert steps == [2, 4], steps   # log_every 5: the last step of each run is logged
  assert os.path.exists(os.path.join(work, 'samples', 'samples_4.png'))

  out = _run('launch.sample', f'--workdir={work}', '--per_class=1', '--kind=dance',
             '--noise_level=0.3', f'--out={tmp_path}/s')
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads(_last_line(out.stdout))
  assert report['step'] == 4 and report['n'] == 10 and 0.0 <= report['judge_accuracy'] <= 1.0
  out = _run('launch.evaluate', f'--samples={report["samples"]}')
  assert out.returncode == 0, out.stderr[-2000:]


def test_sample_rejects_a_non_run_directory(tmp_path):
  out = _run('launch.sample', f'--workdir={tmp_path}')
  assert out.returncode != 0
  assert 'no checkpoints/ directory' in out.stderr


if __name__ == '__main__':
  sys.exit(pytest.main([__file__]))
