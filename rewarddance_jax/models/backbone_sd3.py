"""The first K blocks of a frozen SD3 / SD3.5 transformer (+ the reward's LoRA) as features.

The SD3 counterpart of `models/backbone.py` (DiNa-LRM on SD3.5-medium: docs/algorithms.md §5.2, the
first 12 of its 24 joint blocks, features after blocks 4, 8, 12). Same interface, so the latent
reward code (rewards/thurstone.py `score_views`, train/latent_reward.py `make_train_step`) runs
on it unchanged:
  1. `take(params)`: the embedders (img_in, pos_embed, txt_in, time_in, vector_in) and blocks
     0..K−1 of an `SD3Generator` param tree (pure dict, the same array objects; the later blocks
     and the output layer are left out).
  2. `init_lora(params, key)`: the reward's LoRA over `take(params)` (nn/lora.py; shapes only).
     `SD3_ATTENTION_TARGETS`: every attention projection of a joint block (both streams' q/k/v
     and outputs, the dual-attention q/k/v and output: diffusers' to_q/k/v, to_out.0,
     add_{q,k,v}_proj, to_add_out, attn2.*).
  3. `__call__(base, lora, x, σ, cond)`: merges the LoRA into `take(base)`, runs
     `SD3Generator.__call__`'s embedding path (patchify + cropped position table, context
     embedder, vec = time_in(emb(1000σ)) + vector_in(pooled)) and blocks 1..K (remat as in the
     generator), recording both streams after each block in `layers` (1-based). The token
     streams are pinned to the activation rules (act_batch, act_len, act_embed) after the
     embedders and every block, as `models/mmdit.py` does (`SD3Generator` has no constraints;
     without them GSPMD replicated the pair batch: 470 GiB of temporaries per v5p chip). With
     `scan=True` (config.model.scan_layers) consecutive blocks of one kind between recorded
     layers run as one `lax.scan` over their stacked params (`runs()`): the same math, a program
     a few blocks long instead of K. Returns
        {'img': (B, N, W) per layer, 'txt': (B, L, W) per layer, 'temb': (B, W), 'txt_mask': (B, L)}
The base is a frozen input: gradients go to the LoRA only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rewarddance_jax.models.generator import pack
from rewarddance_jax.models.sd3 import SD3Config, SD3Generator
from rewarddance_jax.nn import layers as layers_lib
from rewarddance_jax.nn import lora as lora_lib
from rewarddance_jax.nn.stack import REMAT_POLICIES
from rewarddance_jax.parallel.sharding import constrain

_EMBEDDERS = ('img_in', 'pos_embed', 'txt_in', 'time_in', 'vector_in')
_TOKENS = ('act_batch', 'act_len', 'act_embed')
SD3_ATTENTION_TARGETS = r'blocks/\d+/((img_attn|txt_attn|attn2)/(q|k|v)|img_out|txt_out|attn2_out)/kernel'


@functools.lru_cache(maxsize=8)
def _abstract_generator(cfg: SD3Config):
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: SD3Generator(cfg, rngs=nnx.Rngs(0)))


@dataclasses.dataclass(frozen=True)
class SD3Backbone:
  """Static description of a truncated SD3 backbone with LoRA (hashable: closes over jit)."""
  cfg: SD3Config
  num_blocks: int
  layers: tuple[int, ...]
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: str = SD3_ATTENTION_TARGETS
  scan: bool = False

  def __post_init__(self):
    if not 1 <= self.num_blocks <= self.cfg.depth:
      raise ValueError(f'sd3 backbone num_blocks={self.num_blocks} must lie in '
                       f'[1, {self.cfg.depth}].')
    layers = tuple(int(l) for l in self.layers)
    if not layers or any(not 1 <= l <= self.num_blocks for l in layers) or sorted(
        set(layers)) != list(layers):
      raise ValueError(f'sd3 backbone layers={self.layers} must be increasing block numbers in '
                       f'[1, num_blocks={self.num_blocks}].')
    object.__setattr__(self, 'layers', layers)

  @property
  def width(self) -> int:
    return self.cfg.hidden

  def take(self, params: Any) -> dict:
    """Embedders and the first K blocks of an SD3Generator param tree (pure dict)."""
    if 'blocks' not in params:
      raise ValueError('sd3 backbone.take needs an SD3Generator param tree (no "blocks" key).')
    out = {k: params[k] for k in _EMBEDDERS}
    out['blocks'] = {i: params['blocks'][i] for i in range(self.num_blocks)}
    return out

  def init_lora(self, params: Any, key: jax.Array) -> dict:
    """The reward's LoRA tree over `take(params)` (params may be abstract)."""
    shapes = jax.eval_shape(self.take, params)
    return lora_lib.init_lora(shapes, rank=self.lora_rank, alpha=self.lora_alpha,
                              targets=self.lora_targets, key=key)

  def lora_shardings(self, lora: Any, param_shardings: Any) -> dict:
    """LoRA shardings that follow the generator's kernel shardings."""
    return lora_lib.lora_shardings(lora, param_shardings)

  def __call__(self, base: Any, lora: Any, x: jax.Array, sigma: jax.Array, cond: dict,
               guidance: jax.Array | None = None) -> dict:
    del guidance   # SD3 is not guidance-distilled
    sub = self.take(base)
    if lora is not None:
      sub = lora_lib.merge(sub, lora, lora_lib.lora_scale(self.lora_rank, self.lora_alpha))
    return self._features(sub, x, sigma, cond)

  def runs(self) -> list[tuple[int, ...]]:
    """Blocks 0..K−1 in the order they run, grouped: a group ends at a recorded layer and at a
    change of block kind (dual attention, pre-only), so with `scan` each group of one kind is one
    `lax.scan` (SD3.5-medium's blocks 0–11 with layers (4, 8, 12): three scans of four blocks).
    Without `scan` every block is its own group."""
    kind = lambda i: (i in self.cfg.dual_attention_layers, i == self.cfg.depth - 1)
    out: list[list[int]] = []
    for i in range(self.num_blocks):
      if self.scan and out and out[-1][-1] + 1 not in self.layers and kind(out[-1][-1]) == kind(i):
        out[-1].append(i)
      else:
        out.append([i])
    return [tuple(r) for r in out]

  def _run_blocks(self, ab, sub, run, img, txt, vec, mask):
    """Blocks `run` (one kind) on the two token streams: unrolled for one block, else one
    `lax.scan` over their params stacked on a new leading axis; remat per block either way."""
    cfg = self.cfg
    graphdef = nnx.graphdef(ab.blocks[run[0]])

    def one(params, img, txt):
      block = nnx.merge(graphdef, params)
      if cfg.remat != 'none':
        img, txt = nnx.remat(lambda blk, *a: blk(*a), policy=REMAT_POLICIES[cfg.remat])(
            block, img, txt, vec, mask)
      else:
        img, txt = block(img, txt, vec, mask)
      return constrain(img, _TOKENS), constrain(txt, _TOKENS)

    if len(run) == 1:
      return one(sub['blocks'][run[0]], img, txt)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[sub['blocks'][i] for i in run])

    def body(carry, params):
      return one(params, *carry), None

    (img, txt), _ = jax.lax.scan(body, (img, txt), stacked)
    return img, txt

  def _features(self, sub: dict, x, sigma, cond) -> dict:
    cfg = self.cfg
    ab = _abstract_generator(cfg)
    part = lambda module, p: nnx.merge(nnx.graphdef(module), p)
    dtype = jnp.dtype(cfg.dtype)
    b, h, w, c = x.shape
    if c != cfg.latent_channels:
      raise ValueError(f'latent has {c} channels, the sd3 backbone expects {cfg.latent_channels}.')
    missing = {'txt', 'pooled'} - set(cond)
    if missing:
      raise ValueError(f'SD3 conditioning needs keys {sorted(missing)} in cond.')
    # SD3Generator.__call__ up to the blocks (its `cropped_pos_embed` on the table alone).
    p, m = cfg.patch_size, cfg.pos_embed_max_size
    gh, gw = h // p, w // p
    if gh > m or gw > m:
      raise ValueError(f'token grid {gh}x{gw} exceeds pos_embed_max_size {m}.')
    top, left = (m - gh) // 2, (m - gw) // 2
    pos = sub['pos_embed'].reshape(m, m, -1)[top:top + gh, left:left + gw].reshape(gh * gw, -1)
    img = part(ab.img_in, sub['img_in'])(pack(x[:, None], p).astype(dtype)) + pos[None].astype(
        dtype)
    txt = part(ab.txt_in, sub['txt_in'])(cond['txt'].astype(dtype))
    img, txt = constrain(img, _TOKENS), constrain(txt, _TOKENS)
    t = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,)) * cfg.timestep_scale
    vec = part(ab.time_in, sub['time_in'])(layers_lib.timestep_embedding(t, 256).astype(dtype))
    vec = vec + part(ab.vector_in, sub['vector_in'])(cond['pooled'].astype(dtype))
    mask = None
    txt_mask = jnp.ones(txt.shape[:2], bool)
    if cond.get('mask') is not None:
      txt_mask = cond['mask'].astype(bool)
      mask = jnp.concatenate([jnp.ones(img.shape[:2], bool), txt_mask], axis=1)
    feats_img, feats_txt = [], []
    for run in self.runs():
      img, txt = self._run_blocks(ab, sub, run, img, txt, vec, mask)
      if run[-1] + 1 in self.layers:
        feats_img.append(img)
        feats_txt.append(txt)
    return {'img': tuple(feats_img), 'txt': tuple(feats_txt), 'temb': vec, 'txt_mask': txt_mask}
