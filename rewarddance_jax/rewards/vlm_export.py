"""A trained VLM reward on disk, for the RL stages: save once, load as a `Reward`.

A pretrained transformers InternVL directory also loads as a reward (`load_pretrained_parts`).
Layout of `DIR` (no pickle): `params.safetensors` (flat '/'-joined param paths, fp32),
`vlm.json` (the VLMConfig, tile spec and both prompters' settings), `tokenizer.json`.
`load_vlm_reward(DIR, mode, normalization, prompts=...)` rebuilds the graphdef from the config and
returns `vlm_yes.vlm_yes_reward(...)`, ready for `WeightedRewards`. A LoRA-trained reward is saved
with the LoRA merged into the kernels (train/vlm_lora.py), so it loads like a fully trained one.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from rewarddance_jax.models.vlm import InternVL
from rewarddance_jax.models.vlm.config import vlm_config
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.rewards import vlm_yes
from rewarddance_jax.weights import json_file, safetensors_io

PARAMS_FILE = 'params.safetensors'
CONFIG_FILE = 'vlm.json'
TOKENIZER_FILE = 'tokenizer.json'


def _flatten(tree) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in p): np.asarray(x, np.float32)
          for p, x in flat}


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for key, v in flat.items():
    parts = [int(p) if p.isdigit() else p for p in key.split('/')]
    node = tree
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return tree


def save_vlm_reward(directory: str, params, cfg, tokenizer, prompters: dict, tile_spec) -> str:
  """Writes params, config (VLMConfig + tiles + {mode: prompter settings}) and tokenizer."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  os.makedirs(directory, exist_ok=True)
  save_file(_flatten(jax.device_get(params)), os.path.join(directory, PARAMS_FILE))
  prompt_cfg = {mode: dict(template=p.template, criteria=p.criteria, max_len=p.max_len,
                           image_start=p.image_start, image_end=p.image_end, pad_id=p.pad_id,
                           yes=list(p.yes), no=list(p.no), chat_template=p.chat_template)
                for mode, p in prompters.items()}
  meta = {'vlm': dataclasses.asdict(cfg), 'tiles': dataclasses.asdict(tile_spec),
          'prompters': prompt_cfg}
  with open(os.path.join(directory, CONFIG_FILE), 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=1)
  tokenizer.save(os.path.join(directory, TOKENIZER_FILE))
  return directory


# A pretrained InternVL used as a reward as it is (RewardDance's zero-shot setting): its prompt
# settings. Answer words are kept when they are one token of the checkpoint's tokenizer.
PRETRAINED_ANSWERS = {'yes': ('yes', 'Yes'), 'no': ('no', 'No')}
PRETRAINED_IMAGE_MARKERS = ('<img>', '</img>')
PRETRAINED_MAX_LEN = 512


def _answer_words(tok, words, directory):
  kept = tuple(w for w in words if len(tok.encode(w, add_special_tokens=False).ids) == 1)
  if not kept:
    raise ValueError(f'{directory}: none of the answer words {words} is a single token of its '
                     'tokenizer.')
  return kept


def _abstract(cfg):
  """(graphdef, {'/'-joined param path: shape}) of the InternVL of `cfg`, allocating nothing."""
  with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0))))
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
  return graphdef, {'/'.join(str(getattr(k, 'key', k)) for k in p): tuple(x.shape)
                    for p, x in flat}


def _graphdef(cfg):
  """The InternVL graphdef of `cfg`, without allocating params."""
  return _abstract(cfg)[0]


def _check_tensors(path: str, tensors: dict[str, np.ndarray], expected: dict[str, tuple]) -> None:
  """One line naming the missing, unexpected and mis-shaped tensors of `path` (first 5 each)."""
  def names(keys):
    keys = sorted(keys)
    return ', '.join(keys[:5]) + (f' (+{len(keys) - 5} more)' if len(keys) > 5 else '')
  missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
  shapes = [f'{k} {tuple(tensors[k].shape)} (the config needs {expected[k]})'
            for k in sorted(set(expected) & set(tensors)) if tuple(tensors[k].shape) != expected[k]]
  problems = ([f'missing tensors {names(missing)}'] if missing else []) + (
      [f'unexpected tensors {names(extra)}'] if extra else []) + (
      [f'mis-shaped {names(shapes)}'] if shapes else [])
  if problems:
    raise ValueError(f'{path}: does not match {CONFIG_FILE}: {"; ".join(problems)}.')


def place_params(cfg, params, placement):
  """`params` of an InternVL put on the mesh in the shardings its logical names and the rules
  give (`placement` = (mesh, rules)); unchanged when placement is None."""
  if placement is None:
    return params
  from rewarddance_jax.parallel import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  mesh, rules = placement
  _, (abstract,) = sharding_lib.abstract_state(lambda: InternVL(cfg, rngs=nnx.Rngs(0)), mesh,
                                               rules)
  shardings = nnx.to_pure_dict(sharding_lib.state_shardings(abstract, mesh, rules))
  return jax.device_put(params, shardings)


def load_pretrained_parts(directory: str, placement=None, **overrides):
  """As `load_vlm_parts`, for a transformers InternVL directory (config.json, safetensors,
  tokenizer.json, chat template): one tile of the vision tower's size, the ImageNet
  normalisation, the checkpoint's chat template and <img>…</img> image markers when the
  vocabulary has them, answers yes/Yes vs no/No, prompts of up to 512 tokens."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from rewarddance_jax.weights import internvl  # pylint: disable=import-outside-toplevel

  tok_path = os.path.join(directory, TOKENIZER_FILE)
  if not os.path.isfile(tok_path):
    raise FileNotFoundError(f'{tok_path}: a pretrained InternVL reward needs the checkpoint\'s '
                            'tokenizer.json.')
  cfg, params = internvl.load_internvl(directory, **overrides)
  tok = tokenizers.Tokenizer.from_file(tok_path)
  tile_spec = vlm_yes.TileSpec(size=cfg.vision.image_size)
  start, end = (m if tok.token_to_id(m) is not None else None for m in PRETRAINED_IMAGE_MARKERS)
  common = dict(tokenizer=tok, image_token_id=cfg.image_token_id,
                tokens_per_image=cfg.tokens_per_tile, max_len=PRETRAINED_MAX_LEN,
                chat_template=vlm_yes.chat_template_from_dir(directory), image_start=start,
                image_end=end, yes=_answer_words(tok, PRETRAINED_ANSWERS['yes'], directory),
                no=_answer_words(tok, PRETRAINED_ANSWERS['no'], directory))
  prompters = {mode: vlm_yes.Prompter(mode=mode, **common) for mode in vlm_yes.MODES}
  graphdef = _graphdef(cfg)
  return graphdef, place_params(cfg, params, placement), cfg, tok, prompters, tile_spec


def load_vlm_parts(directory: str, placement=None, **overrides):
  """(graphdef, params, VLMConfig, tokenizer, {mode: Prompter}, TileSpec) from `directory`: a
  reward saved by the vlm_reward trainer (vlm.json), or a pretrained transformers InternVL
  directory (config.json; `load_pretrained_parts`). `placement` = (mesh, rules) shards the
  params by their logical names (else host arrays); `overrides` set VLMConfig fields (dtype)."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    if os.path.isfile(os.path.join(directory, 'config.json')):
      return load_pretrained_parts(directory, placement, **overrides)
    raise FileNotFoundError(f'{path}: not a saved VLM reward directory (nor a transformers '
                            'InternVL directory with a config.json).')
  meta = json_file.read(path)
  absent = sorted({'vlm', 'tiles', 'prompters'} - set(meta))
  if absent:
    raise ValueError(f'{path}: no {", ".join(absent)} entry (not written by save_vlm_reward).')
  vcfg = dict(meta['vlm'])
  vcfg.update(overrides)
  cfg = vlm_config(vcfg)
  tiles = meta['tiles']
  tile_spec = vlm_yes.TileSpec(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in tiles.items()})
  tok = tokenizer_lib.load_tokenizer(os.path.join(directory, TOKENIZER_FILE))
  n_tiles = tile_spec(np.zeros((1, tile_spec.size, tile_spec.size, 1), np.float32)).shape[1]
  prompters = {mode: vlm_yes.Prompter(tokenizer=tok, mode=mode, image_token_id=cfg.image_token_id,
                                      tokens_per_image=n_tiles * cfg.tokens_per_tile, **p)
               for mode, p in meta['prompters'].items()}
  graphdef, expected = _abstract(cfg)
  params_path = os.path.join(directory, PARAMS_FILE)
  tensors = safetensors_io.read_all(params_path)
  _check_tensors(params_path, tensors, expected)
  params = _unflatten(tensors)
  return graphdef, place_params(cfg, params, placement), cfg, tok, prompters, tile_spec


def load_vlm_reward(directory: str, mode: str = 'pointwise', normalization: str = 'two_way',
                    placement=None, overrides: dict | None = None, **reward_kwargs):
  """The saved VLM as a `Reward` (see `vlm_yes.vlm_yes_reward` for `prompts`, `ref_images`;
  `load_vlm_parts` for `placement` and `overrides`)."""
  graphdef, params, _, _, prompters, tile_spec = load_vlm_parts(directory, placement,
                                                                **(overrides or {}))
  if mode not in prompters:
    raise ValueError(f'{directory} holds prompters for {sorted(prompters)}, not {mode!r}.')
  return vlm_yes.vlm_yes_reward(graphdef, params, prompters[mode], tile_spec,
                                normalization=normalization, **reward_kwargs)
