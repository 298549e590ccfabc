"""Helpers for config files: typed mini-arguments and validation.

A config file is `get_config(arg=None) -> ml_collections.ConfigDict`; `arg` is the text after the
colon in `--config=configs/digits/flow.py:runlocal,steps=200`. `parse_arg` turns it into typed
fields with defaults (big_vision's convention):
  1. split on commas; `name=value` sets a field, a bare `name` sets a bool field to True;
  2. each value is converted to the type of its default (bool accepts true/false/1/0/yes/no);
  3. a name without a default is an error that names it.
"""

from __future__ import annotations

import re
import sys

import ml_collections
from absl import flags


def _convert(name: str, value: str, default):
  if isinstance(default, bool):
    low = value.lower()
    if low in ('1', 'true', 'yes', ''):
      return True
    if low in ('0', 'false', 'no'):
      return False
    raise ValueError(f'config arg {name}={value!r} is not a boolean.')
  if default is None:
    return value
  try:
    return type(default)(value)
  except ValueError as e:
    raise ValueError(f'config arg {name}={value!r} is not a {type(default).__name__}.') from e


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'runlocal,steps=200' with defaults(runlocal=False, steps=3000) → typed ConfigDict."""
  out = dict(defaults)
  for part in (arg or '').split(','):
    part = part.strip()
    if not part:
      continue
    name, _, value = part.partition('=')
    if name not in defaults:
      raise ValueError(f'unknown config arg {name!r}; known: {sorted(defaults)}.')
    out[name] = _convert(name, value if '=' in part else 'true', defaults[name])
  return ml_collections.ConfigDict(out)


def check_keys(section, allowed, where: str) -> None:
  """Raises naming any key of `section` that is not in `allowed`."""
  unknown = sorted(set(section.keys()) - set(allowed))
  if unknown:
    raise ValueError(f'{where} has unknown key(s) {unknown}; allowed: {sorted(allowed)}.')


def parse_config_flags(argv):
  """absl `flags_parser` for the launchers: one-line errors, no usage dump, exit status 2.

  An unknown `--config.a.b=v` key names the argument and ml_collections' suggestion; any other
  flag error keeps its first and last line (the file and the cause).
  """
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    text = str(e)
    key = re.search(r"(\w+)", text)
    key = key.group(1) if key else text
    hint = re.search(r'Did you mean \\?"(\w+)', text)
    culprit = next((a for a in argv if a.startswith('--config.') and key in a), key)
    _exit_bad_flag(f'{culprit}: unknown config key {key!r}'
                   + (f' (did you mean {hint.group(1)!r}?)' if hint else '.'))
  except OSError as e:  # a config file that fails to load, met while applying an override
    while e.__cause__ is not None or e.__context__ is not None:
      e = e.__cause__ or e.__context__
    config = next((a for a in argv if a.startswith('--config=')), '--config')
    _exit_bad_flag(f'{config}: {[l.strip() for l in str(e).splitlines() if l.strip()][-1]}')
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _exit_bad_flag(f'{lines[0]} {lines[-1] if len(lines) > 1 else ""}'.strip())


def _exit_bad_flag(message: str):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)

