"""RewardDance generative reward: r = P("yes") from a VLM's LM head (docs/algorithms.md §4.1-4.2).

Host side, `Prompter` turns prompt strings into token ids:
  1. the template (pointwise: one image; pairwise: image 1 = reference, image 2 = generated) is
     filled with the prompt and the task criteria from the config; `<image>` marks each image;
  2. with a chat template (the tokenizer's, a Jinja string) the text becomes the user message and
     the assistant prefix is appended (add_generation_prompt); without one the text is used as is;
  3. the text is split at the `<image>` markers; each marker becomes
     [image_start] + image_token × tokens_per_image + [image_end]; right padding to `max_len`;
  4. `pos` = index of the last prompt token: its logits predict the answer (teacher forcing).
Device side, the reward is one forward pass (no generation): tiles = preprocess(pixels)
(pairwise: reference tiles first), h = VLM(ids, tiles), logits = head(h[pos]), then
r = P(yes) with the 'full' (softmax over the vocabulary) or 'two_way' (σ(l_yes − l_no))
normalisation. It is differentiable with respect to the pixels (ReFL).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rewarddance_jax.models.vlm import preprocess
from rewarddance_jax.rewards import base
from rewarddance_jax.rewards.vlm_losses import NORMALIZATIONS, yes_probability

IMAGE = '<image>'
MODES = ('pointwise', 'pairwise')
TEMPLATES = {
    # RD Fig. 3 (the only printed template); decision first (CoT format (i)).
    'pairwise': ('Ref Image: <image>\nGenerated Image: <image>\nPlease evaluate two images '
                 'generated from the prompt: "{prompt}". Is image 2 better than image 1?\n'
                 '{criteria}\nPlease answer "yes" or "no", and given the detailed reason.'),
    # Our pointwise template (docs/algorithms.md §4.2).
    'pointwise': ('<image>\nPlease evaluate the image generated from the prompt: "{prompt}". '
                  '{criteria}. Does the image meet the requirements? Please answer "yes" or "no".'),
}


def render_chat(chat_template: str, text: str) -> str:
  """The chat template applied to one user message, with the assistant prefix appended."""
  import jinja2  # pylint: disable=import-outside-toplevel

  env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
  return env.from_string(chat_template).render(
      messages=[{'role': 'user', 'content': text}], add_generation_prompt=True)


def chat_template_from_dir(directory: str) -> str | None:
  """The chat template of a transformers tokenizer directory (chat_template.jinja,
  tokenizer_config.json 'chat_template'), or None."""
  path = os.path.join(directory, 'chat_template.jinja')
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      return f.read()
  path = os.path.join(directory, 'tokenizer_config.json')
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      template = json.load(f).get('chat_template')
    return template if isinstance(template, str) else None
  return None


@dataclasses.dataclass
class Prompter:
  """Prompt strings → (ids, pos) for the VLM; see the module docstring."""
  tokenizer: Any                        # a `tokenizers.Tokenizer`
  mode: str
  image_token_id: int
  tokens_per_image: int
  max_len: int
  criteria: str = ''
  template: str | None = None           # default: TEMPLATES[mode]
  chat_template: str | None = None
  image_start: str | None = None        # e.g. '<img>' for InternVL checkpoints
  image_end: str | None = None
  pad_id: int = 0
  yes: Sequence[str] = ('yes',)
  no: Sequence[str] = ('no',)

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'vlm reward mode={self.mode!r} is not one of {MODES}.')
    self.template = self.template or TEMPLATES[self.mode]
    want = 1 if self.mode == 'pointwise' else 2
    if self.template.count(IMAGE) != want:
      raise ValueError(f'{self.mode} template must hold {want} {IMAGE} marker(s): '
                       f'{self.template!r}')
    self.yes_ids = tuple(self._single_id(w) for w in self.yes)
    self.no_ids = tuple(self._single_id(w) for w in self.no)

  def _single_id(self, word: str) -> int:
    ids = self.tokenizer.encode(word, add_special_tokens=False).ids
    if len(ids) != 1:
      raise ValueError(f'answer word {word!r} is {len(ids)} tokens {ids}; it must be one token.')
    return int(ids[0])

  def _special(self, token: str | None) -> list[int]:
    if not token:
      return []
    tid = self.tokenizer.token_to_id(token)
    if tid is None:
      raise ValueError(f'image marker token {token!r} is not in the tokenizer vocabulary.')
    return [int(tid)]

  def text(self, prompt: str) -> str:
    text = self.template.format(prompt=prompt, criteria=self.criteria)
    return render_chat(self.chat_template, text) if self.chat_template else text

  def prompt_ids(self, prompt: str) -> list[int]:
    image = (self._special(self.image_start) + [self.image_token_id] * self.tokens_per_image
             + self._special(self.image_end))
    ids: list[int] = []
    for i, part in enumerate(self.text(prompt).split(IMAGE)):
      if i:
        ids += image
      if part.strip():
        ids += self.tokenizer.encode(part, add_special_tokens=False).ids
    return ids

  def encode(self, prompts: Sequence[str], answers: Sequence[str] | None = None) -> dict:
    """ids (B, L) int32, pos (B,) int32; with `answers` also targets (B, L) and answer_mask
    (B, L): position t predicts targets[t] = ids[t + 1] and is marked for the answer tokens."""
    if isinstance(prompts, str):
      raise TypeError('Prompter.encode takes a sequence of prompts, not one string.')
    b = len(prompts)
    ids = np.full((b, self.max_len), self.pad_id, np.int32)
    pos = np.zeros((b,), np.int32)
    targets = np.full((b, self.max_len), self.pad_id, np.int32)
    amask = np.zeros((b, self.max_len), bool)
    for row, prompt in enumerate(prompts):
      seq = self.prompt_ids(prompt)
      n_prompt = len(seq)
      if answers is not None:
        seq = seq + self.tokenizer.encode(answers[row], add_special_tokens=False).ids
      if len(seq) > self.max_len:
        raise ValueError(f'prompt {prompt!r} is {len(seq)} tokens > max_len={self.max_len}.')
      ids[row, :len(seq)] = seq
      pos[row] = n_prompt - 1
      targets[row, :len(seq) - 1] = seq[1:]
      amask[row, n_prompt - 1:len(seq) - 1] = True
    out = {'ids': ids, 'pos': pos}
    if answers is not None:
      out.update(targets=targets, answer_mask=amask)
    return out


@dataclasses.dataclass(frozen=True)
class TileSpec:
  """How pixels become tiles (models/vlm/preprocess.py)."""
  size: int
  channels: int = 3
  min_tiles: int = 1
  max_tiles: int = 1
  thumbnail: bool = True
  mean: tuple = preprocess.IMAGENET_MEAN
  std: tuple = preprocess.IMAGENET_STD

  def __call__(self, pixels: jax.Array) -> jax.Array:
    return preprocess.make_tiles(pixels, self.size, channels=self.channels,
                                 min_tiles=self.min_tiles, max_tiles=self.max_tiles,
                                 thumbnail=self.thumbnail, mean=self.mean, std=self.std)


def answer_logits(graphdef, model_params, ids: jax.Array, pos: jax.Array,
                  tiles: jax.Array) -> jax.Array:
  """One teacher-forced pass → fp32 logits (B, V) at the answer position `pos` (B,)."""
  model = nnx.merge(graphdef, model_params)
  h = model.hidden(ids, tiles)
  h_pos = jnp.take_along_axis(h, pos[:, None, None].astype(jnp.int32), axis=1)[:, 0]
  return model.logits(h_pos)


def vlm_tiles(tile_spec: TileSpec, mode: str, pixels: jax.Array,
              ref_pixels: jax.Array | None = None) -> jax.Array:
  """(B, T, S, S, C) tiles; pairwise: the reference image's tiles first (image 1)."""
  tiles = tile_spec(pixels)
  if mode == 'pairwise':
    if ref_pixels is None:
      raise KeyError('a pairwise VLM reward needs reference images (batch["ref_pixels"]).')
    tiles = jnp.concatenate([tile_spec(ref_pixels), tiles], axis=1)
  return tiles


def native_projection(pixels: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C) → the nearest image (least squares) that a `size`×`size` source upsampled by
  bilinear interpolation can produce: x ↦ P x Pᵀ per channel, P = U U⁺ with U the (H, size)
  matrix of the 1-D bilinear upsampling. Images of that form (the digits are 8×8 scans shown at
  16×16) pass unchanged; detail finer than the data can hold is removed, so a generator cannot
  raise the reward with it.
  """
  _, h, w, _ = pixels.shape
  if h != w:
    raise ValueError(f'native_size needs square images, got {h}x{w}.')
  eye = jnp.eye(size, dtype=jnp.float32)
  up = jax.image.resize(eye, (h, size), 'linear', antialias=True)         # (H, size) = U
  proj = up @ jnp.linalg.pinv(up)                                         # (H, H) = U U⁺
  return jnp.einsum('ij,bjkc,lk->bilc', proj, pixels.astype(jnp.float32), proj)


def vlm_yes_reward(graphdef, model_params, prompter: Prompter, tile_spec: TileSpec, *,
                   normalization: str = 'two_way', prompts: Sequence[str] | None = None,
                   index_key: str = 'labels', ref_images: Any = None,
                   native_size: int = 0, name: str | None = None) -> base.Reward:
  """The `Reward` r = P("yes"); pure fn(params, samples, batch, key) → (B,).

  Token ids come from `batch['vlm_ids']` and `batch['vlm_pos']` (from `prompter.encode`) or,
  when `prompts` is given, from a table of those prompts encoded once and indexed by
  `batch[index_key]` (e.g. the digit labels). Pairwise references come from
  `batch['ref_pixels']` or, when `ref_images` (P, H, W, C) is given, `ref_images[index]`.
  `native_size` > 0 first resizes the generated images to the data's native resolution and back
  (`native_projection`), so the reward sees what its training data can hold.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'normalization={normalization!r} is not one of {NORMALIZATIONS}.')
  mode = prompter.mode
  params = {'model': model_params}
  if prompts is not None:
    enc = prompter.encode(list(prompts))
    params['prompt_ids'], params['prompt_pos'] = jnp.asarray(enc['ids']), jnp.asarray(enc['pos'])
  if ref_images is not None:
    params['ref_images'] = jnp.asarray(ref_images, jnp.float32)
  yes_ids, no_ids = prompter.yes_ids, prompter.no_ids

  def fn(p, samples, batch, key):
    del key
    if 'vlm_ids' in batch:
      ids, pos = batch['vlm_ids'], batch['vlm_pos']
    elif 'prompt_ids' in p:
      idx = jnp.asarray(batch[index_key], jnp.int32)
      ids, pos = p['prompt_ids'][idx], p['prompt_pos'][idx]
    else:
      raise KeyError(f'reward {name or "vlm_" + mode!r} needs batch["vlm_ids"] and '
                     f'batch["vlm_pos"] (or a prompt table with batch[{index_key!r}]).')
    ref = batch.get('ref_pixels')
    if ref is None and 'ref_images' in p and mode == 'pairwise':
      ref = p['ref_images'][jnp.asarray(batch[index_key], jnp.int32)]
    pixels = samples['pixels']
    if native_size:
      pixels = native_projection(pixels, native_size)
    tiles = vlm_tiles(tile_spec, mode, pixels, ref)
    logits = answer_logits(graphdef, p['model'], ids, pos, tiles)
    return yes_probability(logits, yes_ids, no_ids, normalization)

  return base.Reward(name=name or f'vlm_{mode}', fn=fn, inputs='pixels', differentiable=True,
                     params=params)
