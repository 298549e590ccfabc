"""AutoencoderKL: diffusers layout ⇄ `models/vae.py`, config and key map.

diffusers keys: {encoder,decoder}.conv_in / conv_out / conv_norm_out,
encoder.down_blocks.i.resnets.j.{norm1,conv1,norm2,conv2,conv_shortcut},
encoder.down_blocks.i.downsamplers.0.conv, decoder.up_blocks.i.upsamplers.0.conv,
*.mid_block.resnets.{0,1}, *.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0},
[quant_conv, post_quant_conv]. Conv weights OIHW → HWIO; linears transposed; GroupNorm weight →
scale.
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

from rewarddance_jax.models.vae import AutoencoderKL, VAEConfig
from rewarddance_jax.weights import cache, json_file, loader
from rewarddance_jax.weights.spec import ModelSpec
from rewarddance_jax.weights.keymap import CONV2D, IDENTITY, LINEAR, Rule

CLASS_NAME = 'AutoencoderKL'
WEIGHTS_NAME = 'diffusion_pytorch_model'


def _conv(src: str, dst: tuple) -> list[Rule]:
  return [Rule(f'{src}.weight', dst + ('kernel',), CONV2D), Rule(f'{src}.bias', dst + ('bias',))]


def _lin(src: str, dst: tuple) -> list[Rule]:
  return [Rule(f'{src}.weight', dst + ('kernel',), LINEAR), Rule(f'{src}.bias', dst + ('bias',))]


def _norm(src: str, dst: tuple) -> list[Rule]:
  return [Rule(f'{src}.weight', dst + ('scale',), IDENTITY), Rule(f'{src}.bias', dst + ('bias',))]


def _resnet(src: str, dst: tuple, cin: int, cout: int) -> list[Rule]:
  out = (_norm(f'{src}.norm1', dst + ('norm1',)) + _conv(f'{src}.conv1', dst + ('conv1',))
         + _norm(f'{src}.norm2', dst + ('norm2',)) + _conv(f'{src}.conv2', dst + ('conv2',)))
  if cin != cout:
    out += _conv(f'{src}.conv_shortcut', dst + ('conv_shortcut',))
  return out


def _mid(src: str, dst: tuple, c: int, attention: bool) -> list[Rule]:
  out = (_resnet(f'{src}.resnets.0', dst + ('resnet0',), c, c)
         + _resnet(f'{src}.resnets.1', dst + ('resnet1',), c, c))
  if attention:
    a, d = f'{src}.attentions.0', dst + ('attn',)
    out += (_norm(f'{a}.group_norm', d + ('group_norm',)) + _lin(f'{a}.to_q', d + ('q',))
            + _lin(f'{a}.to_k', d + ('k',)) + _lin(f'{a}.to_v', d + ('v',))
            + _lin(f'{a}.to_out.0', d + ('out',)))
  return out


def rules(cfg: VAEConfig, prefix: tuple = ()) -> list[Rule]:
  p = tuple(prefix)
  ch = cfg.block_out_channels
  out = _conv('encoder.conv_in', p + ('encoder', 'conv_in'))
  cin = ch[0]
  for i, cout in enumerate(ch):
    for j in range(cfg.layers_per_block):
      out += _resnet(f'encoder.down_blocks.{i}.resnets.{j}',
                     p + ('encoder', 'down', i, 'resnets', j), cin if j == 0 else cout, cout)
    if i < len(ch) - 1:
      out += _conv(f'encoder.down_blocks.{i}.downsamplers.0.conv',
                   p + ('encoder', 'down', i, 'sample'))
    cin = cout
  out += _mid('encoder.mid_block', p + ('encoder', 'mid'), ch[-1], cfg.mid_block_add_attention)
  out += _norm('encoder.conv_norm_out', p + ('encoder', 'norm_out'))
  out += _conv('encoder.conv_out', p + ('encoder', 'conv_out'))
  rch = tuple(reversed(ch))
  out += _conv('decoder.conv_in', p + ('decoder', 'conv_in'))
  out += _mid('decoder.mid_block', p + ('decoder', 'mid'), rch[0], cfg.mid_block_add_attention)
  cin = rch[0]
  for i, cout in enumerate(rch):
    for j in range(cfg.layers_per_block + 1):
      out += _resnet(f'decoder.up_blocks.{i}.resnets.{j}', p + ('decoder', 'up', i, 'resnets', j),
                     cin if j == 0 else cout, cout)
    if i < len(rch) - 1:
      out += _conv(f'decoder.up_blocks.{i}.upsamplers.0.conv', p + ('decoder', 'up', i, 'sample'))
    cin = cout
  out += _norm('decoder.conv_norm_out', p + ('decoder', 'norm_out'))
  out += _conv('decoder.conv_out', p + ('decoder', 'conv_out'))
  if cfg.use_quant_conv:
    out += _conv('quant_conv', p + ('quant_conv',))
  if cfg.use_post_quant_conv:
    out += _conv('post_quant_conv', p + ('post_quant_conv',))
  return out


def _tuple(x):
  return tuple(x) if isinstance(x, (list, tuple)) else x


def _list(x):
  return list(x) if isinstance(x, tuple) else x


def vae_config(diffusers_cfg: dict, **overrides) -> VAEConfig:
  """Our VAEConfig from an AutoencoderKL config.json dict (+ dtype overrides)."""
  c = dict(diffusers_cfg)
  if c.get('_class_name', CLASS_NAME) != CLASS_NAME:
    raise ValueError(f'config is a {c["_class_name"]}, not an {CLASS_NAME}.')
  for key, want in (('down_block_types', 'DownEncoderBlock2D'),
                    ('up_block_types', 'UpDecoderBlock2D')):
    bad = [t for t in c.get(key, [want]) if t != want]
    if bad:
      raise ValueError(f'VAE config {key} has unsupported block type(s) {bad}.')
  if c.get('act_fn', 'silu') != 'silu':
    raise ValueError(f'VAE config act_fn={c["act_fn"]!r}: only silu is supported.')
  return VAEConfig(
      in_channels=c.get('in_channels', 3), out_channels=c.get('out_channels', 3),
      latent_channels=c.get('latent_channels', 4),
      block_out_channels=tuple(c.get('block_out_channels', (64,))),
      layers_per_block=c.get('layers_per_block', 1), norm_num_groups=c.get('norm_num_groups', 32),
      scaling_factor=float(c.get('scaling_factor', 0.18215)),
      shift_factor=float(c.get('shift_factor') or 0.0),
      use_quant_conv=bool(c.get('use_quant_conv', True)),
      use_post_quant_conv=bool(c.get('use_post_quant_conv', True)),
      mid_block_add_attention=bool(c.get('mid_block_add_attention', True)),
      sample_size=_tuple(c.get('sample_size', 32)), force_upcast=bool(c.get('force_upcast', True)),
      latents_mean=_tuple(c.get('latents_mean')), latents_std=_tuple(c.get('latents_std')),
      **overrides)


def diffusers_config(cfg: VAEConfig) -> dict:
  """The AutoencoderKL config.json dict for our config (the inverse of `vae_config`)."""
  n = len(cfg.block_out_channels)
  return {'_class_name': CLASS_NAME, '_diffusers_version': '0.42.1',
          'in_channels': cfg.in_channels, 'out_channels': cfg.out_channels,
          'down_block_types': ['DownEncoderBlock2D'] * n,
          'up_block_types': ['UpDecoderBlock2D'] * n,
          'block_out_channels': list(cfg.block_out_channels),
          'layers_per_block': cfg.layers_per_block, 'act_fn': 'silu',
          'latent_channels': cfg.latent_channels, 'norm_num_groups': cfg.norm_num_groups,
          'sample_size': _list(cfg.sample_size), 'scaling_factor': cfg.scaling_factor,
          'shift_factor': cfg.shift_factor, 'latents_mean': _list(cfg.latents_mean),
          'latents_std': _list(cfg.latents_std), 'force_upcast': cfg.force_upcast,
          'use_quant_conv': cfg.use_quant_conv, 'use_post_quant_conv': cfg.use_post_quant_conv,
          'mid_block_add_attention': cfg.mid_block_add_attention}


def model_dir(path: str) -> str:
  sub = os.path.join(path, 'vae')
  return sub if os.path.isfile(os.path.join(sub, 'config.json')) else path


def spec(path: str, **overrides) -> ModelSpec:
  cfg = vae_config(json_file.read(os.path.join(model_dir(path), 'config.json')), **overrides)
  return ModelSpec('vae', model_dir(path), cfg, lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)),
                   tuple(rules(cfg)), prefer=WEIGHTS_NAME)


def load(path: str, mesh, sharding_rules, *, cache_dir: str | None = None,
         progress: bool = False, **overrides):
  """diffusers AutoencoderKL directory (or a pipeline's root) → (graphdef, params, VAEConfig)."""
  s = spec(path, **overrides)
  graphdef, params = cache.load_model(s, mesh, sharding_rules, cache_dir=cache_dir,
                                      progress=progress)
  return graphdef, params, s.cfg


def export(params: dict, cfg: VAEConfig, out_dir: str, *, dtype=np.float32) -> list[str]:
  """Our VAE params → `out_dir/{config.json, diffusion_pytorch_model.safetensors}`."""
  return loader.export(params, rules(cfg), out_dir, WEIGHTS_NAME, dtype=dtype,
                       config=diffusers_config(cfg))
