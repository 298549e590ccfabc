"""The launchers' error boundary: which errors are bad input (one line, status 2)."""

import errno
import signal

import numpy as np
import pytest
from absl import app

from launch import cli
from rewarddance_jax import checkpoint
from rewarddance_jax.errors import InputError
from rewarddance_jax.weights import json_file


def _raised(fn):
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-exception-caught
    return e
  raise AssertionError('did not raise')


def test_own_value_errors_and_named_files_are_bad_input_library_errors_are_not(tmp_path):
  bad = tmp_path / 'config.json'
  bad.write_text('{"a": ')
  own = _raised(lambda: json_file.read(str(bad)))
  assert cli.bad_input_message(own).startswith(f'{bad}: not valid JSON')
  missing = _raised(lambda: open(tmp_path / 'nope.txt', encoding='utf-8'))
  assert cli.bad_input_message(missing) == f'{tmp_path / "nope.txt"}: No such file or directory'
  corrupt = checkpoint.CheckpointError('checkpoint /x/4 is partial\nsecond line')
  assert cli.bad_input_message(corrupt) == 'checkpoint /x/4 is partial'
  assert cli.bad_input_message(app.UsageError('--x is required')) == '--x is required'
  # A ValueError raised inside NumPy, a TypeError or an OSError without a file: bugs, traceback.
  assert cli.bad_input_message(_raised(lambda: np.ones(2) + np.ones(3))) is None
  assert cli.bad_input_message(_raised(lambda: len(5))) is None
  assert cli.bad_input_message(OSError(errno.EIO, 'I/O error')) is None


def test_run_prints_one_line_and_exits_2(capsys):
  def main(argv):
    del argv
    raise InputError('config.x=3 must be even.')
  with pytest.raises(SystemExit) as e:
    cli._guard(main)(['prog'])   # pylint: disable=protected-access
  assert e.value.code == cli.BAD_INPUT == 2
  assert capsys.readouterr().err == 'error: config.x=3 must be even.\n'
  assert signal.getsignal(signal.SIGTERM) is not cli._raise_terminated  # pylint: disable=protected-access
  with pytest.raises(SystemExit) as e:
    cli._guard(lambda argv: (_ for _ in ()).throw(cli.Terminated('stopped')))(['prog'])  # pylint: disable=protected-access
  assert e.value.code == cli.SIGTERM_EXIT == 143
  with pytest.raises(ZeroDivisionError):   # unexpected: re-raised for its traceback
    cli._guard(lambda argv: 1 / 0)(['prog'])  # pylint: disable=protected-access
