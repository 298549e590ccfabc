"""Prompts → the generator's external conditioning {'txt', 'pooled', 'mask'} (FLUX, SD3 recipes).

  1. Host: tokenize with `transformers.AutoTokenizer` loaded from a local directory, padded to a
     fixed length (T5: 512 for FLUX-dev, CLIP: 77), so every batch compiles once.
  2. Device (one jitted function over frozen params, batch-sharded inputs):
       txt    = T5(ids_t5).last_hidden_state           (B, L_t5, 4096)
       pooled = CLIP(ids_clip).pooled                   (B, 768)   (EOS token, after final LN)
       mask   = T5 attention mask when `mask_text`, else all True.
     The FLUX pipeline runs T5 and CLIP without attention masks and lets the transformer attend
     to padding; `mask_text=False` reproduces that exactly, `True` masks padding throughout.
  3. SD3 (diffusers StableDiffusion3Pipeline): CLIP-L and CLIP-G (with projection) give their
     penultimate hidden states, concatenated on channels and zero-padded to the T5 width, then
     prepended to the T5 sequence: txt = [pad(clip_l ‖ clip_g); t5] (B, 77 + L_t5, 4096);
     pooled = [text_embeds_l ‖ text_embeds_g] (B, 2048).
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


def make_sd3_encoder(t5_graphdef: nnx.GraphDef, clip_l_graphdef: nnx.GraphDef,
                     clip_g_graphdef: nnx.GraphDef, mask_text: bool = False):
  """jitted (t5_params, clip_l_params, clip_g_params, t5_ids, t5_mask, clip_l_ids, clip_g_ids)
  → {'txt', 'pooled', 'mask'} (see module doc, step 3)."""

  @jax.jit
  def encode(t5_params, clip_l_params, clip_g_params, t5_ids, t5_mask, clip_l_ids, clip_g_ids):
    t5 = nnx.merge(t5_graphdef, t5_params)(t5_ids, t5_mask if mask_text else None)
    out_l = nnx.merge(clip_l_graphdef, clip_l_params)(clip_l_ids)
    out_g = nnx.merge(clip_g_graphdef, clip_g_params)(clip_g_ids)
    if 'text_embeds' not in out_l or 'text_embeds' not in out_g:
      raise ValueError('SD3 needs CLIP text models with a projection (CLIPTextModelWithProjection).')
    clip = jnp.concatenate([out_l['penultimate'], out_g['penultimate']], axis=-1)
    width = t5.shape[-1]
    if clip.shape[-1] > width:
      raise ValueError(f'CLIP width {clip.shape[-1]} exceeds the T5 width {width}.')
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
    txt = jnp.concatenate([clip, t5], axis=1)
    pooled = jnp.concatenate([out_l['text_embeds'], out_g['text_embeds']], axis=-1)
    t5_valid = t5_mask.astype(bool) if mask_text else jnp.ones(t5_ids.shape, bool)
    mask = jnp.concatenate([jnp.ones(clip_l_ids.shape, bool), t5_valid], axis=1)
    return {'txt': txt, 'pooled': pooled, 'mask': mask}

  return encode
