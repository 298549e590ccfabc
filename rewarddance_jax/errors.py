"""The exception family of bad input: what a user can fix, as opposed to a bug.

`InputError` marks an error whose message alone tells the user what to change (it names the
culprit: a config key, a file, a tensor, a checkpoint, a workdir). The launchers print such an
error as one line and exit with status 2 (`launch/cli.py`); every other exception keeps its
traceback. Plain `ValueError`s and `OSError`s raised by this library's own code count as bad
input too, so a subclass is needed only where the natural type would be a `RuntimeError`.
"""

from __future__ import annotations


class InputError(Exception):
  """Bad input the user can fix; the message names the culprit in one line."""
