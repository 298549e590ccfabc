"""A diffusers pipeline's text side, loaded from its directory: prompts → generator conditioning.

Sub-folders (diffusers layout):
  flux: text_encoder (CLIPTextModel) + tokenizer, text_encoder_2 (T5EncoderModel) + tokenizer_2
  sd3:  text_encoder (CLIP-L, with projection) + tokenizer, text_encoder_2 (CLIP-G) +
        tokenizer_2, text_encoder_3 (T5) + tokenizer_3
`PipelineTextEncoder(family, root, mesh, rules)(prompts)` tokenizes on the host (fixed lengths,
so one compile per batch size) and runs the jitted encoder of `models/prompt_encoder.py`.
Offline pre-encoding (`launch.encode_prompts`): `write_encoded` stores each prompt's
`{i:07d}.txt / .pooled / .mask` in (sharded) safetensors plus `prompts.jsonl` (index, id,
prompt); `EncodedPrompts(dir)[indices]` reads a batch back lazily as a conditioning dict.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from rewarddance_jax.models import prompt_encoder
from rewarddance_jax.weights import safetensors_io as st
from rewarddance_jax.weights import text

ENCODED_NAME = 'prompts'
COND_KEYS = ('txt', 'pooled', 'mask')

# family → [(role, encoder folder, tokenizer folder, default max length)]
LAYOUTS = {
    'flux': [('clip', 'text_encoder', 'tokenizer', 77),
             ('t5', 'text_encoder_2', 'tokenizer_2', 512)],
    'sd3': [('clip_l', 'text_encoder', 'tokenizer', 77),
            ('clip_g', 'text_encoder_2', 'tokenizer_2', 77),
            ('t5', 'text_encoder_3', 'tokenizer_3', 256)],
}


class PipelineTextEncoder:
  """Loads the encoders (sharded, optionally through the weights cache) and tokenizers."""

  def __init__(self, family: str, root: str, mesh, sharding_rules, *, t5_len: int | None = None,
               clip_len: int | None = None, mask_text: bool = False,
               cache_dir: str | None = None, progress: bool = False):
    if family not in LAYOUTS:
      raise ValueError(f'unknown text family {family!r}; choose one of {sorted(LAYOUTS)}.')
    self.family, self.mesh, self.rules = family, mesh, sharding_rules
    self.params, self.tokenizers, self.lengths, graphdefs = {}, {}, {}, {}
    for role, enc_dir, tok_dir, length in LAYOUTS[family]:
      enc_path, tok_path = os.path.join(root, enc_dir), os.path.join(root, tok_dir)
      for p in (enc_path, tok_path):
        if not os.path.isdir(p):
          raise FileNotFoundError(f'{family} pipeline {root} has no {os.path.basename(p)}/ folder.')
      load = text.load_t5 if role == 't5' else text.load_clip
      graphdefs[role], self.params[role], _ = load(enc_path, mesh, sharding_rules,
                                                   cache_dir=cache_dir, progress=progress)
      self.tokenizers[role] = prompt_encoder.load_tokenizer(tok_path)
      override = t5_len if role == 't5' else clip_len
      self.lengths[role] = override or length
    if family == 'flux':
      self.encode = prompt_encoder.make_flux_encoder(graphdefs['t5'], graphdefs['clip'], mask_text)
    else:
      self.encode = prompt_encoder.make_sd3_encoder(graphdefs['t5'], graphdefs['clip_l'],
                                                    graphdefs['clip_g'], mask_text)

  def inputs(self, prompts: Sequence[str]) -> tuple:
    """The jitted encoder's arguments for `prompts` (params, then token ids / masks)."""
    tok = {role: prompt_encoder.tokenize(self.tokenizers[role], prompts, self.lengths[role])
           for role in self.tokenizers}
    if self.family == 'flux':
      return (self.params['t5'], self.params['clip'], tok['t5'][0], tok['t5'][1], tok['clip'][0])
    return (self.params['t5'], self.params['clip_l'], self.params['clip_g'], tok['t5'][0],
            tok['t5'][1], tok['clip_l'][0], tok['clip_g'][0])

  def __call__(self, prompts: Sequence[str]) -> dict:
    """prompts → {'txt', 'pooled', 'mask'} device arrays."""
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      return self.encode(*self.inputs(prompts))


def write_encoded(encoder, records: Sequence, out_dir: str, *, batch_size: int = 8,
                  dtype=np.float32, max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Encodes `records` (PromptRecords or strings) in fixed-size batches (the last one padded,
  so there is one compile) and writes them under `out_dir`; returns the safetensors files."""
  prompts = [getattr(r, 'prompt', r) for r in records]
  if not prompts:
    raise ValueError('write_encoded got no prompts.')

  def tensors():
    for start in range(0, len(prompts), batch_size):
      chunk = prompts[start:start + batch_size]
      cond = encoder(chunk + [chunk[-1]] * (batch_size - len(chunk)))
      host = {k: np.asarray(jax.device_get(cond[k])) for k in COND_KEYS}
      for j in range(len(chunk)):
        for k in COND_KEYS:
          yield f'{start + j:07d}.{k}', host[k][j].astype(bool if k == 'mask' else dtype)

  files = st.write(tensors(), out_dir, ENCODED_NAME, max_shard_bytes)
  with open(os.path.join(out_dir, 'prompts.jsonl'), 'w') as f:
    for i, r in enumerate(records):
      f.write(json.dumps({'index': i, 'id': getattr(r, 'id', None), 'prompt': prompts[i]}) + '\n')
  return files


def encode_records(encoder, records: Sequence, out_dir: str, *, batch_size: int = 8,
                   dtype=np.float32) -> dict:
  """`write_encoded(out_dir)` of the records of a prompt file (`data.prompts.load_prompt_file`);
  returns a summary (what `python -m launch.encode_prompts` runs)."""
  start = time.time()
  files = write_encoded(encoder, records, out_dir, batch_size=batch_size, dtype=dtype)
  return {'prompts': len(records), 'files': len(files), 'seconds': round(time.time() - start, 2)}


class EncodedPrompts:
  """Reads what `write_encoded` wrote: `len()`, `.prompts`, and `[indices]` → stacked numpy
  {'txt', 'pooled', 'mask'} (only those tensors are read)."""

  def __init__(self, out_dir: str):
    self.infos = st.index(out_dir, ENCODED_NAME)
    with open(os.path.join(out_dir, 'prompts.jsonl')) as f:
      self.records = [json.loads(line) for line in f if line.strip()]
    self.prompts = [r['prompt'] for r in self.records]
    if len(self.infos) != len(COND_KEYS) * len(self.records):
      raise ValueError(f'{out_dir}: {len(self.infos)} tensors for {len(self.records)} prompts.')

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, indices: Sequence[int]) -> dict:
    wanted = {f'{i:07d}.{k}': None for i in indices for k in COND_KEYS}
    missing = [k for k in wanted if k not in self.infos]
    if missing:
      raise IndexError(f'encoded prompts lack {missing[:3]}...')
    got = {key: reader[...] for key, reader, _ in st.stream(self.infos, wanted)}
    return {k: np.stack([got[f'{i:07d}.{k}'] for i in indices]) for k in COND_KEYS}
