"""Evaluation of the digits pipeline with the independent judge, and its report.

For the base generator and every alignment stage of a pipeline (`train/pipeline.py`):
  1. restore the stage's generator (EMA params when kept) and sample `per_class` images of each
     digit prompt with the stage's own sampler from one fixed key → `samples_<method>.npz` (the
     samples format of `data/samples.py`, so any judge can re-score them) and a PNG grid;
  2. judge accuracy (the scikit-learn classifier that no reward sees), and the yardstick reward
     (`config.evaluate.reward`, by default the trained VLM reward) mean and std over the samples;
     the std is the diversity column;
  3. from the base generator, best-of-N and Search over Paths with the yardstick reward as the
     verifier, at (nearly) equal model calls per image;
  4. reward mean and reward std curves of the RL stages from their metrics.jsonl (PNG), and
     `report.md` with the table, the grids and the stage timings.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from rewarddance_jax import metrics as metrics_lib
from rewarddance_jax.rewards import registry
from rewarddance_jax.train import common, generate

IMAGE_SHAPE = (16, 16, 1)
GENERATOR_TRAINERS = ('flow', 'grpo', 'refl', 'prfl', 'r0')


def _stage_generator(cfg, directory: str):
  mesh, rules = common.setup_mesh(cfg)
  graphdef, params, pshard, _ = common.build_generator(cfg, mesh, rules)
  params = common.restore_generator(directory, params, pshard, use_ema=True)
  return graphdef, params


def make_scorer(reward_cfg):
  """`score(images in [0, 1], labels) -> (R,) numpy` of the rewards `reward_cfg` builds."""
  rewards = registry.build_rewards(reward_cfg)
  fn = jax.jit(lambda r, images, labels: r.total(
      {'pixels': images, 'latents': images * 2.0 - 1.0}, {'labels': labels}, jax.random.key(0)))
  return lambda images, labels: np.asarray(fn(rewards, jnp.asarray(images),
                                              jnp.asarray(labels, jnp.int32)))


def _row(name, images, labels, judge, score, calls, steps):
  r = score(images, labels)
  return {'method': name, 'steps': steps, 'model_calls': calls,
          'judge_accuracy': float(judge.accuracy(images, labels)),
          'reward_mean': float(r.mean()), 'reward_std': float(r.std())}


def _search_rows(cfg, graphdef, params, tok, ecfg, judge, score, key, out_dir):
  """Search over Paths, then best-of-N at the nearest equal model calls, from the base."""
  kw = dict(per_class=int(ecfg.per_class), max_len=int(cfg.data.max_text_len))
  steps = int(cfg.sampler.num_steps)
  n_sop, m_sop = int(ecfg.sop_n), int(ecfg.sop_m)
  sop = generate.search_digits(graphdef, params, tok, cfg.sampler, score, key=key, method='sop',
                               n=n_sop, m=m_sop, delta_f=float(ecfg.sop_delta_f),
                               every=int(ecfg.sop_every), **kw)
  n_bon = max(1, int(round(sop[3] / steps)))
  bon = generate.search_digits(graphdef, params, tok, cfg.sampler, score,
                               key=jax.random.fold_in(key, 2), method='bon', n=n_bon, **kw)
  rows = []
  for name, tag, (images, labels, prompts, calls) in (
      (f'base + best-of-{n_bon}', 'bon', bon),
      (f'base + search over paths (N={n_sop}, M={m_sop})', 'sop', sop)):
    generate.write_samples(out_dir, f'samples_base_{tag}', images, labels, prompts)
    rows.append(_row(name, images, labels, judge, score, calls, steps))
  return rows


def _curves(stage_names, dirs, out_dir) -> list[str]:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  written = []
  for key, title in (('reward_mean', 'training reward (mean over the rollouts)'),
                     ('reward_std', 'training reward std (within an iteration)')):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    any_line = False
    for name in stage_names:
      path = os.path.join(dirs[name], 'metrics.jsonl')
      if not os.path.exists(path):
        continue
      pts = [(m['step'], m[key]) for m in metrics_lib.read_metrics(dirs[name]) if key in m]
      if pts:
        ax.plot(*zip(*pts), label=name)
        any_line = True
    if any_line:
      ax.set_xlabel('iteration')
      ax.set_title(title)
      ax.legend(fontsize=7)
      path = os.path.join(out_dir, f'curve_{key}.png')
      fig.tight_layout()
      fig.savefig(path, dpi=110)
      written.append(os.path.basename(path))
    plt.close(fig)
  return written


def format_table(rows) -> str:
  head = ('| method | sampler steps | model calls / image | judge accuracy | reward mean | '
          'reward std |\n|---|---|---|---|---|---|\n')
  return head + ''.join(
      f"| {r['method']} | {r['steps']} | {r['model_calls']} | {100 * r['judge_accuracy']:.1f}% | "
      f"{r['reward_mean']:.4f} | {r['reward_std']:.4f} |\n" for r in rows)


def evaluate_pipeline(config, workdir: str, records: dict) -> dict:
  from rewarddance_jax import judge as judge_lib  # pylint: disable=import-outside-toplevel
  from rewarddance_jax.train import pipeline  # pylint: disable=import-outside-toplevel
  ecfg = config.evaluate
  dirs = pipeline.stage_dirs(config, workdir)
  score = make_scorer(pipeline._fill(ecfg.reward.to_dict(), dirs))  # pylint: disable=protected-access
  judge = judge_lib.DigitJudge.load_or_train()
  tok = common.digits_tokenizer(None)
  key = jax.random.key(int(config.seed) + 1000)
  rows, grids, rl_stages = [], [], []
  for index, name in enumerate(pipeline.stage_names(config)):
    cfg = pipeline.stage_config(config.stages[name], dirs, int(config.seed) + index)
    if cfg.trainer not in GENERATOR_TRAINERS:
      continue
    graphdef, params = _stage_generator(cfg, dirs[name])
    sample_fn = generate.make_sampler(graphdef, cfg.sampler, IMAGE_SHAPE)
    images, labels, prompts = generate.sample_digits(
        sample_fn, params, tok, per_class=int(ecfg.per_class),
        max_len=int(cfg.data.max_text_len), key=key)
    generate.write_samples(workdir, f'samples_{name}', images, labels, prompts)
    grids.append((name, f'samples_{name}.png'))
    steps = int(cfg.sampler.num_steps)
    rows.append(_row(name, images, labels, judge, score, steps, steps))
    if cfg.trainer == 'flow':
      if int(ecfg.get('sop_n', 0)) > 0:
        rows += _search_rows(cfg, graphdef, params, tok, ecfg, judge, score, key, workdir)
        grids += [(r['method'], f'samples_base_{t}.png') for r, t in zip(rows[-2:],
                                                                          ('bon', 'sop'))]
    else:
      rl_stages.append(name)
  curves = _curves(rl_stages, dirs, workdir)
  table = format_table(rows)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump({'seed': int(config.seed), 'rows': rows, 'stages': records}, f, indent=1)
  lines = ['# Digits alignment pipeline: report', '',
           f'Seed {int(config.seed)}. Judge: the scikit-learn digit classifier trained on real '
           'digits that no reward sees. Reward: the yardstick reward '
           f'`{json.dumps(ecfg.reward.to_dict())}` on {10 * int(ecfg.per_class)} samples '
           '(10 digit prompts × per_class, one fixed key); reward std is the diversity column.',
           '', table, '## Stages', '', '| stage | trainer | wall time |', '|---|---|---|']
  lines += [f"| {n} | {r['trainer']} | {r['seconds']:.0f} s |" for n, r in records.items()]
  lines += ['', '## Samples (one row per digit)', '']
  lines += [f'**{name}**\n\n![{name}]({png})\n' for name, png in grids]
  if curves:
    lines += ['## Training curves', ''] + [f'![{c}]({c})\n' for c in curves]
  path = os.path.join(workdir, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return {'path': path, 'rows': rows, 'summary': table}
