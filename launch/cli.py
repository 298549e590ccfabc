"""The launchers' one error boundary: bad input is one line on stderr and exit status 2.

`run(main)` parses the flags with `config_lib.parse_config_flags` (one line, status 2, for a bad
flag or config key) and runs the absl `main`, mapping what escapes it:
  1. bad input, `error: <message>` on stderr and status 2: an `errors.InputError` anywhere, an
     `OSError` that names its file anywhere, an `app.UsageError`, and a `ValueError`,
     `LookupError` or `OSError` raised by this repository's own code (a ValueError from inside
     NumPy or JAX is a bug here, not the user's input);
  2. SIGTERM outside the training loop (which saves first, see train/loop.py) raises
     `Terminated`: its one line and status 143 (128 + SIGTERM), so a scheduler requeues the job;
  3. anything else keeps its traceback (status 1). `--traceback` prints it for 1 and 2 as well.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

from absl import app, flags

from rewarddance_jax.config_lib import parse_config_flags
from rewarddance_jax.errors import InputError

_TRACEBACK = flags.DEFINE_boolean('traceback', False,
                                  'Print the traceback of a bad-input error too.')

BAD_INPUT = 2
SIGTERM_EXIT = 128 + signal.SIGTERM
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_CODE = tuple(os.path.join(_ROOT, d) + os.sep for d in ('rewarddance_jax', 'launch', 'configs'))


class Terminated(Exception):
  """The run stopped for SIGTERM; the message says what was saved."""


def _raise_terminated(signum, frame):
  del signum, frame
  raise Terminated('stopped by SIGTERM before the training loop ran; nothing to save.')


def _raised_by_own_code(error: BaseException) -> bool:
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OWN_CODE)


def bad_input_message(error: BaseException) -> str | None:
  """The one line to print for `error` when it is bad input (module docstring, 1), else None."""
  if isinstance(error, OSError) and error.filename and error.strerror:
    text = f'{error.filename}: {error.strerror}'
  elif isinstance(error, (InputError, app.UsageError)) or (
      isinstance(error, (ValueError, LookupError, OSError)) and _raised_by_own_code(error)):
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  else:
    return None
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def _guard(main):
  def guarded(argv):
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
      main(argv)
    except Terminated as e:
      print(f'error: {e}', file=sys.stderr, flush=True)
      sys.exit(SIGTERM_EXIT)
    except Exception as e:  # pylint: disable=broad-exception-caught  # re-raised unless bad input
      message = bad_input_message(e)
      if message is None:
        raise
      if _TRACEBACK.value:
        traceback.print_exc()
      print(f'error: {message}', file=sys.stderr, flush=True)
      sys.exit(BAD_INPUT)
    finally:
      signal.signal(signal.SIGTERM, previous)
  return guarded


def run(main) -> None:
  """`app.run(main)` inside the boundary (module docstring)."""
  app.run(_guard(main), flags_parser=parse_config_flags)
