"""CoT rationales for VLM reward training: built from digit labels, or read from a JSONL file.

RewardDance format (i) (docs/algorithms.md §4.3): the answer comes first, the reasons after it, so
the training target after the prompt is "<yes|no> <rationale>" and the reward at inference still
reads P(yes) at the first answer position. The loss is the next-token CE over the answer + rationale
tokens, the first (answer) token weighted by `first_token_weight` (rewards/vlm_losses.py).

1. Digits (`config.reward_model.rationale = True`), from the labels:
     pointwise: "yes . the image is a seven" / "no . the image is a three";
     pairwise:  "yes . image 2 is a seven , image 1 is a three" (the matching image is image 2)
                "no . image 1 is a seven , image 2 is a three"   (it is image 1).
2. JSONL (real data), one JSON object per line, image paths relative to the JSONL file, images
   `.npy` float arrays (H, W, C) in [0, 1] (read with allow_pickle=False):
     pairwise:  {"prompt": str, "image_1": path (reference), "image_2": path (generated),
                 "answer": "yes" | "no", "rationale": str (optional)}
     pointwise: {"prompt": str, "chosen": path, "rejected": path,
                 "chosen_rationale": str (optional), "rejected_rationale": str (optional)}
                 (the chosen image's answer is "yes", the rejected one's "no").
   `read_jsonl(path, mode)` validates every line and raises a one-line error naming `path:line`
   on a broken record. `JsonlRationaleBatches` turns the records into the trainer's batches
   (train/vlm_reward.py keys: pairwise q_*, pointwise p_* with per-image answer tokens); image
   order is kept as written (a rationale names "image 1"/"image 2", so no random swap: put both
   orders in the file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from rewarddance_jax.data import digits

MODES = ('pointwise', 'pairwise')
FIELDS = {'pairwise': ('prompt', 'image_1', 'image_2', 'answer'),
          'pointwise': ('prompt', 'chosen', 'rejected')}
OPTIONAL = {'pairwise': ('rationale',), 'pointwise': ('chosen_rationale', 'rejected_rationale')}
ANSWERS = ('yes', 'no')


def answer_text(answer: str, rationale: str = '') -> str:
  """The training target after the prompt: the answer word, then the rationale if any."""
  return f'{answer} {rationale}'.strip()


def digit_pointwise_answer(prompt_label: int, image_label: int) -> str:
  """'yes . the image is a seven' when the image shows the prompt's digit, else 'no . ...'."""
  word = digits.NUMBER_WORDS[int(image_label)]
  return answer_text('yes' if int(prompt_label) == int(image_label) else 'no',
                     f'. the image is a {word}')


def digit_pairwise_answer(match_label: int, other_label: int, match_is_image_2: bool) -> str:
  """Answer + rationale of a (matching, non-matching) pair in the given image order."""
  k = 2 if match_is_image_2 else 1
  w_match, w_other = digits.NUMBER_WORDS[int(match_label)], digits.NUMBER_WORDS[int(other_label)]
  return answer_text('yes' if match_is_image_2 else 'no',
                     f'. image {k} is a {w_match} , image {3 - k} is a {w_other}')


def read_jsonl(path: str, mode: str) -> list[dict]:
  """Validated records of a rationale JSONL (module doc, item 2); image paths made absolute."""
  if mode not in MODES:
    raise ValueError(f'rationale JSONL mode={mode!r} is not one of {MODES}.')
  root = os.path.dirname(os.path.abspath(path))
  records = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{n}'
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: not valid JSON ({e.msg} at column {e.colno}).') from None
      if not isinstance(row, dict):
        raise ValueError(f'{where}: a record must be a JSON object, got {type(row).__name__}.')
      missing = [k for k in FIELDS[mode] if k not in row]
      if missing:
        raise ValueError(f'{where}: {mode} record is missing {missing}.')
      unknown = sorted(set(row) - set(FIELDS[mode]) - set(OPTIONAL[mode]))
      if unknown:
        raise ValueError(f'{where}: unknown field(s) {unknown}; {mode} fields are '
                         f'{list(FIELDS[mode] + OPTIONAL[mode])}.')
      for k in ('prompt',) + OPTIONAL[mode]:
        if k in row and not isinstance(row[k], str):
          raise ValueError(f'{where}: field {k!r} must be a string.')
      if mode == 'pairwise' and row['answer'] not in ANSWERS:
        raise ValueError(f'{where}: answer {row["answer"]!r} is not one of {ANSWERS}.')
      images = ('image_1', 'image_2') if mode == 'pairwise' else ('chosen', 'rejected')
      for k in images:
        file = os.path.join(root, str(row[k]))
        if not os.path.isfile(file):
          raise ValueError(f'{where}: image {k}={row[k]!r} not found ({file}).')
        row[k] = file
      records.append(row)
  if not records:
    raise ValueError(f'{path} holds no records.')
  return records


def _load_image(file: str) -> np.ndarray:
  x = np.load(file, allow_pickle=False)
  if x.ndim == 2:
    x = x[..., None]
  return x.astype(np.float32)


class JsonlRationaleBatches:
  """Resumable batches of a rationale JSONL in the trainer's layout; batch k = records
  [k·B, (k+1)·B) of a per-epoch permutation drawn from (seed, epoch)."""

  def __init__(self, path: str, mode: str, prompter, batch_size: int, seed: int = 0):
    if prompter.mode != mode:
      raise ValueError(f'{path}: a {mode} JSONL needs a {mode} prompter, got {prompter.mode}.')
    self.records = read_jsonl(path, mode)
    self.mode, self.prompter, self.b, self.seed = mode, prompter, int(batch_size), int(seed)
    self.step = 0

  def _rows(self) -> list[dict]:
    rows = []
    for j in range(self.b):
      epoch, i = divmod(self.step * self.b + j, len(self.records))
      rows.append(self.records[np.random.default_rng((self.seed, epoch)).permutation(
          len(self.records))[i]])
    return rows

  def encode(self, rows: Sequence[dict]) -> dict:
    prompts = [r['prompt'] for r in rows]
    if self.mode == 'pairwise':
      enc = self.prompter.encode(prompts, [answer_text(r['answer'], r.get('rationale', ''))
                                           for r in rows])
      return {'q_ids': enc['ids'], 'q_targets': enc['targets'], 'q_mask': enc['answer_mask'],
              'q_ref': np.stack([_load_image(r['image_1']) for r in rows]),
              'q_gen': np.stack([_load_image(r['image_2']) for r in rows])}
    w = self.prompter.encode(prompts, [answer_text('yes', r.get('chosen_rationale', ''))
                                       for r in rows])
    l = self.prompter.encode(prompts, [answer_text('no', r.get('rejected_rationale', ''))
                                       for r in rows])
    return {'p_ids': w['ids'], 'p_ids_l': l['ids'], 'p_pos': w['pos'],
            'p_targets': w['targets'], 'p_mask': w['answer_mask'],
            'p_targets_l': l['targets'], 'p_mask_l': l['answer_mask'],
            'p_w': np.stack([_load_image(r['chosen']) for r in rows]),
            'p_l': np.stack([_load_image(r['rejected']) for r in rows]),
            'p_ce': np.ones(len(rows), np.float32)}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = self.encode(self._rows())
    self.step += 1
    return batch

  def get_state(self) -> dict:
    return {'step': self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state['step'])
