"""Tests for rewarddance_jax.data.prompts: jsonl/csv prompt files, TFDS source, digits prompts."""

import json
import os

import numpy as np
import pytest

from rewarddance_jax.data import digits
from rewarddance_jax.data import pipeline
from rewarddance_jax.data import prompts


def _write(path, text):
  path.write_text(text, encoding='utf-8')
  return path


def test_jsonl_records(tmp_path):
  path = _write(tmp_path / 'p.jsonl', '\n'.join([
      json.dumps({'prompt': 'a handwritten digit one'}),
      '',
      json.dumps({'prompt': 'a cat', 'id': 7, 'metadata': {'k': 1}, 'ref_image_path': 'ref/a.png'}),
  ]) + '\n')
  records = prompts.load_prompt_file(path)
  assert [r.prompt for r in records] == ['a handwritten digit one', 'a cat']
  assert records[0].id == 'p:1' and records[0].metadata == {} and records[0].ref_image_path is None
  assert records[1].id == '7' and records[1].metadata == {'k': 1}
  assert records[1].ref_image_path == os.path.join(str(tmp_path), 'ref', 'a.png')
  with pytest.raises(AttributeError):
    records[0].prompt = 'x'  # Frozen.


def test_csv_with_byte_order_mark(tmp_path):
  path = tmp_path / 'bom.csv'
  path.write_bytes('prompt\nhello\n'.encode('utf-8-sig'))
  assert [r.prompt for r in prompts.load_prompt_file(path)] == ['hello']


def test_csv_records(tmp_path):
  path = _write(tmp_path / 'p.csv',
                'id,prompt,style\n'
                'a,"a handwritten digit two, clean",bold\n'
                'b,"multi\nline",thin\n'
                ',third,\n')
  records = prompts.load_prompt_file(path)
  assert [r.prompt for r in records] == ['a handwritten digit two, clean', 'multi\nline', 'third']
  assert [r.id for r in records] == ['a', 'b', 'p:5']
  assert records[0].metadata == {'style': 'bold'}


@pytest.mark.parametrize('name,text,match', [
    ('bad.jsonl', '{"prompt": "ok"}\n{"prompt": \n', r'bad.jsonl:2: invalid JSON'),
    ('nop.jsonl', '{"prompt": "ok"}\n\n{"text": "x"}\n', r'nop.jsonl:3: missing field "prompt"'),
    ('emp.jsonl', '{"prompt": "  "}\n', r'emp.jsonl:1: field "prompt" is empty'),
    ('lst.jsonl', '["a"]\n', r'lst.jsonl:1: expected a JSON object'),
    ('meta.jsonl', '{"prompt": "a", "metadata": 3}\n', r'meta.jsonl:1: field "metadata"'),
    ('none.jsonl', '\n\n', r'none.jsonl: empty prompt file'),
    ('hdr.csv', 'text,id\nx,1\n', r'hdr.csv:1: header has no "prompt" column'),
    ('cell.csv', 'prompt,id\nok,1\n,2\n', r'cell.csv:3: field "prompt" is empty'),
    ('wide.csv', 'prompt\nok\na,b\n', r'wide.csv:3: more fields'),
    ('zero.csv', '', r'zero.csv: empty prompt file'),
    ('p.txt', 'hello\n', r'p.txt: unknown prompt file extension'),
])
def test_bad_files_name_file_and_line(tmp_path, name, text, match):
  path = _write(tmp_path / name, text)
  with pytest.raises(ValueError, match=match) as info:
    prompts.load_prompt_file(path)
  assert '\n' not in str(info.value)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='gone.jsonl'):
    prompts.load_prompt_file(tmp_path / 'gone.jsonl')


def test_digits_prompt_records():
  records = prompts.digits_prompt_records()
  assert len(records) == 10
  assert records[7].prompt == 'a handwritten digit seven'
  assert records[7].id == '7' and records[7].metadata == {'label': 7}


def test_tfds_array_record_source(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')

  class DigitPrompts(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {'prompt': tfds.features.Text(), 'label': tfds.features.Scalar(dtype=np.int64)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for record in prompts.digits_prompt_records():
        yield record.id, {'prompt': record.prompt, 'label': int(record.id)}

  builder = DigitPrompts(data_dir=str(tmp_path), file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  by_dir = prompts.tfds_prompt_source(builder.data_dir, 'train')
  by_name = prompts.tfds_prompt_source('digit_prompts', 'train', data_dir=tmp_path)
  assert len(by_dir) == len(by_name) == 10
  element = by_dir[3]
  text = element['prompt'].decode() if isinstance(element['prompt'], bytes) else element['prompt']
  assert text == digits.prompt_for_label(int(element['label']))
  # The source feeds the Grain prompt pipeline directly (bytes prompts are decoded there).
  batch = next(pipeline.prompt_iter(by_dir, 4, seed=0, max_len=8, process_count=1,
                                    process_index=0))
  assert len(batch['prompts']) == 4 and batch['tokens'].shape == (4, 8)
  for row, prompt in zip(batch['ids'], batch['prompts']):
    stored = by_dir[int(row)]['prompt']
    assert prompt == (stored.decode() if isinstance(stored, bytes) else stored)
  with pytest.raises(ValueError, match='no_such_set'):
    prompts.tfds_prompt_source('no_such_set', 'train', data_dir=tmp_path)
