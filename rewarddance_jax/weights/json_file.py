"""The JSON files beside weights (config.json, index files, saved reward settings), read with a
one-line error that names the file: missing, not valid JSON, or not a JSON object."""

from __future__ import annotations

import json
import os


def read(path: str, missing_hint: str = '') -> dict:
  """The JSON object in `path`; `missing_hint` ends the message of a missing file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found{f" ({missing_hint})" if missing_hint else ""}.')
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON ({e}).') from None
  if not isinstance(value, dict):
    raise ValueError(f'{path}: holds a JSON {type(value).__name__}, not an object.')
  return value
