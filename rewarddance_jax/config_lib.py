"""Helpers for config files: typed mini-arguments and validation.

A config file is `get_config(arg=None) -> ml_collections.ConfigDict`; `arg` is the text after the
colon in `--config=configs/digits/flow.py:runlocal,steps=200`. `parse_arg` turns it into typed
fields with defaults (big_vision's convention):
  1. split on commas; `name=value` sets a field, a bare `name` sets a bool field to True;
  2. each value is converted to the type of its default (bool accepts true/false/1/0/yes/no);
  3. a name without a default is an error that names it.

`section(cls, cfg, where)` turns a config section into a frozen dataclass: unknown keys, values
of the wrong type and numbers outside the interval the dataclass declares in its `RANGES` class
attribute (e.g. `RANGES = {'lr': '[0, inf)', 'b1': '[0, 1)'}`) are one-line errors naming
`where.key`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing

import ml_collections
import numpy as np
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


def _interval(spec: str) -> tuple[float, float, bool, bool]:
  """'[lo, hi)' → (lo, hi, lo_closed, hi_closed); 'inf' and '-inf' are allowed as bounds."""
  m = re.fullmatch(r'\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*', spec)
  if not m:
    raise ValueError(f'range {spec!r} is not an interval such as "[0, 1)".')
  return float(m.group(2)), float(m.group(3)), m.group(1) == '[', m.group(4) == ']'


def _numeric_kind(hint) -> type | None:
  """int or float for a field typed int, float or `X | None` of them; else None."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    kinds = {a for a in typing.get_args(hint) if a is not type(None)}
    return next(iter(kinds)) if len(kinds) == 1 and kinds <= {int, float} else None
  return hint if hint in (int, float) else None


def check_number(value, kind: type, spec: str | None, name: str):
  """`value` as `kind` (int or float), or a one-line error naming `name=value` and the range."""
  want = 'an integer' if kind is int else 'a number'
  ok = not isinstance(value, bool) and isinstance(
      value, (int, np.integer) if kind is int else (int, float, np.integer, np.floating))
  if ok and spec is not None:
    lo, hi, lo_closed, hi_closed = _interval(spec)
    v = float(value)
    ok = (lo <= v if lo_closed else lo < v) and (v <= hi if hi_closed else v < hi)
  if not ok:
    raise ValueError(f'{name}={value!r} must be {want}' + (f' in {spec}.' if spec else '.'))
  return kind(value)


def section(cls, cfg, where: str, **given):
  """The frozen dataclass `cls` from the config section `cfg` (a mapping, or None for {}).

  `given` adds entries the caller supplies (they override `cfg`). Keys must be fields of `cls`;
  a list becomes a tuple for a tuple-typed field, a mapping becomes the nested dataclass of a
  dataclass-typed field; int and float fields must hold numbers, inside `cls.RANGES[key]` when
  it names an interval. Every error is one line naming `where.key`.
  """
  cfg = {**dict(cfg or {}), **given}
  fields = [f for f in dataclasses.fields(cls) if f.init]
  check_keys(cfg, [f.name for f in fields], where)
  missing = [f.name for f in fields if f.name not in cfg and f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ValueError(f'{where} is missing key(s) {missing}.')
  hints = typing.get_type_hints(cls)
  ranges = getattr(cls, 'RANGES', {})
  if set(ranges) - set(hints):
    raise TypeError(f'{cls.__name__}.RANGES names no field: {sorted(set(ranges) - set(hints))}.')
  kw = {}
  for key, value in cfg.items():
    hint, name = hints[key], f'{where}.{key}'
    if dataclasses.is_dataclass(hint) and hasattr(value, 'keys'):
      value = section(hint, value, name)
    elif typing.get_origin(hint) is tuple and isinstance(value, list):
      value = tuple(value)
    kind = _numeric_kind(hint)
    if kind is not None and value is not None:
      value = check_number(value, kind, ranges.get(key), name)
    kw[key] = value
  return cls(**kw)


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



# The numeric keys of the config sections that have no dataclass of their own (the trainers read
# them directly): (kind, range) per key, checked by `check_plain_sections` before a run starts.
PLAIN_SECTIONS = {
    '': {'seed': (int, '[0, inf)'), 'ema_decay': (float, '[0, 1)')},
    'data': {'batch_size': (int, '[1, inf)'), 'max_text_len': (int, '[1, inf)')},
    'sampler': {'num_steps': (int, '[1, inf)'), 'shift': (float, '(0, inf)'),
                'noise_level': (float, '[0, inf)')},
    'samples': {'every': (int, '[0, inf)'), 'per_class': (int, '[0, inf)')},
    'eval': {'every': (int, '[0, inf)'), 'num_pairs': (int, '[1, inf)')},
    'pairs': {'batch_size': (int, '[1, inf)'), 'max_text_len': (int, '[1, inf)')},
    'flow': {'shift': (float, '(0, inf)')},
}


def check_plain_sections(config) -> None:
  """One-line errors for out-of-range numbers in PLAIN_SECTIONS (keys that are present)."""
  for where, keys in PLAIN_SECTIONS.items():
    sec = config if not where else config.get(where, None)
    if not hasattr(sec, 'get'):
      continue
    for key, (kind, spec) in keys.items():
      value = sec.get(key, None)
      if value is not None:
        check_number(value, kind, spec, f'config.{where + "." if where else ""}{key}')
