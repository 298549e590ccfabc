"""Preference pairs for latent reward models: digits pairs built in code, or a JSONL of files.

Every batch is a dict of numpy arrays: 'chosen' and 'rejected' latents (B, H, W, C) in model space
(digits: pixels scaled to [−1, 1]), the prompt 'tokens' (B, L) and 'mask' (B, L), and 'kind' (B,)
int32 (which preference the pair expresses, for per-kind metrics).

1. `DigitPairs(batch_size, split, seed, tokenizer, ...)`: two preferences on the real digits
   (data/digits.py), drawn with equal probability per pair:
     'prompt' (kind 0): the prompt names digit y; chosen = a digit y, rejected = a digit ≠ y;
     'clean'  (kind 1): chosen = a digit y; rejected = the same image degraded — additive pixel
                        noise (std U(0.15, 0.35), clipped) or a 3×3 box blur — the "clean strokes ≻
                        noisy / smeared strokes" preference a user of a digit generator wants.
   Global batch k comes from `np.random.default_rng((seed, k, 0))`: stateless, so
   `get_state`/`set_state` (the step counter) resume exactly; every host draws it and keeps its
   block of rows (host h of n: rows [h * b, (h + 1) * b), as `data/pipeline.py`).
2. `JsonlPairs(path, batch_size, tokenizer, ...)`: lines {"prompt": str, "chosen": file,
   "rejected": file} with .npy latents (paths relative to the JSONL), cycled in a seeded order;
   host h reads its block of each global batch.
"""

from __future__ import annotations

import json
import os

import numpy as np

from rewarddance_jax.data import digits
from rewarddance_jax.data import tokenizer as tokenizer_lib

KINDS = ('prompt', 'clean')


def degrade(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Per image (N, H, W, 1) in [0, 1]: pixel noise (std U(0.15, 0.35)) or a 3×3 box blur, 50/50."""
  out = np.empty_like(images)
  for i, img in enumerate(images):
    if rng.random() < 0.5:
      out[i] = np.clip(img + rng.normal(0.0, rng.uniform(0.15, 0.35), img.shape), 0.0, 1.0)
    else:
      pad = np.pad(img[..., 0], 1, mode='edge')
      blur = sum(pad[dy:dy + img.shape[0], dx:dx + img.shape[1]]
                 for dy in range(3) for dx in range(3)) / 9.0
      out[i] = blur[..., None]
  return out


class DigitPairs:
  """Endless, resumable iterator of digit preference pairs (see the module docstring)."""

  def __init__(self, batch_size: int, *, split: str, seed: int, tokenizer, max_len: int,
               kinds=KINDS, process_index: int = 0, process_count: int = 1, split_seed: int = 0):
    if batch_size % process_count:
      raise ValueError(f'pairs batch_size={batch_size} must be a multiple of process_count='
                       f'{process_count}.')
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
      raise ValueError(f'pair kinds {tuple(kinds)} must be a non-empty subset of {KINDS}.')
    data = digits.load_split(split, seed=split_seed)
    self._images, self._labels = data['images'], data['labels']
    self._by_label = [np.flatnonzero(self._labels == d) for d in range(10)]
    self._kinds = np.array([KINDS.index(k) for k in kinds], np.int32)
    self._tokens, self._mask = tokenizer_lib.encode_prompts(
        tokenizer, [digits.prompt_for_label(d) for d in range(10)], max_len)
    self._per_host, self._batch = batch_size // process_count, batch_size
    self._seed, self._host, self._step = int(seed), int(process_index), 0

  def __iter__(self):
    return self

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self._seed, int(step), 0))
    n = self._batch
    labels = rng.integers(0, 10, n)
    kind = self._kinds[rng.integers(0, len(self._kinds), n)]
    chosen_idx = np.array([rng.choice(self._by_label[y]) for y in labels])
    other = (labels + rng.integers(1, 10, n)) % 10
    wrong_idx = np.array([rng.choice(self._by_label[y]) for y in other])
    chosen = self._images[chosen_idx]
    rejected = np.where((kind == 0)[:, None, None, None], self._images[wrong_idx],
                        degrade(chosen, rng))
    rows = slice(self._host * self._per_host, (self._host + 1) * self._per_host)
    return {'chosen': chosen[rows] * 2.0 - 1.0, 'rejected': rejected[rows] * 2.0 - 1.0,
            'tokens': self._tokens[labels[rows]], 'mask': self._mask[labels[rows]],
            'kind': kind[rows]}

  def __next__(self) -> dict[str, np.ndarray]:
    out = self.batch(self._step)
    self._step += 1
    return out

  def get_state(self) -> dict:
    return {'step': self._step}

  def set_state(self, state: dict) -> None:
    self._step = int(state['step'])


class JsonlPairs:
  """Pairs from a JSONL file of {"prompt", "chosen", "rejected"} with .npy latents; resumable."""

  def __init__(self, path: str, batch_size: int, *, tokenizer, max_len: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    root = os.path.dirname(os.path.abspath(path))
    self._rows = []
    with open(path, encoding='utf-8') as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        row = json.loads(line)
        missing = {'prompt', 'chosen', 'rejected'} - set(row)
        if missing:
          raise ValueError(f'{path}:{n}: pair is missing {sorted(missing)}.')
        self._rows.append((row['prompt'], os.path.join(root, row['chosen']),
                           os.path.join(root, row['rejected']), int(row.get('kind', 0))))
    if not self._rows:
      raise ValueError(f'{path} holds no pairs.')
    if batch_size % process_count:
      raise ValueError(f'pairs batch_size={batch_size} must be a multiple of process_count='
                       f'{process_count}.')
    self._tok, self._max_len, self._seed = tokenizer, max_len, int(seed)
    self._per_host = batch_size // process_count
    self._host, self._hosts = process_index, process_count
    self._step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = []
    for j in range(self._per_host):
      g = (self._step * self._hosts + self._host) * self._per_host + j   # global row
      epoch, pos = divmod(g, len(self._rows))
      rows.append(self._rows[np.random.default_rng((self._seed, epoch)).permutation(
          len(self._rows))[pos]])
    self._step += 1
    tokens, mask = tokenizer_lib.encode_prompts(self._tok, [r[0] for r in rows], self._max_len)
    load = lambda p: np.load(p, allow_pickle=False).astype(np.float32)
    return {'chosen': np.stack([load(r[1]) for r in rows]),
            'rejected': np.stack([load(r[2]) for r in rows]),
            'tokens': tokens, 'mask': mask, 'kind': np.array([r[3] for r in rows], np.int32)}

  def get_state(self) -> dict:
    return {'step': self._step}

  def set_state(self, state: dict) -> None:
    self._step = int(state['step'])
