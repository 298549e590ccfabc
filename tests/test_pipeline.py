"""The digits pipeline (`trainer: pipeline`): stages, skip-when-done, the report, its targets, and
reproducibility, on a two-stage tiny pipeline (base + GRPO with a rule reward)."""

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from rewarddance_jax import evaluate
from rewarddance_jax.data import samples as samples_lib
from rewarddance_jax.train import pipeline



def _config(seed=0):
  c = ml_collections.ConfigDict()
  c.trainer = 'pipeline'
  c.seed = seed
  no_samples = {'samples': {'every': 0}}
  c.order = ('base', 'grpo')
  c.stages = {
      'base': dict(config='configs.digits.flow', arg='runlocal,steps=4', overrides=no_samples),
      'grpo': dict(config='configs.digits.grpo', arg='runlocal,init={base},steps=2',
                   needs=['base'], overrides=no_samples),
  }
  c.evaluate = dict(per_class=1, sop_n=2, sop_m=1, sop_delta_f=0.25, sop_every=2,
                    reward={'proto': dict(kind='digit_prototype')})
  c.targets = dict(base_judge=(0.0, 1.0), grpo_stage='grpo', grpo_gain=-1.0, std_ratio=0.0,
                   minutes=60)
  return c


def test_pipeline_runs_skips_finished_stages_and_reproduces(tmp_path, monkeypatch, capsys):
  out = pipeline.train(_config(), str(tmp_path / 'a'))
  report = open(out['report']).read()
  for name in ('base', 'grpo'):
    assert os.path.isfile(tmp_path / 'a' / name / pipeline.DONE)
    s = samples_lib.load_samples(str(tmp_path / 'a' / f'samples_{name}.npz'))
    assert s['images'].shape == (10, 16, 16, 1) and list(s['labels']) == list(range(10))
    assert f'| {name} |' in report
  results = json.load(open(tmp_path / 'a' / 'results.json'))
  methods = [r['method'] for r in results['rows']]
  assert methods[0] == 'base' and methods[-1] == 'grpo'
  assert any('best-of-' in m for m in methods) and any('search over paths' in m for m in methods)
  assert results['checks'] and all(c['passed'] for c in results['checks']), results['checks']
  assert '## Targets' in report

  # A second run of the same workdir skips every stage (no trainer is called) ...
  monkeypatch.setattr('rewarddance_jax.train.get_trainer',
                      lambda name: pytest.fail(f'trainer {name} re-ran'))
  again = pipeline.train(_config(), str(tmp_path / 'a'))
  assert json.load(open(tmp_path / 'a' / 'results.json'))['rows'] == results['rows']
  assert again['report'] == out['report']
  monkeypatch.undo()
  # ... and a fresh workdir with the same seed (and the same base, whose own resume and
  # determinism tests/test_train_flow.py covers) gives the same table.
  shutil.copytree(tmp_path / 'a' / 'base', tmp_path / 'b' / 'base')
  pipeline.train(_config(), str(tmp_path / 'b'))
  assert json.load(open(tmp_path / 'b' / 'results.json'))['rows'] == results['rows']
  table, rows = evaluate.summarize_runs([str(tmp_path / 'a'), str(tmp_path / 'b')])
  assert '| base |' in table and all(r['judge_accuracy']['min'] == r['judge_accuracy']['max']
                                     for r in rows)


def test_a_stage_stopped_by_sigterm_is_not_done_and_stops_the_pipeline(tmp_path, monkeypatch,
                                                                       capsys):
  calls = []

  def trainer(stopped_at):
    def run(cfg, directory):
      calls.append(os.path.basename(directory))
      os.makedirs(directory, exist_ok=True)
      return {'step': stopped_at if stopped_at is not None else int(cfg.total_steps)}
    return run

  # The base's trainer returns at step 1 of 4 (what SIGTERM makes it do): not done, grpo and the
  # evaluation do not run.
  monkeypatch.setattr('rewarddance_jax.train.get_trainer', lambda name: trainer(1))
  assert pipeline.train(_config(), str(tmp_path)) == {'report': None}
  assert calls == ['base'] and not os.path.exists(tmp_path / 'base' / pipeline.DONE)
  assert 'base stopped at step 1 of 4' in capsys.readouterr().out
  # The re-run resumes the base (called again) and goes on.
  monkeypatch.setattr('rewarddance_jax.train.get_trainer', lambda name: trainer(None))
  records = pipeline.run_stages(_config(), str(tmp_path))
  assert calls == ['base', 'base', 'grpo'] and sorted(records) == ['base', 'grpo']
  assert os.path.isfile(tmp_path / 'base' / pipeline.DONE)


def test_acceptance_checks_by_hand(tmp_path):
  rows = [dict(method='base', judge_accuracy=0.5, reward_mean=0.3, reward_std=0.2, model_calls=20),
          dict(method='base + best-of-11', judge_accuracy=0.6, reward_mean=0.7, reward_std=0.3,
               model_calls=220),
          dict(method='base + search over paths (N=4, M=2)', judge_accuracy=0.7, reward_mean=0.8,
               reward_std=0.3, model_calls=212),
          dict(method='grpo_vlm', judge_accuracy=0.66, reward_mean=0.6, reward_std=0.3,
               model_calls=20),
          dict(method='refl', judge_accuracy=0.5, reward_mean=0.6, reward_std=0.3, model_calls=20)]
  os.makedirs(tmp_path / 'grpo_vlm')
  with open(tmp_path / 'grpo_vlm' / 'metrics.jsonl', 'w') as f:
    for step, std in ((10, 0.4), (20, 0.3), (30, 0.21)):
      f.write(json.dumps({'step': step, 'reward_window_std': std}) + '\n')
  dirs = {'base': '', 'grpo_vlm': str(tmp_path / 'grpo_vlm'), 'refl': ''}
  records = {'base': {'seconds': 300}, 'grpo_vlm': {'seconds': 400}, 'refl': {'seconds': 201}}
  targets = dict(base_judge=(0.4, 0.75), grpo_stage='grpo_vlm', grpo_gain=0.15, std_ratio=0.5,
                 minutes=15)
  got = {c.split(' ')[0] + ('' if 'std' not in c else ' std'): (m, p)
         for c, m, p in evaluate.acceptance_checks(rows, dirs, records, targets)}
  assert got['base'] == ('50.0%', True)
  assert got['grpo_vlm'] == ('+16.0 points', True)
  assert got['grpo_vlm std'] == ('0.400 → 0.210 (52%)', True)
  assert got['refl'] == ('+0.0 points', False)      # equal is not an improvement
  assert got['search'][1] is True
  assert got['stages'] == ('15.0 min', False)        # 901 s > 15 min


def test_summarize_runs_mean_and_spread(tmp_path):
  for seed, acc in ((0, 0.5), (1, 0.7)):
    os.makedirs(tmp_path / str(seed))
    with open(tmp_path / str(seed) / 'results.json', 'w') as f:
      json.dump({'seed': seed, 'rows': [dict(method='base', judge_accuracy=acc, reward_mean=acc,
                                             reward_std=0.1)]}, f)
  table, rows = evaluate.summarize_runs([str(tmp_path / '0'), str(tmp_path / '1')])
  assert rows[0]['judge_accuracy'] == {'mean': 0.6, 'min': 0.5, 'max': 0.7}
  assert '60.0% [50.0 – 70.0]' in table
  with pytest.raises(FileNotFoundError, match='results.json'):
    evaluate.summarize_runs([str(tmp_path / 'missing')])


def test_pixel_diversity_by_hand():
  # Prompt 0: two images differing by 1 in one of 4 pixels → per-pixel std (0.5, 0, 0, 0), mean
  # 0.125; prompt 1: identical images → 0. The mean over prompts is 0.0625.
  images = np.zeros((4, 2, 2, 1), np.float32)
  images[1, 0, 0, 0] = 1.0
  images[2:] = 0.3
  assert evaluate.pixel_diversity(images, np.array([0, 0, 1, 1])) == pytest.approx(0.0625)
