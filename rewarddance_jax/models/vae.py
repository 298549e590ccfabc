"""AutoencoderKL (the FLUX / SD3 image VAE) in Flax NNX, NHWC, differentiable end to end.

Architecture (Rombach et al. 2022, LDM §3 and App. G; diffusers `AutoencoderKL`):
  Encoder: conv_in → per level [ResNet × layers_per_block, Downsample (pad right/bottom 1, 3×3
           stride 2) except the last] → mid [ResNet, single-head self-attention, ResNet]
           → GroupNorm → SiLU → conv_out (2·latent channels: mean, log-variance)
           [→ quant_conv 1×1 when configured].
  Decoder: [post_quant_conv 1×1] → conv_in → mid → per level, reversed [ResNet ×
           (layers_per_block + 1), Upsample (nearest ×2, 3×3 conv) except the last]
           → GroupNorm → SiLU → conv_out.
  ResNet:  x + conv2(SiLU(GN(conv1(SiLU(GN(x)))))), a 1×1 conv_shortcut when channels change.
The generator's latent is z = (mean − shift)·scale (FLUX: scale 0.3611, shift 0.1159;
SD3: 1.5305, 0.0609): `encode_latents` / `decode_latents` apply and undo it.
Norms run in fp32; convolutions in `dtype`. Gradients flow through `decode_latents` (ReFL).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from rewarddance_jax.nn import layers


@dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 16
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.3611
  shift_factor: float = 0.1159
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False
  mid_block_add_attention: bool = True
  # diffusers config fields the model does not read, kept so that an export round-trips.
  sample_size: int | tuple[int, ...] = 1024
  force_upcast: bool = True
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f'vae block_out_channels {self.block_out_channels} must be multiples of '
                         f'norm_num_groups={self.norm_num_groups}.')


VAE_PRESETS = {
    'flux': VAEConfig(scaling_factor=0.3611, shift_factor=0.1159),
    'sd3': VAEConfig(scaling_factor=1.5305, shift_factor=0.0609),
}


def _kw(cfg: VAEConfig, rngs):
  return dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def conv(cin: int, cout: int, k: int, *, stride: int = 1, padding=None, rngs, dtype, param_dtype,
         out_name: str | None = 'conv_out'):
  """A Conv with HWIO kernel named (None, None, 'conv_in', out_name)."""
  pad = ((k // 2, k // 2),) * 2 if padding is None else padding
  return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=pad, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs,
                  kernel_init=nnx.with_partitioning(layers.default_kernel_init,
                                                    (None, None, 'conv_in', out_name)),
                  bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (out_name,)))


class GroupNorm(nnx.Module):
  """GroupNorm over the channel (last) axis with affine scale/bias; fp32 inside."""

  def __init__(self, channels: int, groups: int, eps: float = 1e-6, param_dtype=jnp.float32):
    self.groups, self.eps = groups, eps
    self.scale = nnx.Param(jnp.ones((channels,), param_dtype), out_sharding=('norm',))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), out_sharding=('norm',))

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
    g = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    return (g * self.scale[...] + self.bias[...]).astype(dtype)


class ResnetBlock(nnx.Module):

  def __init__(self, cin: int, cout: int, cfg: VAEConfig, rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    pd = jnp.dtype(cfg.param_dtype)
    self.norm1 = GroupNorm(cin, cfg.norm_num_groups, param_dtype=pd)
    self.conv1 = conv(cin, cout, 3, **kw)
    self.norm2 = GroupNorm(cout, cfg.norm_num_groups, param_dtype=pd)
    self.conv2 = conv(cout, cout, 3, **kw)
    self.conv_shortcut = conv(cin, cout, 1, **kw) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over the H·W positions, with a residual."""

  def __init__(self, c: int, cfg: VAEConfig, rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    self.group_norm = GroupNorm(c, cfg.norm_num_groups, param_dtype=jnp.dtype(cfg.param_dtype))
    names = ('conv_in', 'conv_out')
    self.q = layers.dense(c, c, names, **kw)
    self.k = layers.dense(c, c, names, **kw)
    self.v = layers.dense(c, c, names, **kw)
    self.out = layers.dense(c, c, names, **kw)

  def __call__(self, x):
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, 1, c)
    q, k, v = self.q(t), self.k(t), self.v(t)
    o = jax.nn.dot_product_attention(q, k, v, implementation='xla')
    return x + self.out(o).reshape(b, h, w, c)


class Level(nnx.Module):
  """One resolution level: ResNets, then an optional resampling conv."""

  def __init__(self, resnets: list, sample):
    self.resnets = nnx.List(resnets)
    self.sample = sample


class MidBlock(nnx.Module):

  def __init__(self, c: int, cfg: VAEConfig, rngs: nnx.Rngs):
    self.resnet0 = ResnetBlock(c, c, cfg, rngs)
    self.attn = AttnBlock(c, cfg, rngs) if cfg.mid_block_add_attention else None
    self.resnet1 = ResnetBlock(c, c, cfg, rngs)

  def __call__(self, x):
    x = self.resnet0(x)
    if self.attn is not None:
      x = self.attn(x)
    return self.resnet1(x)


class Encoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    ch = cfg.block_out_channels
    self.conv_in = conv(cfg.in_channels, ch[0], 3, **kw)
    self.down = nnx.List()
    cin = ch[0]
    for i, cout in enumerate(ch):
      resnets = [ResnetBlock(cin if j == 0 else cout, cout, cfg, rngs)
                 for j in range(cfg.layers_per_block)]
      last = i == len(ch) - 1
      downsample = None if last else conv(cout, cout, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
      self.down.append(Level(resnets, downsample))
      cin = cout
    self.mid = MidBlock(ch[-1], cfg, rngs)
    self.norm_out = GroupNorm(ch[-1], cfg.norm_num_groups, param_dtype=jnp.dtype(cfg.param_dtype))
    self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for level in self.down:
      for r in level.resnets:
        x = r(x)
      if level.sample is not None:
        x = level.sample(x)
    x = self.mid(x)
    return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    ch = tuple(reversed(cfg.block_out_channels))
    self.conv_in = conv(cfg.latent_channels, ch[0], 3, **kw)
    self.mid = MidBlock(ch[0], cfg, rngs)
    self.up = nnx.List()
    cin = ch[0]
    for i, cout in enumerate(ch):
      resnets = [ResnetBlock(cin if j == 0 else cout, cout, cfg, rngs)
                 for j in range(cfg.layers_per_block + 1)]
      last = i == len(ch) - 1
      upsample = None if last else conv(cout, cout, 3, **kw)
      self.up.append(Level(resnets, upsample))
      cin = cout
    self.norm_out = GroupNorm(ch[-1], cfg.norm_num_groups, param_dtype=jnp.dtype(cfg.param_dtype))
    # 3 image channels divide no mesh axis: the last conv's output stays unsharded.
    self.conv_out = conv(ch[-1], cfg.out_channels, 3, out_name=None, **kw)

  def __call__(self, z):
    x = self.mid(self.conv_in(z))
    for level in self.up:
      for r in level.resnets:
        x = r(x)
      if level.sample is not None:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        x = level.sample(x)
    return self.conv_out(jax.nn.silu(self.norm_out(x)))


class AutoencoderKL(nnx.Module):
  """images (B, H, W, C) in [−1, 1] ⇄ latents (B, H/f, W/f, latent_channels), f = 2^(levels−1)."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    kw = _kw(cfg, rngs)
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs)
    self.decoder = Decoder(cfg, rngs)
    c2 = 2 * cfg.latent_channels
    self.quant_conv = conv(c2, c2, 1, **kw) if cfg.use_quant_conv else None
    self.post_quant_conv = (conv(cfg.latent_channels, cfg.latent_channels, 1, **kw)
                            if cfg.use_post_quant_conv else None)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.cfg.block_out_channels) - 1)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """→ (mean, logvar) of the diagonal Gaussian posterior (raw latent space)."""
    h = self.encoder(x.astype(jnp.dtype(self.cfg.dtype)))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    z = z.astype(jnp.dtype(self.cfg.dtype))
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def encode_latents(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Images → the generator's latent (z − shift)·scale; z = mean, or a posterior sample."""
    mean, logvar = self.encode(x)
    z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

  def decode_latents(self, latents: jax.Array) -> jax.Array:
    """The generator's latent → images in [−1, 1] (not clipped, so gradients pass)."""
    return self.decode(latents / self.cfg.scaling_factor + self.cfg.shift_factor)
