"""Prompt sets: jsonl / csv files, an optional TFDS ArrayRecord source, and the digits prompts.

A prompt set is a list of `PromptRecord`s (`prompt`, `id`, `metadata`, `ref_image_path`), the
rows every sampler and RL trainer iterates over through `pipeline.prompt_iter`. The module:

1. reads `.jsonl` files (one JSON object per line, at least `prompt`; optional `id`, `metadata`,
   `ref_image_path`; blank lines skipped) and `.csv` files (a header with a `prompt` column;
   optional `id` and `ref_image_path` columns, other columns become `metadata`);
2. reads UTF-8 (a leading byte-order mark, as spreadsheet exports write, is dropped) and
   validates every row and fails on the first bad one with a one-line error naming the file and
   the line (bad JSON, missing or empty `prompt`, bad field types, empty file, unknown
   extension, missing file);
3. resolves a relative `ref_image_path` against the prompt file's directory, so a prompt set can
   be moved together with its images;
4. optionally opens a TFDS ArrayRecord data set as a random-access source (tensorflow-datasets
   is imported lazily, works without TensorFlow, and is not a hard dependency);
5. provides the ten digits prompts as records (`digits_prompt_records`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from rewarddance_jax.data import digits

PROMPT_FILE_EXTENSIONS = ('.jsonl', '.csv')
_RECORD_FIELDS = ('prompt', 'id', 'metadata', 'ref_image_path')


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """One prompt of a prompt set.

  Attributes:
    prompt: the text prompt.
    id: a stable identifier (from the file, else `<file stem>:<line>`).
    metadata: free-form extra fields (not interpreted by the library).
    ref_image_path: optional reference image (pairwise rewards, ReFL references).
  """
  prompt: str
  id: str
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  ref_image_path: str | None = None


class PromptFileError(ValueError):
  """A malformed prompt file; the message names the file and line."""


def _resolve_ref(path: str, ref: str | None) -> str | None:
  if not ref:
    return None
  if os.path.isabs(ref):
    return ref
  return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), ref))


def _record_from_fields(path: str, line: int, fields: Mapping[str, Any], *,
                        default_id: str) -> PromptRecord:
  """Validates one row's fields and builds its record; errors say `path:line: ...`."""
  where = f'{path}:{line}'
  if 'prompt' not in fields:
    raise PromptFileError(f'{where}: missing field "prompt"')
  prompt = fields['prompt']
  if not isinstance(prompt, str):
    raise PromptFileError(f'{where}: field "prompt" must be a string, got {type(prompt).__name__}')
  if not prompt.strip():
    raise PromptFileError(f'{where}: field "prompt" is empty')
  record_id = fields.get('id')
  if record_id is None or record_id == '':
    record_id = default_id
  elif isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
    raise PromptFileError(f'{where}: field "id" must be a string or an integer, '
                          f'got {type(record_id).__name__}')
  metadata = fields.get('metadata', {})
  if metadata is None:
    metadata = {}
  if not isinstance(metadata, Mapping):
    raise PromptFileError(f'{where}: field "metadata" must be an object, '
                          f'got {type(metadata).__name__}')
  ref = fields.get('ref_image_path')
  if ref is not None and not isinstance(ref, str):
    raise PromptFileError(f'{where}: field "ref_image_path" must be a string, '
                          f'got {type(ref).__name__}')
  return PromptRecord(prompt=prompt, id=str(record_id), metadata=dict(metadata),
                      ref_image_path=_resolve_ref(path, ref))


def _read_jsonl(path: str, stem: str) -> list[PromptRecord]:
  records = []
  with open(path, encoding='utf-8-sig') as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        fields = json.loads(line)
      except json.JSONDecodeError as e:
        raise PromptFileError(f'{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})'
                              ) from e
      if not isinstance(fields, dict):
        raise PromptFileError(f'{path}:{line_no}: expected a JSON object, '
                              f'got {type(fields).__name__}')
      records.append(_record_from_fields(path, line_no, fields, default_id=f'{stem}:{line_no}'))
  return records


def _read_csv(path: str, stem: str) -> list[PromptRecord]:
  records = []
  with open(path, encoding='utf-8-sig', newline='') as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames
    if not header:
      return []
    header = [h.strip() for h in header]
    reader.fieldnames = header
    if 'prompt' not in header:
      raise PromptFileError(f'{path}:1: header has no "prompt" column (columns: {header})')
    for row in reader:
      # reader.line_num is the physical line where the row ended (quoted fields may span lines).
      line_no = reader.line_num
      if None in row:
        raise PromptFileError(f'{path}:{line_no}: more fields than header columns')
      if not any((v or '').strip() for v in row.values()):
        continue
      fields = {k: v for k, v in row.items() if k in _RECORD_FIELDS}
      if fields.get('prompt') is None:
        raise PromptFileError(f'{path}:{line_no}: missing field "prompt"')
      if fields.get('ref_image_path') == '':
        fields['ref_image_path'] = None
      fields['metadata'] = {k: v for k, v in row.items() if k not in _RECORD_FIELDS}
      records.append(_record_from_fields(path, line_no, fields, default_id=f'{stem}:{line_no}'))
  return records


def load_prompt_file(path: str | os.PathLike[str]) -> list[PromptRecord]:
  """Reads a .jsonl or .csv prompt file into records (file order)."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in PROMPT_FILE_EXTENSIONS:
    raise PromptFileError(f'{path}: unknown prompt file extension {ext!r}; expected one of '
                          f'{PROMPT_FILE_EXTENSIONS}')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: prompt file not found')
  stem = os.path.splitext(os.path.basename(path))[0]
  try:
    records = _read_jsonl(path, stem) if ext == '.jsonl' else _read_csv(path, stem)
  except UnicodeDecodeError as e:
    raise PromptFileError(f'{path}: not UTF-8 text ({e.reason} at byte {e.start})') from e
  except csv.Error as e:
    raise PromptFileError(f'{path}: malformed CSV ({e})') from e
  if not records:
    raise PromptFileError(f'{path}: empty prompt file (no prompts)')
  return records


def prompt_labels(prompts) -> np.ndarray:
  """(b,) int32: the digit each prompt names (`digits.label_from_prompt`), −1 where none."""
  labels = []
  for text in prompts:
    try:
      labels.append(digits.label_from_prompt(text))
    except ValueError:
      labels.append(-1)
  return np.asarray(labels, np.int32)


def digits_prompt_records() -> list[PromptRecord]:
  """The ten digits prompts, id = the digit, metadata = {'label': digit}."""
  return [PromptRecord(prompt=digits.prompt_for_label(label), id=str(label),
                       metadata={'label': label}) for label in range(10)]


def tfds_prompt_source(name_or_dir: str | os.PathLike[str], split: str,
                       data_dir: str | os.PathLike[str] | None = None) -> Any:
  """Opens a TFDS ArrayRecord data set as a random-access source for `pipeline.prompt_iter`.

  Args:
    name_or_dir: a prepared data set directory (holding `dataset_info.json`), or a registered
      TFDS name such as 'my_prompts' / 'my_prompts:1.0.0' found under `data_dir`.
    split: a TFDS split spec, e.g. 'train' or 'train[:90%]'.
    data_dir: TFDS data directory for a name lookup.

  Returns:
    A `Sequence`-like source; each element is a dict with at least 'prompt' (str or bytes).
    Only `as_data_source` is used: `as_dataset` (tf.data) would need TensorFlow.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('tfds_prompt_source needs tensorflow-datasets (no TensorFlow required): '
                      'pip install "tensorflow-datasets==4.9.10"') from e
  name_or_dir = os.fspath(name_or_dir)
  try:
    if os.path.isdir(name_or_dir):
      return tfds.builder_from_directory(name_or_dir).as_data_source(split=split)
    return tfds.data_source(name_or_dir, split=split,
                            data_dir=os.fspath(data_dir) if data_dir else None,
                            download=False, try_gcs=False)
  except Exception as e:  # TFDS raises many types (DatasetNotFoundError, ValueError, ...).
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'{name_or_dir}: cannot open TFDS prompt source split {split!r} '
                     f'({first_line})') from e
