"""Quieter logs for launchers: library chatter (Orbax, JAX internals) only at WARNING and above.

Orbax logs every rename and thread hand-off at INFO; at pod scale that buries the trainer's own
lines. `quiet_libraries()` adds a filter to the absl handler that drops INFO records emitted from
those packages; `--verbosity=1` (absl) turns everything back on.
"""

from __future__ import annotations

import logging as py_logging

from absl import logging

_NOISY = ('/orbax/', '/jax/_src/', '/grain/', '/tensorstore/')


class _LibraryFilter(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING or logging.get_verbosity() >= 1:
      return True
    return not any(part in record.pathname for part in _NOISY)


def quiet_libraries() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryFilter) for f in handler.filters):
    handler.addFilter(_LibraryFilter())
