"""Grain input pipelines (no TensorFlow): digits training batches and prompt batches.

Both pipelines follow docs/design.md §6 and have the same shape:

1. `grain.MapDataset.source(...)` over a random-access source (the digits arrays, or prompt
   records / a TFDS ArrayRecord source);
2. `.shuffle(seed).repeat()`: a global permutation, different in every epoch, identical on every
   host because every host uses the same seed;
3. `.batch(per_host_batch, drop_remainder=True)` (fixed shapes, no recompiles), then this host's
   chunks `[process_index::process_count]`: host h's batch k is global rows
   [k * B + h * b, k * B + (h + 1) * b), the block of the global batch that
   `parallel.sharding.host_to_global` places on host h's devices, so the global batch of step k
   is global rows [k * B, (k + 1) * B) in order whatever the number of hosts; a map adds the
   tokens (and, for GRPO, repeats each prompt G times adjacently);
4. `.to_iter_dataset(read_options)`: a `grain.DatasetIterator` whose `get_state()` is a small
   JSON-serialisable dict to save with the checkpoint; `set_state()` resumes with exactly the
   batches an uninterrupted run would have produced.

`batch_size` is always the GLOBAL batch (rows across all hosts); each host gets
`batch_size // process_count` rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
import tokenizers

from rewarddance_jax.data import digits
from rewarddance_jax.data import prompts as prompts_lib
from rewarddance_jax.data import tokenizer as tokenizer_lib

# Small prefetch: elements are cheap and the laptop default has two cores; grain's default
# (16 threads, 500 elements) would hold hundreds of batches in memory.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def _host_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if count < 1 or not 0 <= index < count:
    raise ValueError(f'process_index={index} must lie in [0, process_count={count})')
  return index, count


def _per_host_batch(batch_size: int, process_count: int) -> int:
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f'global batch_size={batch_size} must be a positive multiple of '
                     f'process_count={process_count}')
  return batch_size // process_count


def _host_batches(source: Any, per_host: int, *, seed: int, shuffle: bool,
                  num_epochs: int | None, process_index: int, process_count: int,
                  batch_fn: Any = None) -> grain.MapDataset:
  """Steps 1-3: source -> (shuffle) -> repeat -> batches of `per_host` -> this host's share."""
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  ds = ds.repeat(num_epochs).batch(per_host, drop_remainder=True, batch_fn=batch_fn)
  if process_count > 1:   # every host gets as many batches (a finite pass drops the tail)
    ds = ds[process_index:len(ds) // process_count * process_count:process_count]
  return ds


# ----------------------------------------------------------------------------------------------
# Digits training batches.
# ----------------------------------------------------------------------------------------------


class _DigitsSource:
  """Random-access source over the split arrays: element = dict(images, labels)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self._images = images
    self._labels = labels

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {'images': self._images[index], 'labels': self._labels[index]}


class _AddDigitTokens:
  """Adds the tokenized prompt of each label (a 10-row lookup table, tokenized once)."""

  def __init__(self, tokens: np.ndarray, mask: np.ndarray):
    self._tokens = tokens
    self._mask = mask

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    labels = batch['labels'].astype(np.int32)
    return {'images': batch['images'].astype(np.float32), 'labels': labels,
            'tokens': self._tokens[labels], 'mask': self._mask[labels]}


def digits_train_dataset(batch_size: int, *, seed: int, split: str = 'train',
                         tokenizer: tokenizers.Tokenizer | None = None, max_len: int = 8,
                         process_index: int | None = None, process_count: int | None = None,
                         split_seed: int = 0, shuffle: bool = True,
                         num_epochs: int | None = None,
                         read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """The digits pipeline as a `grain.IterDataset` (see `digits_train_iter`)."""
  index, count = _host_layout(process_index, process_count)
  per_host = _per_host_batch(batch_size, count)
  tok = tokenizer if tokenizer is not None else tokenizer_lib.build_digits_tokenizer()
  data = digits.load_split(split, seed=split_seed)
  table_tokens, table_mask = tokenizer_lib.encode_prompts(
      tok, [digits.prompt_for_label(label) for label in range(10)], max_len)
  ds = _host_batches(_DigitsSource(data['images'], data['labels']), per_host, seed=seed,
                     shuffle=shuffle, num_epochs=num_epochs, process_index=index,
                     process_count=count)
  ds = ds.map(_AddDigitTokens(table_tokens, table_mask))
  return ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)


def digits_train_iter(batch_size: int, *, seed: int, split: str = 'train',
                      tokenizer: tokenizers.Tokenizer | None = None, max_len: int = 8,
                      process_index: int | None = None, process_count: int | None = None,
                      split_seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                      read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """Iterator of this host's digits batches.

  Args:
    batch_size: GLOBAL batch; must be divisible by the process count.
    seed: shuffle seed (same on every host).
    split: 'train' or 'heldout' (of the stratified split chosen by `split_seed`).
    tokenizer: defaults to `tokenizer.build_digits_tokenizer()`.
    max_len: token length L of the prompt "a handwritten digit <word>" with [BOS]/[EOS].
    process_index / process_count: default to `jax.process_index()` / `jax.process_count()`.
    split_seed: seed of the train / held-out split (`digits.load_split`).
    shuffle / num_epochs: set False / 1 for one ordered pass (evaluation).
    read_options: grain read threads and prefetch.

  Returns:
    A `grain.DatasetIterator` of dicts: images (b, 16, 16, 1) float32, labels (b,) int32,
    tokens (b, L) int32, mask (b, L) bool, with b = batch_size // process_count.
  """
  return iter(digits_train_dataset(
      batch_size, seed=seed, split=split, tokenizer=tokenizer, max_len=max_len,
      process_index=process_index, process_count=process_count, split_seed=split_seed,
      shuffle=shuffle, num_epochs=num_epochs, read_options=read_options))


# ----------------------------------------------------------------------------------------------
# Prompt batches (samplers, GRPO / ReFL / PRFL trainers).
# ----------------------------------------------------------------------------------------------


def _prompt_text(element: Any) -> str:
  """The prompt of a PromptRecord, a TFDS element dict (str or bytes) or a plain string."""
  if isinstance(element, prompts_lib.PromptRecord):
    return element.prompt
  if isinstance(element, dict):
    if 'prompt' not in element:
      raise ValueError(f'prompt source element has no "prompt" field (fields: {sorted(element)})')
    element = element['prompt']
  if isinstance(element, np.ndarray) and element.ndim == 0:
    element = element.item()
  if isinstance(element, bytes):
    return element.decode('utf-8')
  if isinstance(element, str):
    return element
  raise TypeError(f'cannot read a prompt from a {type(element).__name__}')


class _PromptSource:
  """Random-access source: element = (index in the prompt set, prompt text)."""

  def __init__(self, records: Sequence[Any]):
    self._records = records

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> tuple[int, str]:
    return int(index), _prompt_text(self._records[index])


class _CollatePrompts:
  """Batch fn: tokenizes a batch of unique prompts and repeats each `repeat_each` times."""

  def __init__(self, tok: tokenizers.Tokenizer, max_len: int, repeat_each: int):
    self._tok = tok
    self._max_len = max_len
    self._repeat_each = repeat_each

  def __call__(self, elements: Sequence[tuple[int, str]]) -> dict[str, Any]:
    ids = np.asarray([index for index, _ in elements], dtype=np.int32)
    texts = [text for _, text in elements]
    tokens, mask = tokenizer_lib.encode_prompts(self._tok, texts, self._max_len)
    g = self._repeat_each
    # np.repeat keeps the copies adjacent: rows [i*G, (i+1)*G) are prompt i's group.
    return {'ids': np.repeat(ids, g), 'tokens': np.repeat(tokens, g, axis=0),
            'mask': np.repeat(mask, g, axis=0), 'prompts': [t for t in texts for _ in range(g)]}


def _grouped_batches(source: Any, batch_fn: Any, batch_size: int, *, seed: int,
                     repeat_each: int, process_index: int | None, process_count: int | None,
                     shuffle: bool, num_epochs: int | None,
                     read_options: grain.ReadOptions | None) -> grain.IterDataset:
  """This host's batches of `per-host batch / repeat_each` distinct elements of `source`, made
  into rows by `batch_fn` (which repeats each element `repeat_each` times adjacently)."""
  index, count = _host_layout(process_index, process_count)
  per_host = _per_host_batch(batch_size, count)
  if repeat_each < 1 or per_host % repeat_each:
    raise ValueError(f'per-host batch {per_host} (global batch_size={batch_size} / '
                     f'process_count={count}) must be divisible by repeat_each={repeat_each}')
  if len(source) == 0:  # pylint: disable=g-explicit-length-test  (sources may lack __bool__)
    raise ValueError('prompt set is empty')
  ds = _host_batches(source, per_host // repeat_each, seed=seed, shuffle=shuffle,
                     num_epochs=num_epochs, process_index=index, process_count=count,
                     batch_fn=batch_fn)
  return ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)


def prompt_dataset(records: Sequence[Any], batch_size: int, *, seed: int,
                   tokenizer: tokenizers.Tokenizer | None = None, max_len: int = 8,
                   repeat_each: int = 1, process_index: int | None = None,
                   process_count: int | None = None, shuffle: bool = True,
                   num_epochs: int | None = None,
                   read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """The prompt pipeline as a `grain.IterDataset` (see `prompt_iter`)."""
  tok = tokenizer if tokenizer is not None else tokenizer_lib.build_digits_tokenizer()
  return _grouped_batches(_PromptSource(records), _CollatePrompts(tok, max_len, repeat_each),
                          batch_size, seed=seed, repeat_each=repeat_each,
                          process_index=process_index, process_count=process_count,
                          shuffle=shuffle, num_epochs=num_epochs, read_options=read_options)


def prompt_iter(records: Sequence[Any], batch_size: int, *, seed: int,
                tokenizer: tokenizers.Tokenizer | None = None, max_len: int = 8,
                repeat_each: int = 1, process_index: int | None = None,
                process_count: int | None = None, shuffle: bool = True,
                num_epochs: int | None = None,
                read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """Iterator of this host's prompt batches.

  Args:
    records: `PromptRecord`s (`prompts.load_prompt_file`), a TFDS source
      (`prompts.tfds_prompt_source`, elements with a 'prompt' field) or plain strings.
    batch_size: GLOBAL number of rows (samples); per host b = batch_size // process_count.
    seed: shuffle seed (same on every host).
    tokenizer: defaults to `tokenizer.build_digits_tokenizer()`.
    max_len: token length L.
    repeat_each: G, copies of each prompt placed adjacently (a GRPO group); each host draws
      b // G distinct prompts per batch, and b must be divisible by G.
    process_index / process_count: default to `jax.process_index()` / `jax.process_count()`.
    shuffle / num_epochs: set False / 1 for one ordered pass (the tail that does not fill a
      batch is dropped, to keep shapes fixed).
    read_options: grain read threads and prefetch.

  Returns:
    A `grain.DatasetIterator` of dicts: ids (b,) int32 (index of the prompt in `records`),
    tokens (b, L) int32, mask (b, L) bool, and prompts (a host-side list of b str).
  """
  return iter(prompt_dataset(
      records, batch_size, seed=seed, tokenizer=tokenizer, max_len=max_len,
      repeat_each=repeat_each, process_index=process_index, process_count=process_count,
      shuffle=shuffle, num_epochs=num_epochs, read_options=read_options))


# ----------------------------------------------------------------------------------------------
# Pre-encoded prompts (launch.encode_prompts): real-size GRPO batches.
# ----------------------------------------------------------------------------------------------


class _IndexSource:
  """Random-access source of prompt indices 0..n−1."""

  def __init__(self, n: int):
    self._n = n

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> int:
    return int(index)


class _CollateEncoded:
  """Batch fn: reads the encoded tensors of a batch of unique prompts, repeats each G times."""

  def __init__(self, encoded: Any, repeat_each: int):
    self._encoded = encoded
    self._repeat_each = repeat_each

  def __call__(self, indices: Sequence[int]) -> dict[str, Any]:
    ids = np.asarray(indices, dtype=np.int32)
    g = self._repeat_each
    out = {k: np.repeat(v, g, axis=0) for k, v in self._encoded[list(ids)].items()}
    out['ids'] = np.repeat(ids, g)
    out['prompts'] = [self._encoded.prompts[i] for i in ids for _ in range(g)]
    return out


def encoded_prompt_iter(encoded: Any, batch_size: int, *, seed: int, repeat_each: int = 1,
                        process_index: int | None = None, process_count: int | None = None,
                        shuffle: bool = True, num_epochs: int | None = None,
                        read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """Iterator of this host's batches of pre-encoded prompts, as `prompt_iter` but with the
  text encoders' outputs instead of token ids.

  `encoded` is a `weights.text_pipeline.EncodedPrompts` (what `launch.encode_prompts` wrote):
  `len()`, `.prompts` and `[indices]` → {'txt', 'pooled', 'mask'}. Batches hold those arrays
  with each prompt repeated `repeat_each` times adjacently, plus 'ids' and 'prompts'. The
  iterator's state (grain) is checkpointed by the loop, so a resume draws the same prompts.
  """
  return iter(_grouped_batches(
      _IndexSource(len(encoded)), _CollateEncoded(encoded, repeat_each), batch_size, seed=seed,
      repeat_each=repeat_each, process_index=process_index, process_count=process_count,
      shuffle=shuffle, num_epochs=num_epochs, read_options=read_options))
