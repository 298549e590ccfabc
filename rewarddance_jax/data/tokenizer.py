"""Word-level tokenizer for the digits problem, built with HuggingFace `tokenizers`.

The digits prompts and the questions a later VLM reward asks use a few dozen words, so a closed
word-level vocabulary is enough and keeps the embedding tables tiny. The module:

1. builds a `WordLevel` model over a fixed, ordered vocabulary: the special tokens `[PAD]`=0,
   `[UNK]`=1, `[BOS]`=2, `[EOS]`=3, then the digits prompt words, the VLM question words, the
   numbers 0-9 and the punctuation `? . ,` (out-of-vocabulary words map to `[UNK]`);
2. lower-cases the text and splits it on whitespace and punctuation;
3. adds `[BOS] ... [EOS]` through a post-processor, so `tok.encode(text)` matches what
   `encode_prompts` produces;
4. saves to / loads from the standard `tokenizer.json` (any HF-compatible reader can use it);
5. encodes prompt batches into fixed-shape `(B, L)` int32 ids and a bool mask (right padding,
   truncation that keeps the `[EOS]`), the shape every jitted text encoder expects.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, processors

from rewarddance_jax.data import digits

PAD, UNK, BOS, EOS = '[PAD]', '[UNK]', '[BOS]', '[EOS]'
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_FILE = 'tokenizer.json'

# Words of the VLM reward questions ("does this image show the digit seven ?",
# "is image 2 better than image 1 ?") and answers; kept in a fixed order so ids never move.
_VLM_WORDS = ('does', 'this', 'image', 'show', 'the', 'digit', 'is', 'better', 'than', 'yes', 'no',
              'a', 'an', 'of', 'handwritten', 'clean', 'noisy')
_NUMBERS = tuple(str(i) for i in range(10))
_PUNCTUATION = ('?', '.', ',')


def _vocabulary_words() -> list[str]:
  """Returns the ordered, de-duplicated non-special vocabulary."""
  words: list[str] = []
  prompt_words = [w for label in range(10) for w in digits.prompt_for_label(label).split()]
  for word in [*prompt_words, *_VLM_WORDS, *digits.NUMBER_WORDS, *_NUMBERS, *_PUNCTUATION]:
    if word not in words:
      words.append(word)
  return words


def build_digits_tokenizer() -> tokenizers.Tokenizer:
  """Builds the digits word-level tokenizer (deterministic: same ids on every call and host)."""
  vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
  for word in _vocabulary_words():
    vocab[word] = len(vocab)
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.normalizer = normalizers.Lowercase()
  # Whitespace splits "digit?" into "digit", "?"; Punctuation then splits runs such as "?.".
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
  tok.post_processor = processors.TemplateProcessing(
      single=f'{BOS} $A {EOS}', pair=f'{BOS} $A {EOS} $B {EOS}',
      special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)])
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  return tok


def vocab_size(tok: tokenizers.Tokenizer) -> int:
  """Returns the number of ids the tokenizer can emit (embedding table rows)."""
  return tok.get_vocab_size(with_added_tokens=True)


def _file_path(path: str | os.PathLike[str]) -> str:
  """Maps a directory to its tokenizer.json; leaves a file path alone."""
  path = os.fspath(path)
  if os.path.isdir(path) or path.endswith(os.sep) or not os.path.splitext(path)[1]:
    return os.path.join(path, TOKENIZER_FILE)
  return path


def save_tokenizer(tok: tokenizers.Tokenizer, path: str | os.PathLike[str]) -> str:
  """Writes `tokenizer.json` (into `path` if it is a directory) and returns the file path."""
  file_path = _file_path(path)
  os.makedirs(os.path.dirname(file_path) or '.', exist_ok=True)
  tmp_path = f'{file_path}.tmp{os.getpid()}'   # every host of a run may write the same file
  tok.save(tmp_path)
  os.replace(tmp_path, file_path)
  return file_path


def load_tokenizer(path: str | os.PathLike[str]) -> tokenizers.Tokenizer:
  """Loads a tokenizer.json (or a directory holding one); one-line error naming the file."""
  file_path = _file_path(path)
  if not os.path.isfile(file_path):
    raise FileNotFoundError(f'{file_path}: tokenizer file not found')
  try:
    with open(file_path, encoding='utf-8') as f:
      json.load(f)  # A precise message (line, column) for broken JSON before tokenizers parses it.
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{file_path}: corrupt tokenizer file ({e})') from e
  try:
    tok = tokenizers.Tokenizer.from_file(file_path)
  except Exception as e:  # tokenizers raises a bare Exception on schema errors.
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'{file_path}: not a valid tokenizer file ({first_line})') from e
  for token in (PAD, UNK, BOS, EOS):
    if tok.token_to_id(token) is None:
      raise ValueError(f'{file_path}: tokenizer lacks the special token {token}')
  return tok


def load_or_build(workdir: str | None, vocab_limit: int | None = None) -> tokenizers.Tokenizer:
  """`workdir/tokenizer.json` when present, else the digits tokenizer (saved there, so samplers
  and later stages read the same vocabulary); checks it fits a model vocabulary of
  `vocab_limit` tokens."""
  path = os.path.join(workdir, 'tokenizer.json') if workdir else None
  if path and os.path.exists(path):
    tok = load_tokenizer(path)
  else:
    tok = build_digits_tokenizer()
    if path:
      os.makedirs(workdir, exist_ok=True)
      save_tokenizer(tok, path)
  size = vocab_size(tok)
  if vocab_limit is not None and size > int(vocab_limit):
    raise ValueError(f'tokenizer has {size} tokens but config.model.vocab_size={vocab_limit}.')
  return tok


def encode_prompts(tok: tokenizers.Tokenizer, prompts: Sequence[str],
                   max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Encodes prompts to (ids int32 (B, L), mask bool (B, L)) with L = max_len.

  Each row is `[BOS] words... [EOS]` then `[PAD]`s; a prompt longer than max_len - 2 words is cut
  so that the `[EOS]` always survives (text encoders pool or attend up to it).
  """
  if max_len < 2:
    raise ValueError(f'max_len must be >= 2 to hold [BOS] and [EOS], got {max_len}')
  if isinstance(prompts, str):
    raise TypeError('encode_prompts expects a sequence of prompts, got a single str')
  prompts = [str(p) for p in prompts]
  bos, eos, pad = tok.token_to_id(BOS), tok.token_to_id(EOS), tok.token_to_id(PAD)
  ids = np.full((len(prompts), max_len), pad, dtype=np.int32)
  mask = np.zeros((len(prompts), max_len), dtype=bool)
  # Special tokens are placed by hand (not by the post-processor or tok.enable_truncation) so
  # that truncation keeps [EOS] and the shared tokenizer object is never mutated.
  for row, encoding in enumerate(tok.encode_batch(prompts, add_special_tokens=False)):
    body = encoding.ids[:max_len - 2]
    seq = [bos, *body, eos]
    ids[row, :len(seq)] = seq
    mask[row, :len(seq)] = True
  return ids, mask
