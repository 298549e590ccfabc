"""Import a transformers InternVL checkpoint directory into the NNX `InternVL` param tree.

A directory holds `config.json` and `model.safetensors` or shards listed by
`model.safetensors.index.json` (safetensors only: nothing is unpickled). Steps:
  1. `VLMConfig` from config.json (`models/vlm/config.py from_hf_dict`);
  2. every tensor is read (shards too) and its name normalised: the on-disk layout that
     transformers saves and the hub holds (`vision_tower.`, `multi_modal_projector.`,
     `language_model.model.`, `language_model.lm_head.`) is renamed to the module names of
     transformers 5 (`model.vision_tower.`, ...), and either spelling is accepted;
  3. one explicit key map `key_map(cfg)`: transformers name → (our param path, transform).
     Linear weights (out, in) are transposed to kernels (in, out); the patch conv (D, C, p, p)
     becomes a dense kernel over (p, p, C)-flattened patches;
  4. every unmapped, missing or mis-shaped key is collected and reported in ONE error;
  5. the LM head is tied to the embeddings exactly when the checkpoint has no `lm_head.weight`;
  6. per-layer tensors are stacked along a leading axis when `cfg.scan_layers`.
Returns (VLMConfig, params pure dict) ready for `nnx.merge(graphdef, params)`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from rewarddance_jax.models.vlm.config import VLMConfig, from_hf_dict
from rewarddance_jax.weights import json_file, safetensors_io

INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'
_LEGACY_PREFIXES = (
    ('vision_tower.', 'model.vision_tower.'),
    ('multi_modal_projector.', 'model.multi_modal_projector.'),
    ('language_model.model.', 'model.language_model.'),
    ('language_model.lm_head.', 'lm_head.'),
)

Transform = Callable[[np.ndarray], np.ndarray]
_T: Transform = lambda w: w.T                 # torch Linear (out, in) -> kernel (in, out)
_ID: Transform = lambda w: w


def _patch_conv(w: np.ndarray) -> np.ndarray:
  d, c, p, _ = w.shape
  return w.transpose(2, 3, 1, 0).reshape(p * p * c, d)


def key_map(cfg: VLMConfig) -> dict[str, tuple[tuple, int | None, Transform]]:
  """transformers name → (our path, layer index or None, transform)."""
  m: dict[str, tuple[tuple, int | None, Transform]] = {}
  vt, pj, lm = 'model.vision_tower.', 'model.multi_modal_projector.', 'model.language_model.'
  m[vt + 'embeddings.cls_token'] = (('vision', 'cls_token'), None, _ID)
  m[vt + 'embeddings.position_embeddings'] = (('vision', 'pos_embed'), None, _ID)
  m[vt + 'embeddings.patch_embeddings.projection.weight'] = (('vision', 'patch', 'kernel'), None,
                                                             _patch_conv)
  m[vt + 'embeddings.patch_embeddings.projection.bias'] = (('vision', 'patch', 'bias'), None, _ID)
  for i in range(cfg.vision.num_layers):
    p = f'{vt}encoder.layer.{i}.'
    layer = lambda *path, f=_ID: (('vision', 'layers') + path, i, f)
    m[p + 'lambda_1'] = layer('lambda_1')
    m[p + 'lambda_2'] = layer('lambda_2')
    for ours, theirs in (('q', 'q_proj'), ('k', 'k_proj'), ('v', 'v_proj'),
                         ('proj', 'projection_layer')):
      m[f'{p}attention.{theirs}.weight'] = layer(ours, 'kernel', f=_T)
      if cfg.vision.qkv_bias or ours == 'proj':
        m[f'{p}attention.{theirs}.bias'] = layer(ours, 'bias')
    if cfg.vision.qk_norm:
      m[p + 'attention.q_norm.weight'] = layer('q_norm', 'scale')
      m[p + 'attention.k_norm.weight'] = layer('k_norm', 'scale')
    for fc in ('fc1', 'fc2'):
      m[f'{p}mlp.{fc}.weight'] = layer(fc, 'kernel', f=_T)
      m[f'{p}mlp.{fc}.bias'] = layer(fc, 'bias')
    for ours, theirs in (('norm1', 'layernorm_before'), ('norm2', 'layernorm_after')):
      m[f'{p}{theirs}.weight'] = layer(ours, 'scale')
      if cfg.vision.norm_type == 'layer_norm':
        m[f'{p}{theirs}.bias'] = layer(ours, 'bias')
  if not cfg.vision.use_mean_pooling:
    m[vt + 'layernorm.weight'] = (('vision', 'final_norm', 'scale'), None, _ID)
    m[vt + 'layernorm.bias'] = (('vision', 'final_norm', 'bias'), None, _ID)
  m[pj + 'layer_norm.weight'] = (('projector', 'norm', 'scale'), None, _ID)
  m[pj + 'layer_norm.bias'] = (('projector', 'norm', 'bias'), None, _ID)
  for lin in ('linear_1', 'linear_2'):
    m[f'{pj}{lin}.weight'] = (('projector', lin, 'kernel'), None, _T)
    m[f'{pj}{lin}.bias'] = (('projector', lin, 'bias'), None, _ID)
  m[lm + 'embed_tokens.weight'] = (('lm', 'embed', 'embedding'), None, _ID)
  m[lm + 'norm.weight'] = (('lm', 'norm', 'scale'), None, _ID)
  for i in range(cfg.text.num_layers):
    p = f'{lm}layers.{i}.'
    layer = lambda *path, f=_ID: (('lm', 'layers') + path, i, f)
    for ours in ('q', 'k', 'v'):
      m[f'{p}self_attn.{ours}_proj.weight'] = layer(ours, 'kernel', f=_T)
      m[f'{p}self_attn.{ours}_proj.bias'] = layer(ours, 'bias')
    m[p + 'self_attn.o_proj.weight'] = layer('o', 'kernel', f=_T)
    for ours in ('gate', 'up', 'down'):
      m[f'{p}mlp.{ours}_proj.weight'] = layer(ours, 'kernel', f=_T)
    m[p + 'input_layernorm.weight'] = layer('input_norm', 'scale')
    m[p + 'post_attention_layernorm.weight'] = layer('post_norm', 'scale')
  if not cfg.text.tie_word_embeddings:
    m['lm_head.weight'] = (('lm_head', 'kernel'), None, _T)
  return m


def _normalise(name: str) -> str:
  for old, new in _LEGACY_PREFIXES:
    if name.startswith(old):
      return new + name[len(old):]
  return name


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory (single file or index + shards) as float32 numpy."""
  index = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index):
    weight_map = json_file.read(index).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ValueError(f'{index}: no "weight_map" object.')
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
    files = [SINGLE_FILE]
  else:
    raise FileNotFoundError(f'{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found.')
  out = {}
  for name in files:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: shard listed in {INDEX_FILE} is missing.')
    # 'flax' reads bf16 too (numpy has no bfloat16); convert to fp32 master weights.
    with safetensors_io.open_file(path, framework='flax') as f:
      for key in f.keys():
        out[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
  return out


def load_config(directory: str, **overrides) -> VLMConfig:
  return from_hf_dict(json_file.read(os.path.join(directory, 'config.json')), **overrides)


def convert(cfg: VLMConfig, tensors: dict[str, np.ndarray],
            expected: dict[tuple, tuple[int, ...]]) -> dict:
  """Maps `tensors` into a nested param dict; `expected` = {our path (per layer): shape}."""
  tensors = {_normalise(k): v for k, v in tensors.items()}
  kmap = key_map(cfg)
  unmapped = sorted(set(tensors) - set(kmap))
  missing = sorted(set(kmap) - set(tensors))
  bad, flat = [], {}
  for name, (path, layer, fn) in kmap.items():
    if name not in tensors:
      continue
    value = fn(tensors[name])
    full = path if layer is None else path[:2] + (layer,) + path[2:]
    want = expected.get(full)
    if want is None:
      bad.append(f'{name} -> {"/".join(map(str, full))} (no such param)')
    elif tuple(value.shape) != tuple(want):
      bad.append(f'{name} {tuple(tensors[name].shape)} -> {"/".join(map(str, full))} '
                 f'{tuple(value.shape)} vs {tuple(want)}')
    flat[full] = value
  problems = []
  if unmapped:
    problems.append(f'unmapped: {unmapped}')
  if missing:
    problems.append(f'missing: {missing}')
  if bad:
    problems.append(f'mis-shaped: {bad}')
  if problems:
    raise ValueError('InternVL import failed; ' + '; '.join(problems))
  return _nest(flat, cfg.scan_layers)


def _nest(flat: dict[tuple, np.ndarray], scan: bool) -> dict:
  if scan:
    stacked: dict[tuple, dict[int, np.ndarray]] = {}
    other = {}
    for path, v in flat.items():
      if len(path) > 2 and path[1] == 'layers':
        stacked.setdefault(path[:2] + path[3:], {})[path[2]] = v
      else:
        other[path] = v
    for path, per_layer in stacked.items():
      other[path] = np.stack([per_layer[i] for i in range(len(per_layer))])
    flat = other
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def expected_shapes(cfg: VLMConfig) -> dict[tuple, tuple[int, ...]]:
  """{per-layer param path: shape} of the unscanned model (no memory: eval_shape)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from rewarddance_jax.models.vlm.model import InternVL  # pylint: disable=import-outside-toplevel

  unscanned = dataclasses.replace(cfg, scan_layers=False)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: InternVL(unscanned, rngs=nnx.Rngs(0)))
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(abstract)))[0]
  return {tuple(getattr(k, 'key', k) for k in p): tuple(x.shape) for p, x in flat}


def load_internvl(directory: str, **overrides) -> tuple[VLMConfig, dict]:
  """(VLMConfig, params) from a transformers InternVL directory; `overrides` set compute fields
  (dtype, scan_layers, remat, attention)."""
  cfg = load_config(directory, **overrides)
  tensors = read_safetensors(directory)
  tied = not any(_normalise(k) == 'lm_head.weight' for k in tensors)
  cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tie_word_embeddings=tied))
  return cfg, convert(cfg, tensors, expected_shapes(cfg))
