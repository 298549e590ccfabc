"""The digits alignment pipeline (`trainer: pipeline`): every stage for real, then the report.

`config.order` lists the stage names in run order; `config.stages` maps each name to
`{config, arg, overrides, replace, needs}`:
  config     a config module ('configs.digits.flow'), whose `get_config(arg)` builds the stage;
  arg        its argument string; `{stage}` placeholders become that stage's directory;
  overrides  a nested dict merged into the stage config after it is built (placeholders allowed);
  replace    sections set wholesale (e.g. `rewards`), also with placeholders;
  needs      optional list of stages that must have run (checked before anything starts).
Each stage runs its own trainer in `WORKDIR/<name>` with the seed of its name's stream
(`parallel.rng.seed_for(config.seed, name)`) and the pipeline's `resume_with_changes`. A finished stage
leaves `DONE.json` (wall time, trainer result) and is skipped on the next run; an interrupted one
resumes from its own checkpoints, so re-running the command picks up where it stopped. A stage
stopped by SIGTERM (its trainer saves a checkpoint and returns before its last step) stops the
pipeline there, without DONE.json, later stages or the evaluation.

Then `rewarddance_jax.evaluate.evaluate_pipeline` writes `WORKDIR/report.md` (judge accuracy,
reward mean/std per method, best-of-N and Search over Paths rows, sample grids, curves) and the
summary table is printed.
"""

from __future__ import annotations

import importlib
import json
import os
import time

from absl import logging

from rewarddance_jax.parallel import rng as rng_lib

DONE = 'DONE.json'


def _fill(value, dirs: dict[str, str]):
  """Replaces `{stage}` placeholders in strings (recursively in dicts and lists)."""
  if isinstance(value, str):
    for name, path in dirs.items():
      value = value.replace('{' + name + '}', path)
    return value
  if isinstance(value, dict):
    return {k: _fill(v, dirs) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_fill(v, dirs) for v in value)
  return value


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def stage_config(spec, dirs: dict[str, str], seed: int):
  """The stage's ConfigDict: `get_config(arg)` of its module, then the overrides, then the seed."""
  module = importlib.import_module(spec['config'])
  cfg = module.get_config(_fill(spec.get('arg', ''), dirs) or None)
  plain = lambda v: v.to_dict() if hasattr(v, 'to_dict') else v  # pylint: disable=unnecessary-lambda-assignment
  overrides = _fill(plain(spec.get('overrides', {})), dirs)
  try:
    cfg.update_from_flattened_dict(_flatten(overrides))
  except KeyError as e:
    raise KeyError(f'config.stages: an override names a key the stage config lacks: {e}') from None
  for section, value in _fill(plain(spec.get('replace', {})), dirs).items():
    cfg[section] = value
  cfg.seed = seed
  return cfg


def stage_names(config) -> list[str]:
  """The stages in run order; `config.order` must name each configured stage once."""
  order = list(config.order)
  if sorted(order) != sorted(config.stages) or len(set(order)) != len(order):
    raise ValueError(f'config.order={order} must list each of config.stages '
                     f'{sorted(config.stages)} exactly once.')
  return order


def stage_dirs(config, workdir: str) -> dict[str, str]:
  return {name: os.path.join(workdir, name) for name in stage_names(config)}


def is_done(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, DONE))


def run_stages(config, workdir: str) -> dict[str, dict] | None:
  """Runs every unfinished stage in order; returns name -> DONE record, or None when a stage
  stopped before its last step (SIGTERM), which is then left unfinished to resume."""
  from rewarddance_jax.train import get_trainer  # pylint: disable=import-outside-toplevel
  dirs = stage_dirs(config, workdir)
  names = stage_names(config)
  for pos, name in enumerate(names):
    for need in config.stages[name].get('needs', []):
      if need not in names[:pos]:
        raise ValueError(f'config.stages.{name} needs stage {need!r}, which does not run before '
                         f'it (config.order={names}).')
  records = {}
  for index, name in enumerate(names):
    directory = dirs[name]
    if is_done(directory):
      with open(os.path.join(directory, DONE)) as f:
        records[name] = json.load(f)
      logging.info('[%d/%d] %s: done earlier (%.0f s), skipped.', index + 1, len(names), name,
                   records[name]['seconds'])
      continue
    cfg = stage_config(config.stages[name], dirs, rng_lib.seed_for(config.seed, name))
    cfg.resume_with_changes = bool(config.get('resume_with_changes', False))
    logging.info('[%d/%d] %s: trainer %s in %s', index + 1, len(names), name, cfg.trainer,
                 directory)
    print(f'== [{index + 1}/{len(names)}] {name} ({cfg.trainer})', flush=True)
    t0 = time.time()
    result = get_trainer(cfg.trainer)(cfg, directory)
    last, total = int((result or {}).get('step', cfg.total_steps)), int(cfg.total_steps)
    if last < total:
      # The trainer returned early (SIGTERM: checkpoint saved). The stage is not done: no
      # DONE.json, no later stage, no evaluation; the next run resumes it from the checkpoint.
      print(f'== {name} stopped at step {last} of {total} (checkpoint saved); re-run the same '
            'command to resume it.', flush=True)
      return None
    record = {'seconds': time.time() - t0, 'trainer': cfg.trainer,
              'result': {k: v for k, v in (result or {}).items()
                         if isinstance(v, (int, float, str))}}
    with open(os.path.join(directory, DONE), 'w') as f:
      json.dump(record, f, indent=1)
    records[name] = record
  return records


def train(config, workdir: str) -> dict:
  from rewarddance_jax import evaluate  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  records = run_stages(config, workdir)
  if records is None:
    return {'report': None}
  dirs = stage_dirs(config, workdir)
  stages = [(name, stage_config(config.stages[name], dirs, rng_lib.seed_for(config.seed, name)),
             dirs[name]) for name in stage_names(config)]
  report = evaluate.evaluate_pipeline(config, workdir, records, stages,
                                      _fill(config.evaluate.reward.to_dict(), dirs))
  print(report['summary'], flush=True)
  print(f'pipeline: {time.time() - t0:.0f} s this run; report at {report["path"]}', flush=True)
  return {'report': report['path']}
