"""Prompts → the generator's external conditioning {'txt', 'pooled', 'mask'} (FLUX recipe).

  1. Host: tokenize with `transformers.AutoTokenizer` loaded from a local directory, padded to a
     fixed length (T5: 512 for FLUX-dev, CLIP: 77), so every batch compiles once.
  2. Device (one jitted function over frozen params, batch-sharded inputs):
       txt    = T5(ids_t5).last_hidden_state           (B, L_t5, 4096)
       pooled = CLIP(ids_clip).pooled                   (B, 768)   (EOS token, after final LN)
       mask   = T5 attention mask when `mask_text`, else all True.
     The FLUX pipeline runs T5 and CLIP without attention masks and lets the transformer attend
     to padding; `mask_text=False` reproduces that exactly, `True` masks padding throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def load_tokenizer(path: str):
  """A tokenizer from a local directory (tokenizer.json / sentencepiece files); never downloads."""
  from transformers import AutoTokenizer  # the one transformers dependency of the runtime path
  return AutoTokenizer.from_pretrained(path, local_files_only=True)


def tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """→ ids (B, max_length) int32 and mask (B, max_length) bool, padded and truncated."""
  if isinstance(prompts, str):
    raise TypeError('tokenize expects a list of prompts, not one string.')
  enc = tokenizer(list(prompts), padding='max_length', max_length=max_length, truncation=True,
                  return_tensors='np')
  return enc['input_ids'].astype(np.int32), enc['attention_mask'].astype(bool)


def make_flux_encoder(t5_graphdef: nnx.GraphDef, clip_graphdef: nnx.GraphDef,
                      mask_text: bool = False):
  """jitted (t5_params, clip_params, t5_ids, t5_mask, clip_ids) → {'txt', 'pooled', 'mask'}."""

  @jax.jit
  def encode(t5_params, clip_params, t5_ids, t5_mask, clip_ids):
    t5 = nnx.merge(t5_graphdef, t5_params)
    clip = nnx.merge(clip_graphdef, clip_params)
    txt = t5(t5_ids, t5_mask if mask_text else None)
    pooled = clip(clip_ids)['pooled']
    mask = t5_mask.astype(bool) if mask_text else jnp.ones(t5_ids.shape, bool)
    return {'txt': txt, 'pooled': pooled, 'mask': mask}

  return encode
