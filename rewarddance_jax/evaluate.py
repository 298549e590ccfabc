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

from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.families.digits import LATENT_SHAPE
from rewarddance_jax import metrics as metrics_lib
from rewarddance_jax.parallel import rng as rng_lib
from rewarddance_jax.rewards import registry
from rewarddance_jax.train import common, generate

GENERATOR_TRAINERS = ('flow', 'grpo', 'refl', 'prfl', 'r0')


def _stage_generator(cfg, directory: str):
  mesh, rules = common.setup_mesh(cfg)
  graphdef, params, pshard, _ = common.build_generator(cfg, mesh, rules, abstract=True)
  params = common.restore_generator(directory, params, pshard, use_ema=True)
  return graphdef, params


def make_scorer(reward_cfg):
  """`score(images in [0, 1], labels) -> (R,) numpy` of the rewards `reward_cfg` builds."""
  rewards = registry.build_rewards(reward_cfg)
  fn = jax.jit(lambda r, images, labels: r.total(
      {'pixels': images, 'latents': images * 2.0 - 1.0}, {'labels': labels}, jax.random.key(0)))
  return lambda images, labels: np.asarray(fn(rewards, jnp.asarray(images),
                                              jnp.asarray(labels, jnp.int32)))


def pixel_diversity(images, labels) -> float:
  """Mean over prompts of the per-pixel std of that prompt's images (image-space diversity;
  0 when every sample of a prompt is the same image). Unlike the reward std it does not vanish
  when a bounded reward saturates."""
  images = np.asarray(images, np.float64).reshape(len(labels), -1)
  labels = np.asarray(labels)
  return float(np.mean([images[labels == c].std(axis=0).mean() for c in np.unique(labels)]))


def _row(name, images, labels, judge, score, calls, steps):
  r = score(images, labels)
  return {'method': name, 'steps': steps, 'model_calls': calls,
          'judge_accuracy': float(judge.accuracy(images, labels)),
          'reward_mean': float(r.mean()), 'reward_std': float(r.std()),
          'pixel_std': pixel_diversity(images, labels)}


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
          'reward std | pixel std within prompt |\n|---|---|---|---|---|---|---|\n')
  pix = lambda r: f"{r['pixel_std']:.4f}" if 'pixel_std' in r else '–'  # pylint: disable=unnecessary-lambda-assignment
  return head + ''.join(
      f"| {r['method']} | {r['steps']} | {r['model_calls']} | {100 * r['judge_accuracy']:.1f}% | "
      f"{r['reward_mean']:.4f} | {r['reward_std']:.4f} | {pix(r)} |\n" for r in rows)


def _window_std(directory: str) -> tuple[float, float] | None:
  """(first, last) logged reward-variance window std of an RL stage (docs/algorithms.md §3.8)."""
  pts = [m['reward_window_std'] for m in metrics_lib.read_metrics(directory)
         if 'reward_window_std' in m] if os.path.exists(
             os.path.join(directory, 'metrics.jsonl')) else []
  return (pts[0], pts[-1]) if pts else None


def acceptance_checks(rows, dirs: dict, records: dict, targets) -> list[tuple[str, str, bool]]:
  """The main job's targets (issue 7) checked on this run: (criterion, measured, passed)."""
  by = {r['method']: r for r in rows}
  out = []
  if 'base' not in by:
    return out
  base = by['base']['judge_accuracy']
  lo, hi = targets['base_judge']
  out.append((f'base judge accuracy in [{lo:.0%}, {hi:.0%}]', f'{base:.1%}', lo <= base <= hi))
  grpo = targets['grpo_stage']
  if grpo in by:
    gain = by[grpo]['judge_accuracy'] - base
    out.append((f'{grpo} raises the judge by ≥ {100 * targets["grpo_gain"]:.0f} points',
                f'{100 * gain:+.1f} points', gain >= targets['grpo_gain']))
    window = _window_std(dirs[grpo])
    if window:
      ratio = window[1] / max(window[0], 1e-12)
      out.append((f'{grpo} reward std at the end ≥ {targets["std_ratio"]:.0%} of its start '
                  '(reward-variance window)', f'{window[0]:.3f} → {window[1]:.3f} ({ratio:.0%})',
                  ratio >= targets['std_ratio']))
  for r in rows:
    if r['method'] in dirs and r['method'] not in ('base', grpo):
      gain = r['judge_accuracy'] - base
      out.append((f'{r["method"]} improves the judge over the base', f'{100 * gain:+.1f} points',
                  gain > 0))
  bon = [r for r in rows if 'best-of-' in r['method']]
  sop = [r for r in rows if 'search over paths' in r['method']]
  if bon and sop:
    b, s = bon[0], sop[0]
    out.append(('search over paths ≥ best-of-N at equal model calls (verifier reward; judge)',
                f"{s['reward_mean']:.4f} vs {b['reward_mean']:.4f} at {s['model_calls']} vs "
                f"{b['model_calls']} calls; judge {100 * s['judge_accuracy']:.1f}% vs "
                f"{100 * b['judge_accuracy']:.1f}%",
                s['reward_mean'] >= b['reward_mean'] and s['model_calls'] <= b['model_calls']))
  total = sum(r['seconds'] for r in records.values())
  out.append((f'stages ≤ {targets["minutes"]} minutes (sum of the stage wall times, this machine)',
              f'{total / 60:.1f} min', total <= 60 * targets['minutes']))
  return out


def evaluate_pipeline(config, workdir: str, records: dict, stages, reward_cfg) -> dict:
  """The report of a finished pipeline run. stages: [(name, stage config, directory)] in run
  order; reward_cfg: `config.evaluate.reward` with its `{stage}` placeholders filled (both from
  `train/pipeline.py`, which calls this)."""
  from rewarddance_jax import judge as judge_lib  # pylint: disable=import-outside-toplevel
  ecfg = config.evaluate
  dirs = {name: directory for name, _, directory in stages}
  score = make_scorer(reward_cfg)
  judge = judge_lib.DigitJudge.load_or_train()
  tok = tokenizer_lib.load_or_build(None)
  key = rng_lib.key(config.seed, 'evaluate')
  rows, grids, rl_stages = [], [], []
  for name, cfg, _ in stages:
    if cfg.trainer not in GENERATOR_TRAINERS:
      continue
    graphdef, params = _stage_generator(cfg, dirs[name])
    sample_fn = generate.make_sampler(graphdef, cfg.sampler, LATENT_SHAPE)
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
  checks = acceptance_checks(rows, dirs, records, config.targets) if 'targets' in config else []
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump({'seed': int(config.seed), 'rows': rows, 'stages': records,
               'checks': [dict(criterion=c, measured=m, passed=p) for c, m, p in checks]}, f,
              indent=1)
  lines = ['# Digits alignment pipeline: report', '',
           f'Seed {int(config.seed)}. Judge: the scikit-learn digit classifier trained on real '
           'digits that no reward sees. Reward: the yardstick reward '
           f'`{json.dumps(ecfg.reward.to_dict())}` on {10 * int(ecfg.per_class)} samples '
           '(10 digit prompts × per_class, one fixed key). Diversity: the reward std, and the '
           'per-pixel std among the samples of a prompt, averaged over prompts (the reward std '
           'vanishes when a bounded reward saturates; the pixel std does not).',
           '', table, '## Stages', '', '| stage | trainer | wall time |', '|---|---|---|']
  lines += [f"| {n} | {r['trainer']} | {r['seconds']:.0f} s |" for n, r in records.items()]
  if checks:
    lines += ['', '## Targets', '', '| target | measured | met |', '|---|---|---|']
    lines += [f"| {c} | {m} | {'yes' if p else '**no**'} |" for c, m, p in checks]
  lines += ['', '## Samples (one row per digit)', '']
  lines += [f'**{name}**\n\n![{name}]({png})\n' for name, png in grids]
  if curves:
    lines += ['## Training curves', ''] + [f'![{c}]({c})\n' for c in curves]
  path = os.path.join(workdir, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  summary = table + ''.join(f"{'ok ' if p else 'NO '} {c}: {m}\n" for c, m, p in checks)
  return {'path': path, 'rows': rows, 'summary': summary}


def summarize_runs(workdirs) -> tuple[str, list[dict]]:
  """Mean and spread (min–max) per method over several pipeline runs (e.g. two seeds), from
  their `results.json`; returns (markdown table, rows)."""
  runs = []
  for d in workdirs:
    path = os.path.join(d, 'results.json')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: no results.json (run the pipeline there first).')
    with open(path) as f:
      runs.append(json.load(f))
  methods = [r['method'] for r in runs[0]['rows']]
  out = []
  for m in methods:
    vals = [next((r for r in run['rows'] if r['method'] == m), None) for run in runs]
    if any(v is None for v in vals):
      continue
    row = {'method': m, 'seeds': [run['seed'] for run in runs]}
    for k in ('judge_accuracy', 'reward_mean', 'reward_std', 'pixel_std'):
      if any(k not in v for v in vals):
        continue
      xs = np.array([v[k] for v in vals], np.float64)
      row[k] = {'mean': float(xs.mean()), 'min': float(xs.min()), 'max': float(xs.max())}
    out.append(row)
  seeds = ', '.join(str(run['seed']) for run in runs)
  table = (f'Seeds {seeds}: mean [min – max]\n\n| method | judge accuracy | reward mean | '
           'reward std | pixel std within prompt |\n|---|---|---|---|---|\n')
  def fmt(d, pct):
    if d is None:
      return '–'
    if pct:
      return f"{100 * d['mean']:.1f}% [{100 * d['min']:.1f} – {100 * d['max']:.1f}]"
    return f"{d['mean']:.4f} [{d['min']:.4f} – {d['max']:.4f}]"

  table += ''.join(f"| {r['method']} | {fmt(r['judge_accuracy'], True)} | "
                   f"{fmt(r['reward_mean'], False)} | {fmt(r['reward_std'], False)} | "
                   f"{fmt(r.get('pixel_std'), False)} |\n" for r in out)
  return table, out
