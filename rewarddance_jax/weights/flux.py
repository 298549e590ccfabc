"""FLUX.1: diffusers `FluxTransformer2DModel` ⇄ our `Generator` (MMDiT), config and key map.

Layout facts (diffusers 0.42 `transformer_flux.py`):
  1. The transformer sees packed 2×2 tokens (diffusers patch_size=1, in_channels=64 = 16·2·2,
     channel order (c, ph, pw)), exactly what our `pack` gives; diffusers' timestep/guidance
     inputs are σ and g, multiplied by 1000 inside, our Generator passes 1000·σ.
  2. Double block: norm1/norm1_context.linear → img_mod/txt_mod (shift, scale, gate ×2);
     attn.to_{q,k,v}/norm_{q,k} → img_attn, attn.add_{q,k,v}_proj/norm_added_{q,k} → txt_attn;
     our q/k/v live in one `qkv` kernel, columns interleaved per head (head h: q_h, k_h, v_h), so
     one GEMM projects all three and a tensor split over heads keeps each head's q, k, v local;
     attn.to_out.0 → img_out, attn.to_add_out → txt_out; ff/ff_context.net.{0.proj,2} → *_mlp.
  3. Single block: proj_out acts on concat(attn, mlp): its weight columns [:D] are our attn_out,
     [D:] our mlp_out (which also takes the bias).
  4. norm_out (AdaLayerNormContinuous) emits (scale, shift); our final_mod emits (shift, scale)
     as BFL's FLUX does: the two halves are swapped on import and export.
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

from rewarddance_jax.models.generator import Generator, GeneratorConfig
from rewarddance_jax.models.mmdit import MMDiTConfig
from rewarddance_jax.weights import cache, json_file, loader
from rewarddance_jax.weights.spec import ModelSpec
from rewarddance_jax.weights.keymap import (IDENTITY, LINEAR, LINEAR_SWAP_HALVES, SWAP_HALVES, Rule,
                                            expand_blocks)

CLASS_NAME = 'FluxTransformer2DModel'
WEIGHTS_NAME = 'diffusion_pytorch_model'


def _linear(src: str, dst: tuple, bias: bool = True) -> list[tuple]:
  rows = [(f'{src}.weight', dst + ('kernel',), LINEAR)]
  if bias:
    rows.append((f'{src}.bias', dst + ('bias',), IDENTITY))
  return rows


def _attn(cfg: MMDiTConfig, src_q: str, src_k: str, src_v: str, src_qn: str, src_kn: str,
          dst: tuple) -> list:
  # to_q, to_k, to_v → one qkv kernel whose columns are interleaved per head: (D, H, 3, hd).
  view = (cfg.hidden, cfg.num_heads, 3, cfg.head_dim)
  rows = []
  for i, src in enumerate((src_q, src_k, src_v)):
    rows += [(f'{src}.weight', dst + ('qkv', 'kernel'), LINEAR, None, (view, 2, i)),
             (f'{src}.bias', dst + ('qkv', 'bias'), IDENTITY, None, (view[1:], 1, i))]
  return rows + [(f'{src_qn}.weight', dst + ('q_norm', 'scale'), IDENTITY),
                 (f'{src_kn}.weight', dst + ('k_norm', 'scale'), IDENTITY)]


def double_block_table(cfg: MMDiTConfig) -> list[tuple]:
  return (_linear('norm1.linear', ('img_mod', 'lin'))
          + _linear('norm1_context.linear', ('txt_mod', 'lin'))
          + _attn(cfg, 'attn.to_q', 'attn.to_k', 'attn.to_v', 'attn.norm_q', 'attn.norm_k',
                  ('img_attn',))
          + _attn(cfg, 'attn.add_q_proj', 'attn.add_k_proj', 'attn.add_v_proj', 'attn.norm_added_q',
                  'attn.norm_added_k', ('txt_attn',))
          + _linear('attn.to_out.0', ('img_out',)) + _linear('attn.to_add_out', ('txt_out',))
          + _linear('ff.net.0.proj', ('img_mlp', 'fc1')) + _linear('ff.net.2', ('img_mlp', 'fc2'))
          + _linear('ff_context.net.0.proj', ('txt_mlp', 'fc1'))
          + _linear('ff_context.net.2', ('txt_mlp', 'fc2')))


def single_block_table(cfg: MMDiTConfig) -> list[tuple]:
  d, h = cfg.hidden, int(cfg.hidden * cfg.mlp_ratio)
  return (_linear('norm.linear', ('mod', 'lin'))
          + _attn(cfg, 'attn.to_q', 'attn.to_k', 'attn.to_v', 'attn.norm_q', 'attn.norm_k',
                  ('attn',))
          + _linear('proj_mlp', ('mlp_in',))
          + [('proj_out.weight', ('attn_out', 'kernel'), LINEAR, (1, 0, d)),
             ('proj_out.weight', ('mlp_out', 'kernel'), LINEAR, (1, d, d + h)),
             ('proj_out.bias', ('mlp_out', 'bias'), IDENTITY)])


def rules(cfg: MMDiTConfig, prefix: tuple = ('transformer',)) -> list[Rule]:
  """The full key map for a FLUX MMDiT whose params live under `prefix` in our tree."""
  top = (_linear('x_embedder', ('img_in',)) + _linear('context_embedder', ('txt_in',))
         + _linear('time_text_embed.timestep_embedder.linear_1', ('time_in', 'in_layer'))
         + _linear('time_text_embed.timestep_embedder.linear_2', ('time_in', 'out_layer'))
         + _linear('time_text_embed.text_embedder.linear_1', ('vector_in', 'in_layer'))
         + _linear('time_text_embed.text_embedder.linear_2', ('vector_in', 'out_layer'))
         + _linear('proj_out', ('final_out',))
         + [('norm_out.linear.weight', ('final_mod', 'lin', 'kernel'), LINEAR_SWAP_HALVES),
            ('norm_out.linear.bias', ('final_mod', 'lin', 'bias'), SWAP_HALVES)])
  if cfg.guidance_embed:
    top += (_linear('time_text_embed.guidance_embedder.linear_1', ('guidance_in', 'in_layer'))
            + _linear('time_text_embed.guidance_embedder.linear_2', ('guidance_in', 'out_layer')))
  out = [Rule(src, tuple(prefix) + dst, tf) for src, dst, tf in top]
  out += expand_blocks(cfg.depth_double, 'transformer_blocks', tuple(prefix) + ('double_blocks',),
                       double_block_table(cfg), cfg.scan_layers)
  out += expand_blocks(cfg.depth_single, 'single_transformer_blocks',
                       tuple(prefix) + ('single_blocks',), single_block_table(cfg), cfg.scan_layers)
  return out


def generator_config(diffusers_cfg: dict, **overrides) -> GeneratorConfig:
  """Our GeneratorConfig from a FluxTransformer2DModel config.json dict (+ MMDiTConfig overrides,
  e.g. dtype, scan_layers, remat, attention)."""
  c = dict(diffusers_cfg)
  if c.get('_class_name', CLASS_NAME) != CLASS_NAME:
    raise ValueError(f'config is a {c["_class_name"]}, not a {CLASS_NAME}.')
  if c.get('patch_size', 1) != 1:
    raise ValueError(f'FLUX config patch_size={c["patch_size"]}: only 1 (pipeline-packed 2x2 '
                     f'tokens) is supported.')
  in_ch = c.get('in_channels', 64)
  if in_ch % 4:
    raise ValueError(f'FLUX config in_channels={in_ch} is not latent_channels·2·2.')
  out_ch = c.get('out_channels') or in_ch
  if out_ch != in_ch:
    raise ValueError(f'FLUX config out_channels={out_ch} != in_channels={in_ch} is not supported.')
  mm = MMDiTConfig(in_channels=in_ch, num_heads=c.get('num_attention_heads', 24),
                   head_dim=c.get('attention_head_dim', 128), depth_double=c.get('num_layers', 19),
                   depth_single=c.get('num_single_layers', 38), mlp_ratio=4.0,
                   context_dim=c.get('joint_attention_dim', 4096),
                   pooled_dim=c.get('pooled_projection_dim', 768),
                   axes_dims=tuple(c.get('axes_dims_rope', (16, 56, 56))), rope_theta=10000.0,
                   guidance_embed=bool(c.get('guidance_embeds', False)), qkv_bias=True,
                   **overrides)
  return GeneratorConfig(mmdit=mm, latent_channels=in_ch // 4, patch_size=2, text='external')


def diffusers_config(cfg: GeneratorConfig) -> dict:
  """The FluxTransformer2DModel config.json dict for our config (the inverse of the above)."""
  m = cfg.mmdit
  if cfg.patch_size != 2 or cfg.text != 'external' or m.mlp_ratio != 4.0 or not m.qkv_bias:
    raise ValueError('only FLUX-shaped generators (patch 2, external text, mlp_ratio 4, qkv bias) '
                     'export to FluxTransformer2DModel.')
  return {'_class_name': CLASS_NAME, '_diffusers_version': '0.42.1', 'patch_size': 1,
          'in_channels': m.in_channels, 'out_channels': None, 'num_layers': m.depth_double,
          'num_single_layers': m.depth_single, 'attention_head_dim': m.head_dim,
          'num_attention_heads': m.num_heads, 'joint_attention_dim': m.context_dim,
          'pooled_projection_dim': m.pooled_dim, 'guidance_embeds': m.guidance_embed,
          'axes_dims_rope': list(m.axes_dims)}


def model_dir(path: str) -> str:
  """A transformer directory: `path` itself, or `path/transformer` of a pipeline directory."""
  sub = os.path.join(path, 'transformer')
  if os.path.isdir(sub) and os.path.isfile(os.path.join(sub, 'config.json')):
    return sub
  return path


def read_config(path: str) -> dict:
  return json_file.read(os.path.join(model_dir(path), 'config.json'),
                        'a diffusers transformer directory holds one')


def spec(path: str, **overrides) -> ModelSpec:
  """The import plan for a diffusers FLUX directory (or a pipeline root holding transformer/)."""
  cfg = generator_config(read_config(path), **overrides)
  return ModelSpec('flux', model_dir(path), cfg, lambda: Generator(cfg, rngs=nnx.Rngs(0)),
                   tuple(rules(cfg.mmdit)), prefer=WEIGHTS_NAME)


def load(path: str, mesh, sharding_rules, *, cache_dir: str | None = None,
         progress: bool = False, **overrides):
  """diffusers FLUX directory → (graphdef, params placed in their shardings, GeneratorConfig).

  `overrides` go to MMDiTConfig (dtype, param_dtype, scan_layers, remat, attention, ...);
  `cache_dir` enables the converted-weights cache.
  """
  s = spec(path, **overrides)
  graphdef, params = cache.load_model(s, mesh, sharding_rules, cache_dir=cache_dir,
                                      progress=progress)
  return graphdef, params, s.cfg


def export(params: dict, cfg: GeneratorConfig, out_dir: str, *, dtype=None,
           max_shard_bytes: int = 5 * 2**30, progress: bool = False) -> list[str]:
  """Our generator params → `out_dir/{config.json, diffusion_pytorch_model*.safetensors}`."""
  return loader.export(params, rules(cfg.mmdit), out_dir, WEIGHTS_NAME,
                       dtype=dtype or np.float32, max_shard_bytes=max_shard_bytes,
                       progress=progress, config=diffusers_config(cfg))
