"""InternVL (transformers `InternVLForConditionalGeneration`) in Flax NNX.

Forward on token ids (B, L) with image placeholders and image tiles (B, T, H, W, C):
  1. vision: tiles → InternViT tokens (B·T, 1 + g², Dv); drop the cls token; (g, g, Dv) grid;
  2. pixel shuffle with s = 1/downsample_ratio: (g, g, Dv) → (g/s, g/s, s²·Dv), the exact
     reshape/transpose sequence of transformers' `pixel_shuffle`;
  3. projector: LayerNorm → Linear → GELU → Linear to the LM width; (B, T·(g/s)², D);
  4. placeholder substitution: in each row the k-th `image_token_id` position takes the row's
     k-th image token (transformers' `masked_scatter`, row by row so batches shard cleanly;
     every row must hold exactly T·(g/s)² placeholders, which `check_placeholders` verifies on
     the host);
  5. Qwen2 decoder → final norm → LM head (tied to the embeddings or separate).
`hidden()` stops before the head, so a reward can read the logits of one position only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rewarddance_jax.models.vlm.config import VLMConfig
from rewarddance_jax.models.vlm.qwen2 import Qwen2
from rewarddance_jax.models.vlm.vision import LayerNorm, VisionEncoder
from rewarddance_jax.nn import layers


def pixel_shuffle(x: jax.Array, s: int) -> jax.Array:
  """(N, A, B, C) → (N, A/s, B/s, C·s²), step for step as transformers' `pixel_shuffle(1/s)`."""
  n, a, b, c = x.shape
  x = x.reshape(n, a, b // s, c * s).transpose(0, 2, 1, 3)
  x = x.reshape(n, b // s, a // s, c * s * s).transpose(0, 2, 1, 3)
  return x


class Projector(nnx.Module):
  def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    d_in = cfg.vision.hidden_size * cfg.shuffle ** 2
    d = cfg.text.hidden_size
    self.norm = LayerNorm(d_in, eps=cfg.projector_norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))
    self.linear_1 = layers.dense(d_in, d, ('mlp', 'embed'), **kw)
    self.linear_2 = layers.dense(d, d, ('mlp', 'embed'), **kw)

  def __call__(self, x):
    return self.linear_2(jax.nn.gelu(self.linear_1(self.norm(x)), approximate=False))


def substitute_images(embeds: jax.Array, ids: jax.Array, image_token_id: int,
                      features: jax.Array) -> jax.Array:
  """Row-wise masked scatter: the k-th placeholder of row b takes features[b, k]."""
  is_img = ids == image_token_id
  idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, features.shape[1] - 1)
  gathered = jnp.take_along_axis(features, idx[..., None], axis=1)
  return jnp.where(is_img[..., None], gathered.astype(embeds.dtype), embeds)


def check_placeholders(ids: np.ndarray, image_token_id: int, expected: int) -> None:
  """Host check that every row holds exactly `expected` image placeholders."""
  counts = (np.asarray(ids) == image_token_id).sum(axis=1)
  bad = np.nonzero(counts != expected)[0]
  if bad.size:
    raise ValueError(f'rows {bad[:5].tolist()} hold {counts[bad[:5]].tolist()} image placeholders '
                     f'(id {image_token_id}); each needs {expected} (tiles × tokens per tile).')


class InternVL(nnx.Module):
  def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.vision = VisionEncoder(cfg, rngs=rngs)
    self.projector = Projector(cfg, rngs=rngs)
    self.lm = Qwen2(cfg, rngs=rngs)
    t = cfg.text
    self.lm_head = None if t.tie_word_embeddings else layers.dense(
        t.hidden_size, t.vocab_size, ('embed', 'vocab'), use_bias=False, rngs=rngs,
        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))

  def image_features(self, tiles: jax.Array) -> jax.Array:
    """tiles (B, T, H, W, C) normalised → (B, T·tokens_per_tile, D_text)."""
    b, t = tiles.shape[:2]
    x = self.vision(tiles.reshape(b * t, *tiles.shape[2:]))[:, 1:]
    g = self.cfg.vision.grid
    x = pixel_shuffle(x.reshape(b * t, g, g, -1), self.cfg.shuffle)
    x = self.projector(x.reshape(b * t, -1, x.shape[-1]))
    return x.reshape(b, -1, x.shape[-1])

  def hidden(self, ids: jax.Array, tiles: jax.Array | None = None,
             mask: jax.Array | None = None) -> jax.Array:
    """ids (B, L) int, tiles (B, T, H, W, C) or None, mask (B, L) → final hidden (B, L, D)."""
    x = self.lm.embed(ids)
    if tiles is not None:
      x = substitute_images(x, ids, self.cfg.image_token_id, self.image_features(tiles))
    return self.lm(x, mask)

  def logits(self, h: jax.Array) -> jax.Array:
    """LM head on hidden states (..., D) → fp32 logits (..., V)."""
    if self.lm_head is None:
      out = self.lm.embed.attend(h)
    else:
      out = self.lm_head(h)
    return out.astype(jnp.float32)

  def __call__(self, ids, tiles=None, mask=None):
    return self.logits(self.hidden(ids, tiles, mask))
