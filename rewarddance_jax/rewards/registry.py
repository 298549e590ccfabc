"""Rewards by name from the config: `config.rewards = {name: {kind, weight, ...options}}`.

Each entry becomes one `Reward` of a `WeightedRewards`; `kind` defaults to the entry's name and
the remaining keys are the factory's options. Rule rewards are registered here; trained reward
models register a loader that reads their checkpoint directory.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from rewarddance_jax import config_lib
from rewarddance_jax.rewards import base, rules

Builder = Callable[..., base.Reward]


def prompt_table(prompts: str) -> list[str] | None:
  """The prompt strings of a vlm_yes `prompts` option: 'digits' (the ten digit prompts), '' (none:
  the batch carries token ids), a directory written by `launch.encode_prompts` (its
  prompts.jsonl, in the order of the prompt ids its batches carry) or a .jsonl/.csv prompt file."""
  from rewarddance_jax.data import digits, prompts as prompts_lib  # pylint: disable=import-outside-toplevel
  if prompts == 'digits':
    return [digits.prompt_for_label(l) for l in range(10)]
  if not prompts:
    return None
  if os.path.isdir(prompts):
    path = os.path.join(prompts, 'prompts.jsonl')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: not an encoded prompts directory (launch.encode_prompts '
                              'writes prompts.jsonl).')
    with open(path, encoding='utf-8') as f:
      return [json.loads(line)['prompt'] for line in f if line.strip()]
  return [r.prompt for r in prompts_lib.load_prompt_file(prompts)]


def _vlm_yes(name: str, path: str, mode: str = 'pointwise', normalization: str = 'two_way',
             prompts: str = 'digits', prompt_index: str = 'labels', ref_images: str = '',
             native_size: int = 0, dtype: str = '', placement=None) -> base.Reward:
  """A trained VLM yes-token reward (RewardDance) saved by the vlm_reward trainer at `path`.

  prompts: 'digits' scores against the ten digit prompts; a prompt set (an encoded prompts
  directory or a prompt file, `prompt_table`) against its prompts; either table is encoded once
  and indexed by batch[prompt_index] ('labels' for the digits, 'ids' for a prompt set's
  batches); '' reads batch['vlm_ids'/'vlm_pos']. dtype: the VLM's compute dtype (e.g.
  'bfloat16'; default: as saved). placement: (mesh, rules) from `build_rewards`. ref_images: a
  samples npz of one reference image per label for the pairwise mode (else batch['ref_pixels']). native_size: see
  `vlm_yes.vlm_yes_reward`.
  """
  from rewarddance_jax.data import samples  # pylint: disable=import-outside-toplevel
  from rewarddance_jax.rewards import vlm_export  # pylint: disable=import-outside-toplevel
  table = prompt_table(prompts)
  refs = None
  if ref_images:
    loaded = samples.load_samples(ref_images)
    missing = sorted(set(range(10)) - set(loaded['labels'].tolist()))
    if missing:
      raise ValueError(f'{ref_images}: no reference image for label(s) {missing}.')
    refs = loaded['images'][[int(np.flatnonzero(loaded['labels'] == l)[0]) for l in range(10)]]
  return vlm_export.load_vlm_reward(path, mode, normalization, placement=placement,
                                    overrides={'dtype': dtype} if dtype else None,
                                    prompts=table, ref_images=refs, native_size=int(native_size),
                                    name=name, index_key=prompt_index)

def _latent(name: str, path: str, sigmas=None, output: str = 'sigmoid') -> base.Reward:
  """A trained latent reward (DiNa-LRM Thurstone or PAVRM process) of a latent_reward run."""
  from rewarddance_jax.rewards import latent  # pylint: disable=import-outside-toplevel
  sigmas = tuple(sigmas) if sigmas is not None else None
  return latent.load_reward(path, sigmas=sigmas, output=output, name=name)


BUILDERS: dict[str, Builder] = {
    'mean_intensity': lambda name: rules.mean_intensity(name=name),
    'digit_prototype': lambda name, split_seed=0: rules.digit_prototype(split_seed, name=name),
    'ink_fraction': lambda name, threshold=0.5: rules.ink_fraction(threshold, name=name),
    'vlm_yes': _vlm_yes,
    'thurstone': _latent,
    'process': _latent,
}


def register(kind: str, builder: Builder) -> None:
  """Adds a reward kind: `builder(name, **options) -> Reward`."""
  BUILDERS[kind] = builder


def build_rewards(cfg: Mapping[str, Any], mesh=None, rules=None) -> base.WeightedRewards:
  """`{name: {kind, weight, **options}}` → WeightedRewards; unknown kinds/options name the entry.
  With a mesh, builders that take `placement` (the VLM reward) shard their params by the rules
  (a large reward model is then a sharded const, not a replicated one)."""
  if not cfg:
    raise ValueError('config.rewards is empty: name at least one reward.')
  pairs = []
  for name, entry in dict(cfg).items():
    entry = dict(entry)
    kind = entry.pop('kind', name)
    weight = float(entry.pop('weight', 1.0))
    if kind not in BUILDERS:
      raise ValueError(f'config.rewards.{name}: unknown reward kind {kind!r}; known: '
                       f'{sorted(BUILDERS)}.')
    if (mesh is not None and 'placement' not in entry
        and 'placement' in inspect.signature(BUILDERS[kind]).parameters):
      entry['placement'] = (mesh, rules)
    where = f'config.rewards.{name} (kind {kind!r})'
    signature = inspect.signature(BUILDERS[kind])
    if all(p.kind != p.VAR_KEYWORD for p in signature.parameters.values()):
      config_lib.check_keys(entry, set(signature.parameters) - {'name'}, where)
    try:
      signature.bind(name, **entry)
    except TypeError as e:
      raise ValueError(f'{where}: bad options {sorted(entry)}: {e}') from None
    pairs.append((BUILDERS[kind](name, **entry), weight))
  return base.WeightedRewards(pairs)
