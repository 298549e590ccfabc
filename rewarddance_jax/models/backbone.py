"""Backbone reuse: the first K blocks of a frozen generator (+ the reward's own LoRA) as features.

Latent reward models (DiNa-LRM: docs/algorithms.md §5.2; PAVRM: §6.1) read the generator's own
hidden states on a noisy latent x_t. `Backbone(gen_cfg, num_blocks=K, layers=(…))`:
  1. `take(params)`: the part of a generator param tree the first K blocks need (text encoder,
     img/txt/time/vector/guidance embedders, blocks 0..K−1; the later blocks and the output layer
     are left out). List stacks keep the generator's own arrays (same objects: no copy); scanned stacks
     are sliced to their first K layers (inside jit: a slice, never a second copy of the model).
  2. `init_lora(params, key)`: the reward's LoRA over `take(params)` (nn/lora.py; shapes only).
  3. `__call__(base, lora, x, σ, cond)`: merges the LoRA into `take(base)` and runs the generator's
     embedding path exactly as `MMDiT.__call__` does, then blocks 1..K in order (double blocks
     first, then single blocks), recording the visual and text streams after each block in `layers`
     (1-based block numbers, DRM's "after blocks 4, 8, 12"). Returns
        {'img': (B, N, W) per layer, 'txt': (B, L, W) per layer, 'temb': (B, W), 'txt_mask': (B, L)}
     with temb = time_in(emb(1000σ)) [+ guidance] + vector_in(pooled), the vector that modulates
     every block (SD3's time_text_embed).
The base is a frozen input: gradients go to the LoRA only; generator fine-tuning, which builds new
arrays, never changes a reward's base (do not donate buffers a reward still holds).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rewarddance_jax.models.generator import Generator, GeneratorConfig, pack
from rewarddance_jax.nn import layers as layers_lib
from rewarddance_jax.nn import lora as lora_lib
from rewarddance_jax.nn import stack as stack_lib
from rewarddance_jax.nn.rope import image_position_ids, rope_angles

_EMBEDDERS = ('img_in', 'txt_in', 'time_in', 'vector_in', 'guidance_in')
COND_KEYS = ('tokens', 'mask', 'txt', 'pooled')


def cond_from_batch(batch) -> dict:
  """The generator conditioning in a data batch: its 'tokens'/'mask' or 'txt'/'pooled'/'mask'."""
  return {k: batch[k] for k in COND_KEYS if k in batch}


@functools.lru_cache(maxsize=8)
def _abstract_generator(gen_cfg: GeneratorConfig):
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: Generator(gen_cfg, rngs=nnx.Rngs(0)))


@dataclasses.dataclass(frozen=True)
class Backbone:
  """Static description of a truncated generator backbone with LoRA (hashable: closes over jit)."""
  gen_cfg: GeneratorConfig
  num_blocks: int
  layers: tuple[int, ...]
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: str = lora_lib.ATTENTION_TARGETS

  def __post_init__(self):
    cfg = self.gen_cfg.mmdit
    total = cfg.depth_double + cfg.depth_single
    if not 1 <= self.num_blocks <= total:
      raise ValueError(f'backbone num_blocks={self.num_blocks} must lie in [1, {total}] (the '
                       f'generator has {cfg.depth_double} double + {cfg.depth_single} single).')
    layers = tuple(int(l) for l in self.layers)
    if not layers or any(not 1 <= l <= self.num_blocks for l in layers) or sorted(
        set(layers)) != list(layers):
      raise ValueError(f'backbone layers={self.layers} must be increasing block numbers in '
                       f'[1, num_blocks={self.num_blocks}].')
    object.__setattr__(self, 'layers', layers)

  @property
  def width(self) -> int:
    return self.gen_cfg.mmdit.hidden

  def _depths(self) -> tuple[int, int]:
    d = self.gen_cfg.mmdit.depth_double
    return min(self.num_blocks, d), max(0, self.num_blocks - d)

  def take(self, params: Any) -> dict:
    """Text encoder, embedders and the first K blocks of a generator param tree (pure dict)."""
    if 'transformer' not in params:
      raise ValueError('backbone.take needs a generator param tree (no "transformer" key).')
    t = params['transformer']
    n_double, n_single = self._depths()
    scan = self.gen_cfg.mmdit.scan_layers
    sub_t = {k: t[k] for k in _EMBEDDERS if k in t}
    for name, n in (('double_blocks', n_double), ('single_blocks', n_single)):
      if n == 0:
        continue
      stack = t[name]
      if scan:   # leaves without a shape (e.g. NamedShardings) pass through unchanged
        sub_t[name] = jax.tree.map(
            lambda x, n=n: x[:n] if hasattr(x, 'shape') and x.shape[0] != n else x, stack)
      else:
        sub_t[name] = {i: stack[i] for i in range(n)}
    out = {'transformer': sub_t}
    if 'text_encoder' in params:
      out['text_encoder'] = params['text_encoder']
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
    sub = self.take(base)
    if lora is not None:
      sub = lora_lib.merge(sub, lora, lora_lib.lora_scale(self.lora_rank, self.lora_alpha))
    return self._features(sub, x, sigma, cond, guidance)

  def _features(self, sub: dict, x, sigma, cond, guidance) -> dict:
    gen, cfg = self.gen_cfg, self.gen_cfg.mmdit
    ab = _abstract_generator(gen)
    tr, t = ab.transformer, sub['transformer']
    part = lambda module, p: nnx.merge(nnx.graphdef(module), p)
    dtype = jnp.dtype(cfg.dtype)
    # Generator.__call__: pack the latent, encode the text.
    x5 = x if x.ndim == 5 else x[:, None]
    b, f, h, w, c = x5.shape
    if c != gen.latent_channels:
      raise ValueError(f'latent has {c} channels, the backbone expects {gen.latent_channels}.')
    p = gen.patch_size
    tokens, img_ids = pack(x5, p), image_position_ids(b, f, h // p, w // p)
    if gen.text == 'tokens':
      txt, pooled = part(ab.text_encoder, sub['text_encoder'])(cond['tokens'], cond['mask'])
      mask = cond['mask']
    else:
      missing = {'txt', 'pooled'} - set(cond)
      if missing:
        raise ValueError(f'external text conditioning needs keys {sorted(missing)} in cond.')
      txt, pooled, mask = cond['txt'], cond['pooled'], cond.get('mask')
    timesteps = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,)) * gen.timestep_scale
    # MMDiT.__call__ up to the blocks.
    img = part(tr.img_in, t['img_in'])(tokens.astype(dtype))
    txt = part(tr.txt_in, t['txt_in'])(txt.astype(dtype))
    vec = part(tr.time_in, t['time_in'])(
        layers_lib.timestep_embedding(timesteps, 256).astype(dtype))
    if tr.guidance_in is not None:
      if guidance is None:
        raise ValueError('this generator has a guidance embedding: pass guidance (B,).')
      vec = vec + part(tr.guidance_in, t['guidance_in'])(
          layers_lib.timestep_embedding(guidance * 1000.0, 256).astype(dtype))
    vec = vec + part(tr.vector_in, t['vector_in'])(pooled.astype(dtype))
    txt_ids = jnp.zeros((b, txt.shape[1], 3), jnp.float32)
    angles = rope_angles(jnp.concatenate([txt_ids, img_ids], axis=1), cfg.axes_dims,
                         cfg.rope_theta)
    attn_mask = None
    txt_mask = jnp.ones(txt.shape[:2], bool) if mask is None else mask.astype(bool)
    if mask is not None:
      attn_mask = jnp.concatenate([txt_mask, jnp.ones(img.shape[:2], bool)], axis=1)
    # Blocks 1..K, split into segments that end at the recorded layers.
    n_double, _ = self._depths()
    n_txt = txt.shape[1]
    feats_img, feats_txt = [], []
    done = 0
    for stop in self.layers:
      if min(stop, n_double) > done:
        img, txt, *_ = self._run(tr.double_blocks, t['double_blocks'], done, min(stop, n_double),
                                 (img, txt, vec, angles, attn_mask))
      lo, hi = max(done, n_double) - n_double, stop - n_double
      if hi > lo:   # single blocks run on [txt; img] and are split back after each segment
        x_cat, *_ = self._run(tr.single_blocks, t['single_blocks'], lo, hi,
                              (jnp.concatenate([txt, img], axis=1), vec, angles, attn_mask))
        txt, img = x_cat[:, :n_txt], x_cat[:, n_txt:]
      done = stop
      feats_img.append(img)
      feats_txt.append(txt)
    return {'img': tuple(feats_img), 'txt': tuple(feats_txt), 'temb': vec, 'txt_mask': txt_mask}

  def _run(self, abstract_stack, params, lo: int, hi: int, carry):
    cfg = self.gen_cfg.mmdit
    if cfg.scan_layers:
      seg = jax.tree.map(lambda a: a[lo:hi], params)
      stack = nnx.merge(nnx.graphdef(abstract_stack), seg)
    else:
      stack = [nnx.merge(nnx.graphdef(abstract_stack[i]), params[i]) for i in range(lo, hi)]
    # The generator's own stack runner (scan / remat exactly as in the generator).
    return stack_lib.run_stack(stack, cfg, hi - lo, carry)
