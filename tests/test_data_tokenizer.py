"""Tests for rewarddance_jax.data.tokenizer: vocabulary, encoding, save/load."""

import numpy as np
import pytest

from rewarddance_jax.data import digits
from rewarddance_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.build_digits_tokenizer()


def test_special_ids_and_vocabulary(tok):
  for token, expected in (('[PAD]', 0), ('[UNK]', 1), ('[BOS]', 2), ('[EOS]', 3)):
    assert tok.token_to_id(token) == expected
  needed = ('does this image show the digit is better than yes no a an of handwritten clean '
            'noisy ? . ,').split() + list(digits.NUMBER_WORDS) + [str(i) for i in range(10)]
  for word in needed:
    assert tok.token_to_id(word) is not None, word
  assert tokenizer_lib.vocab_size(tok) == len(tok.get_vocab(with_added_tokens=True))
  # Deterministic: a second build gives the same ids.
  assert tokenizer_lib.build_digits_tokenizer().get_vocab() == tok.get_vocab()


def test_vlm_questions_have_no_unknown_words(tok):
  for text in ('Does this image show the digit seven?', 'Is image 2 better than image 1?',
               'yes.', 'no, an image of a noisy handwritten digit'):
    enc = tok.encode(text)
    assert tokenizer_lib.UNK_ID not in enc.ids, text
    assert enc.ids[0] == tokenizer_lib.BOS_ID and enc.ids[-1] == tokenizer_lib.EOS_ID
  assert tok.encode('is image 2 better?', add_special_tokens=False).tokens == [
      'is', 'image', '2', 'better', '?']
  assert tok.encode('a zebra', add_special_tokens=False).ids[1] == tokenizer_lib.UNK_ID


def test_encode_prompts_padding_truncation(tok):
  ids, mask = tokenizer_lib.encode_prompts(
      tok, ['a handwritten digit seven', 'A HANDWRITTEN digit one', 'digit'], max_len=8)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape == (3, 8)
  seven = [2, tok.token_to_id('a'), tok.token_to_id('handwritten'), tok.token_to_id('digit'),
           tok.token_to_id('seven'), 3, 0, 0]
  assert ids[0].tolist() == seven
  assert mask[0].tolist() == [True] * 6 + [False] * 2
  assert ids[1, 4] == tok.token_to_id('one')  # Lower-cased.
  assert mask[2].sum() == 3
  assert (ids[~mask] == 0).all()
  short, short_mask = tokenizer_lib.encode_prompts(tok, ['a handwritten digit seven'], max_len=4)
  assert short[0].tolist() == [2, tok.token_to_id('a'), tok.token_to_id('handwritten'), 3]
  assert short_mask.all()
  with pytest.raises(ValueError, match='max_len'):
    tokenizer_lib.encode_prompts(tok, ['x'], max_len=1)


def test_save_load_round_trip(tok, tmp_path):
  path = tokenizer_lib.save_tokenizer(tok, tmp_path / 'tok')
  assert path.endswith('tokenizer.json')
  for source in (tmp_path / 'tok', path):
    loaded = tokenizer_lib.load_tokenizer(source)
    assert loaded.get_vocab() == tok.get_vocab()
    np.testing.assert_array_equal(
        tokenizer_lib.encode_prompts(loaded, ['a handwritten digit two ?'], 10)[0],
        tokenizer_lib.encode_prompts(tok, ['a handwritten digit two ?'], 10)[0])


def test_load_errors_name_the_file(tmp_path):
  missing = tmp_path / 'none' / 'tokenizer.json'
  with pytest.raises(FileNotFoundError, match=str(missing)):
    tokenizer_lib.load_tokenizer(missing)
  broken = tmp_path / 'broken.json'
  broken.write_text('{"model": ')
  with pytest.raises(ValueError, match='broken.json: corrupt tokenizer file'):
    tokenizer_lib.load_tokenizer(broken)
  wrong = tmp_path / 'wrong.json'
  wrong.write_text('{"hello": 1}')
  with pytest.raises(ValueError, match='wrong.json: not a valid tokenizer file'):
    tokenizer_lib.load_tokenizer(wrong)
