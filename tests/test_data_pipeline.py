"""Tests for rewarddance_jax.data.pipeline: Grain digits and prompt iterators, per-host, resume."""

import json

import grain
import numpy as np
import pytest

from rewarddance_jax.data import digits
from rewarddance_jax.data import pipeline
from rewarddance_jax.data import prompts
from rewarddance_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.build_digits_tokenizer()


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      if key == 'prompts':
        assert x[key] == y[key]
      else:
        np.testing.assert_array_equal(x[key], y[key])


def test_digits_batch_contents(tok):
  it = pipeline.digits_train_iter(16, seed=0, tokenizer=tok, max_len=8, process_index=0,
                                  process_count=1)
  assert isinstance(it, grain.DatasetIterator)
  batch = next(it)
  assert batch['images'].shape == (16, 16, 16, 1) and batch['images'].dtype == np.float32
  assert batch['labels'].shape == (16,) and batch['labels'].dtype == np.int32
  assert batch['tokens'].shape == (16, 8) and batch['tokens'].dtype == np.int32
  assert batch['mask'].shape == (16, 8) and batch['mask'].dtype == np.bool_
  expected, expected_mask = tokenizer_lib.encode_prompts(
      tok, [digits.prompt_for_label(label) for label in batch['labels']], 8)
  np.testing.assert_array_equal(batch['tokens'], expected)
  np.testing.assert_array_equal(batch['mask'], expected_mask)
  # Every image is a real training digit with its own label.
  train = digits.load_split('train')
  lookup = {img.tobytes(): label for img, label in zip(train['images'], train['labels'])}
  assert [lookup[img.tobytes()] for img in batch['images']] == batch['labels'].tolist()


def test_digits_epochs_cover_split_and_reshuffle():
  train_labels = digits.load_split('train')['labels']
  batch = 479  # 1437 = 3 * 479: an epoch is exactly 3 batches.
  assert len(train_labels) == 3 * batch
  it = pipeline.digits_train_iter(batch, seed=3, process_index=0, process_count=1)
  epochs = [np.concatenate([b['labels'] for b in _take(it, 3)]) for _ in range(2)]
  for labels in epochs:
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(train_labels))
  assert not np.array_equal(epochs[0], epochs[1])  # A new permutation every epoch.


def test_digits_resume_reproduces_batches(tok):
  kwargs = dict(seed=5, tokenizer=tok, max_len=8, process_index=0, process_count=1)
  it = pipeline.digits_train_iter(32, **kwargs)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # The state must survive a JSON checkpoint.
  expected = _take(it, 4)
  resumed = pipeline.digits_train_iter(32, **kwargs)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 4), expected)


def test_digits_hosts_partition_the_global_batch():
  global_batches = _take(pipeline.digits_train_iter(12, seed=1, process_index=0,
                                                    process_count=1), 3)
  hosts = [_take(pipeline.digits_train_iter(12, seed=1, process_index=h, process_count=3), 3)
           for h in range(3)]
  for step, global_batch in enumerate(global_batches):
    host_batches = [hosts[h][step] for h in range(3)]
    assert all(b['images'].shape[0] == 4 for b in host_batches)
    # Host h holds the h-th block of 4 rows: the blocks in host order are the global batch.
    for key in ('labels', 'images', 'tokens'):
      rebuilt = np.concatenate([b[key] for b in host_batches])
      np.testing.assert_array_equal(rebuilt, global_batch[key])


def test_digits_batch_must_divide_process_count():
  with pytest.raises(ValueError, match='batch_size=10 must be a positive multiple of '
                     'process_count=4'):
    pipeline.digits_train_iter(10, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match='process_index=4'):
    pipeline.digits_train_iter(8, seed=0, process_index=4, process_count=4)


def test_digits_default_process_layout_is_jax():
  batch = next(pipeline.digits_train_iter(8, seed=0))
  assert batch['images'].shape[0] == 8  # One process in tests.


def test_prompt_iter_groups_and_resume(tok):
  records = prompts.digits_prompt_records()
  kwargs = dict(seed=2, tokenizer=tok, max_len=8, repeat_each=4, process_index=0,
                process_count=1)
  it = pipeline.prompt_iter(records, 8, **kwargs)
  first = next(it)
  assert first['ids'].shape == (8,) and first['ids'].dtype == np.int32
  assert first['tokens'].shape == (8, 8) and first['mask'].dtype == np.bool_
  assert isinstance(first['prompts'], list) and len(first['prompts']) == 8
  groups = first['ids'].reshape(2, 4)
  assert (groups == groups[:, :1]).all() and groups[0, 0] != groups[1, 0]
  for row, prompt in zip(first['ids'], first['prompts']):
    assert prompt == records[row].prompt
  np.testing.assert_array_equal(
      first['tokens'], tokenizer_lib.encode_prompts(tok, first['prompts'], 8)[0])
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 5)
  resumed = pipeline.prompt_iter(records, 8, **kwargs)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 5), expected)


def test_prompt_iter_epoch_visits_every_prompt_once(tok):
  records = prompts.digits_prompt_records()
  it = pipeline.prompt_iter(records, 10, seed=0, tokenizer=tok, max_len=8, repeat_each=2,
                            process_index=0, process_count=1)
  ids = np.concatenate([next(it)['ids'][::2] for _ in range(2)])
  assert sorted(ids.tolist()) == list(range(10))


def test_prompt_iter_per_host_and_divisibility(tok):
  records = [f'prompt {i}' for i in range(7)]
  hosts = [next(pipeline.prompt_iter(records, 8, seed=0, tokenizer=tok, max_len=6, repeat_each=2,
                                     process_index=h, process_count=2)) for h in range(2)]
  assert all(len(b['prompts']) == 4 for b in hosts)
  assert set(hosts[0]['ids'].tolist()).isdisjoint(hosts[1]['ids'].tolist())
  whole = next(pipeline.prompt_iter(records, 8, seed=0, tokenizer=tok, max_len=6, repeat_each=2,
                                    process_index=0, process_count=1))
  assert hosts[0]['prompts'] + hosts[1]['prompts'] == whole['prompts']
  np.testing.assert_array_equal(np.concatenate([b['ids'] for b in hosts]), whole['ids'])
  with pytest.raises(ValueError, match='divisible by repeat_each=3'):
    pipeline.prompt_iter(records, 8, seed=0, tokenizer=tok, max_len=6, repeat_each=3,
                         process_index=0, process_count=1)
  with pytest.raises(ValueError, match='process_count=3'):
    pipeline.prompt_iter(records, 8, seed=0, tokenizer=tok, max_len=6, process_index=0,
                         process_count=3)
  with pytest.raises(ValueError, match='empty'):
    pipeline.prompt_iter([], 8, seed=0, tokenizer=tok, max_len=6, process_index=0,
                         process_count=1)
