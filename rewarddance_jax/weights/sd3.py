"""SD3 / SD3.5: diffusers `SD3Transformer2DModel` ⇄ `models/sd3.py`, config and key map.

Layout facts (diffusers 0.42 `transformer_sd3.py`, `attention.py` JointTransformerBlock):
  1. pos_embed.proj is a p×p stride-p conv [D, C, p, p]; flattened to [D, C·p·p] it is a linear on
     our packed tokens (channel order (c, ph, pw)). pos_embed.pos_embed [1, M², D] is the fixed
     sin-cos table, kept as a Buffer.
  2. proj_out emits (ph, pw, c) per token ("nhwpqc->nchpwq"); its rows are permuted to (c, ph, pw)
     so our `unpack` applies.
  3. norm1.linear → img_mod (6 chunks, 9 with dual attention: … shift/scale/gate of attn2);
     norm1_context.linear → txt_mod (6 chunks; the last, context-pre-only block uses
     AdaLayerNormContinuous = (scale, shift), swapped to our (shift, scale)).
  4. attn.{to_q,to_k,to_v,norm_q,norm_k} → img_attn; attn.{add_q_proj,…,norm_added_q/k} →
     txt_attn; attn.to_out.0 → img_out; attn.to_add_out → txt_out; attn2.* → attn2, attn2_out.
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

from rewarddance_jax.models.sd3 import SD3Config, SD3Generator
from rewarddance_jax.weights import cache, json_file, loader
from rewarddance_jax.weights.spec import ModelSpec
from rewarddance_jax.weights.keymap import (IDENTITY, LINEAR, LINEAR_SWAP_HALVES, SWAP_HALVES, Rule,
                                            Transform)

CLASS_NAME = 'SD3Transformer2DModel'
WEIGHTS_NAME = 'diffusion_pytorch_model'

SQUEEZE0 = Transform('squeeze0', lambda x: x[0], lambda y: y[None], lambda s: tuple(s[1:]))
# Conv [D, C, p, p] → kernel [C·p·p, D] (c, ph, pw order).
PATCH_CONV = Transform('patch_conv', lambda x: x.reshape(x.shape[0], -1).T, None,
                       lambda s: (int(np.prod(s[1:])), s[0]))


def _patch_conv(c: int, p: int) -> Transform:
  return Transform('patch_conv', PATCH_CONV.fwd, lambda y: y.T.reshape(-1, c, p, p),
                   PATCH_CONV.shape)


def _unpatch_rows(c: int, p: int, weight: bool) -> Transform:
  """proj_out rows (ph, pw, c) → our columns (c, ph, pw); weight [p·p·C, D] or bias [p·p·C]."""
  def fwd(x):
    y = x.reshape(p, p, c, *x.shape[1:]).transpose(2, 0, 1, *range(3, x.ndim + 2))
    y = y.reshape(c * p * p, *x.shape[1:])
    return y.T if weight else y

  def inv(y):
    x = y.T if weight else y
    x = x.reshape(c, p, p, *x.shape[1:]).transpose(1, 2, 0, *range(3, x.ndim + 2))
    return x.reshape(p * p * c, *x.shape[3:])

  return Transform('unpatch_rows', fwd, inv, (lambda s: tuple(s[::-1])) if weight else tuple)


def _lin(src: str, dst: tuple, tf=LINEAR, btf=IDENTITY) -> list[tuple]:
  return [(f'{src}.weight', dst + ('kernel',), tf), (f'{src}.bias', dst + ('bias',), btf)]


def _attn(prefix: str, names: tuple, norms: tuple, dst: tuple, qk_norm: bool) -> list[tuple]:
  out = []
  for name, ours in zip(names, ('q', 'k', 'v')):
    out += _lin(f'{prefix}.{name}', dst + (ours,))
  if qk_norm:
    out += [(f'{prefix}.{norms[0]}.weight', dst + ('q_norm', 'scale'), IDENTITY),
            (f'{prefix}.{norms[1]}.weight', dst + ('k_norm', 'scale'), IDENTITY)]
  return out


def block_table(cfg: SD3Config, i: int) -> list[tuple]:
  pre_only, dual = i == cfg.depth - 1, i in cfg.dual_attention_layers
  rows = _lin('norm1.linear', ('img_mod', 'lin'))
  if pre_only:
    rows += _lin('norm1_context.linear', ('txt_mod', 'lin'), LINEAR_SWAP_HALVES, SWAP_HALVES)
  else:
    rows += _lin('norm1_context.linear', ('txt_mod', 'lin'))
  rows += _attn('attn', ('to_q', 'to_k', 'to_v'), ('norm_q', 'norm_k'), ('img_attn',), cfg.qk_norm)
  rows += _attn('attn', ('add_q_proj', 'add_k_proj', 'add_v_proj'),
                ('norm_added_q', 'norm_added_k'), ('txt_attn',), cfg.qk_norm)
  rows += _lin('attn.to_out.0', ('img_out',))
  rows += _lin('ff.net.0.proj', ('img_mlp', 'fc1')) + _lin('ff.net.2', ('img_mlp', 'fc2'))
  if not pre_only:
    rows += _lin('attn.to_add_out', ('txt_out',))
    rows += (_lin('ff_context.net.0.proj', ('txt_mlp', 'fc1'))
             + _lin('ff_context.net.2', ('txt_mlp', 'fc2')))
  if dual:
    rows += _attn('attn2', ('to_q', 'to_k', 'to_v'), ('norm_q', 'norm_k'), ('attn2',),
                  cfg.qk_norm)
    rows += _lin('attn2.to_out.0', ('attn2_out',))
  return rows


def rules(cfg: SD3Config, prefix: tuple = ()) -> list[Rule]:
  c, p = cfg.latent_channels, cfg.patch_size
  top = ([('pos_embed.proj.weight', ('img_in', 'kernel'), _patch_conv(c, p)),
          ('pos_embed.proj.bias', ('img_in', 'bias'), IDENTITY),
          ('pos_embed.pos_embed', ('pos_embed',), SQUEEZE0)]
         + _lin('context_embedder', ('txt_in',))
         + _lin('time_text_embed.timestep_embedder.linear_1', ('time_in', 'in_layer'))
         + _lin('time_text_embed.timestep_embedder.linear_2', ('time_in', 'out_layer'))
         + _lin('time_text_embed.text_embedder.linear_1', ('vector_in', 'in_layer'))
         + _lin('time_text_embed.text_embedder.linear_2', ('vector_in', 'out_layer'))
         + _lin('norm_out.linear', ('final_mod', 'lin'), LINEAR_SWAP_HALVES, SWAP_HALVES)
         + _lin('proj_out', ('final_out',), _unpatch_rows(c, p, True), _unpatch_rows(c, p, False)))
  pre = tuple(prefix)
  out = [Rule(src, pre + dst, tf) for src, dst, tf in top]
  for i in range(cfg.depth):
    out += [Rule(f'transformer_blocks.{i}.{src}', pre + ('blocks', i) + dst, tf)
            for src, dst, tf in block_table(cfg, i)]
  return out


def sd3_config(diffusers_cfg: dict, **overrides) -> SD3Config:
  c = dict(diffusers_cfg)
  if c.get('_class_name', CLASS_NAME) != CLASS_NAME:
    raise ValueError(f'config is a {c["_class_name"]}, not a {CLASS_NAME}.')
  in_ch, out_ch = c.get('in_channels', 16), c.get('out_channels', 16)
  if out_ch != in_ch:
    raise ValueError(f'SD3 config out_channels={out_ch} != in_channels={in_ch} is not supported.')
  qk = c.get('qk_norm')
  if qk not in (None, 'rms_norm'):
    raise ValueError(f'SD3 config qk_norm={qk!r}: only None and "rms_norm" are supported.')
  return SD3Config(
      latent_channels=in_ch, patch_size=c.get('patch_size', 2),
      num_heads=c.get('num_attention_heads', 18), head_dim=c.get('attention_head_dim', 64),
      depth=c.get('num_layers', 18), context_dim=c.get('joint_attention_dim', 4096),
      caption_projection_dim=c.get('caption_projection_dim', 1152),
      pooled_dim=c.get('pooled_projection_dim', 2048),
      pos_embed_max_size=c.get('pos_embed_max_size', 96),
      dual_attention_layers=tuple(c.get('dual_attention_layers', ())), qk_norm=qk == 'rms_norm',
      sample_size=c.get('sample_size', 128), **overrides)


def diffusers_config(cfg: SD3Config) -> dict:
  """The SD3Transformer2DModel config.json dict for our config (the inverse of `sd3_config`)."""
  return {'_class_name': CLASS_NAME, '_diffusers_version': '0.42.1',
          'sample_size': cfg.sample_size,
          'patch_size': cfg.patch_size, 'in_channels': cfg.latent_channels,
          'num_layers': cfg.depth, 'attention_head_dim': cfg.head_dim,
          'num_attention_heads': cfg.num_heads, 'joint_attention_dim': cfg.context_dim,
          'caption_projection_dim': cfg.caption_projection_dim,
          'pooled_projection_dim': cfg.pooled_dim, 'out_channels': cfg.latent_channels,
          'pos_embed_max_size': cfg.pos_embed_max_size,
          'dual_attention_layers': list(cfg.dual_attention_layers),
          'qk_norm': 'rms_norm' if cfg.qk_norm else None}


def model_dir(path: str) -> str:
  sub = os.path.join(path, 'transformer')
  return sub if os.path.isfile(os.path.join(sub, 'config.json')) else path


def read_config(path: str) -> dict:
  return json_file.read(os.path.join(model_dir(path), 'config.json'),
                        'a diffusers transformer directory holds one')


def spec(path: str, **overrides) -> ModelSpec:
  cfg = sd3_config(read_config(path), **overrides)
  return ModelSpec('sd3', model_dir(path), cfg, lambda: SD3Generator(cfg, rngs=nnx.Rngs(0)),
                   tuple(rules(cfg)), prefer=WEIGHTS_NAME)


def load(path: str, mesh, sharding_rules, *, cache_dir: str | None = None,
         progress: bool = False, **overrides):
  """diffusers SD3 directory → (graphdef, params, SD3Config)."""
  s = spec(path, **overrides)
  graphdef, params = cache.load_model(s, mesh, sharding_rules, cache_dir=cache_dir,
                                      progress=progress)
  return graphdef, params, s.cfg


def export(params: dict, cfg: SD3Config, out_dir: str, *, dtype=np.float32,
           max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Our SD3 params → `out_dir/{config.json, diffusion_pytorch_model*.safetensors}`."""
  return loader.export(params, rules(cfg), out_dir, WEIGHTS_NAME, dtype=dtype,
                       max_shard_bytes=max_shard_bytes, config=diffusers_config(cfg))
