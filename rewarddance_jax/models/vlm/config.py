"""Static architecture of the InternVL-style VLM (hashable dataclasses: they live in graphdefs).

`VLMConfig` = `VisionConfig` (InternViT) + `TextConfig` (Qwen2) + the projector/token fields of
transformers' `InternVLConfig`. `from_hf_dict` reads a transformers `config.json` (model_type
'internvl', text model_type 'qwen2'), naming the first unsupported field it meets.
"""

from __future__ import annotations

from dataclasses import dataclass

from rewarddance_jax import config_lib
from rewarddance_jax.nn.stack import REMAT_POLICIES


@dataclass(frozen=True)
class VisionConfig:
  """InternViT encoder: patch conv + cls token + absolute positions, pre-norm blocks with layer
  scale, optional qk RMSNorm over the full width."""
  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  intermediate_size: int = 4096
  image_size: int = 448
  patch_size: int = 14
  num_channels: int = 3
  qkv_bias: bool = True
  qk_norm: bool = False
  norm_type: str = 'layer_norm'          # 'layer_norm' | 'rms_norm'
  norm_eps: float = 1e-6
  layer_scale_init: float = 0.1
  use_mean_pooling: bool = True          # True: no final LayerNorm (transformers' convention)

  RANGES = {'hidden_size': '[1, inf)', 'num_layers': '[0, inf)', 'num_heads': '[1, inf)',
            'intermediate_size': '[1, inf)', 'image_size': '[1, inf)', 'patch_size': '[1, inf)',
            'num_channels': '[1, inf)', 'norm_eps': '[0, inf)', 'layer_scale_init': '[0, inf)'}

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f'vision.hidden_size={self.hidden_size} is not divisible by '
                       f'vision.num_heads={self.num_heads}.')
    if self.image_size % self.patch_size:
      raise ValueError(f'vision.image_size={self.image_size} is not a multiple of '
                       f'vision.patch_size={self.patch_size}.')
    if self.norm_type not in ('layer_norm', 'rms_norm'):
      raise ValueError(f'vision.norm_type={self.norm_type!r} is not layer_norm or rms_norm.')


@dataclass(frozen=True)
class TextConfig:
  """Qwen2 decoder: GQA with q/k/v bias, rotate-half RoPE, SwiGLU MLP, RMSNorm."""
  vocab_size: int = 151674
  hidden_size: int = 896
  num_layers: int = 24
  num_heads: int = 14
  num_kv_heads: int = 2
  head_dim: int = 0                      # 0: hidden_size // num_heads
  intermediate_size: int = 4864
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  tie_word_embeddings: bool = False

  RANGES = {'vocab_size': '[1, inf)', 'hidden_size': '[1, inf)', 'num_layers': '[0, inf)',
            'num_heads': '[1, inf)', 'num_kv_heads': '[1, inf)', 'head_dim': '[0, inf)',
            'intermediate_size': '[1, inf)', 'rms_norm_eps': '[0, inf)', 'rope_theta': '(0, inf)'}

  @property
  def dim_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'text.num_heads={self.num_heads} is not a multiple of '
                       f'text.num_kv_heads={self.num_kv_heads} (GQA groups).')


@dataclass(frozen=True)
class VLMConfig:
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  downsample_ratio: float = 0.5
  image_token_id: int = 151667
  projector_norm_eps: float = 1e-5       # torch nn.LayerNorm default in the projector
  dtype: str = 'float32'                 # compute dtype (params stay param_dtype)
  param_dtype: str = 'float32'
  scan_layers: bool = False
  remat: str = 'none'
  attention: str = 'auto'

  RANGES = {'downsample_ratio': '(0, 1]', 'image_token_id': '[0, inf)',
            'projector_norm_eps': '[0, inf)'}

  @property
  def shuffle(self) -> int:
    """Pixel-shuffle factor s = 1/downsample_ratio: s×s patches become one token."""
    return int(round(1.0 / self.downsample_ratio))

  @property
  def tokens_per_tile(self) -> int:
    return (self.vision.grid // self.shuffle) ** 2

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'vlm.remat={self.remat!r} is not one of {tuple(REMAT_POLICIES)}.')
    if self.vision.grid % self.shuffle:
      raise ValueError(f'vision grid {self.vision.grid} is not divisible by the pixel-shuffle '
                       f'factor {self.shuffle} (downsample_ratio={self.downsample_ratio}).')


def vlm_config(cfg, where: str = 'config.vlm') -> VLMConfig:
  """VLMConfig from a mapping (an ml_collections section): keys 'vision', 'text' and the rest."""
  return config_lib.section(VLMConfig, cfg, where)


def _pair(v, name):
  if isinstance(v, (list, tuple)):
    if len(v) != 2 or v[0] != v[1]:
      raise ValueError(f'config.json {name}={v}: only square sizes are supported.')
    return int(v[0])
  return int(v)


def from_hf_dict(d: dict, **overrides) -> VLMConfig:
  """VLMConfig from a transformers InternVL `config.json` dict; unsupported settings raise."""
  if d.get('model_type') != 'internvl':
    raise ValueError(f'config.json model_type={d.get("model_type")!r}; expected "internvl".')
  v, t = d.get('vision_config', {}), d.get('text_config', {})
  if t.get('model_type', 'qwen2') != 'qwen2':
    raise ValueError(f'config.json text_config.model_type={t.get("model_type")!r}; only qwen2.')
  checks = {
      'vision_feature_layer': (d.get('vision_feature_layer', -1), -1),
      'vision_feature_select_strategy': (d.get('vision_feature_select_strategy', 'default'),
                                         'default'),
      'projector_hidden_act': (d.get('projector_hidden_act', 'gelu'), 'gelu'),
      'vision_config.hidden_act': (v.get('hidden_act', 'gelu'), 'gelu'),
      'text_config.hidden_act': (t.get('hidden_act', 'silu'), 'silu'),
      'text_config.use_sliding_window': (t.get('use_sliding_window', False), False),
  }
  for name, (got, want) in checks.items():
    if got != want:
      raise ValueError(f'config.json {name}={got!r} is not supported (only {want!r}).')
  rope = t.get('rope_parameters') or {}
  if rope.get('rope_type', 'default') != 'default':
    raise ValueError(f'config.json text_config.rope_parameters.rope_type='
                     f'{rope.get("rope_type")!r} is not supported (only "default").')
  theta = rope.get('rope_theta', t.get('rope_theta', 1000000.0))
  vision = VisionConfig(
      hidden_size=v.get('hidden_size', 1024), num_layers=v.get('num_hidden_layers', 24),
      num_heads=v.get('num_attention_heads', 16),
      intermediate_size=v.get('intermediate_size', 4096),
      image_size=_pair(v.get('image_size', 448), 'vision_config.image_size'),
      patch_size=_pair(v.get('patch_size', 14), 'vision_config.patch_size'),
      num_channels=v.get('num_channels', 3), qkv_bias=v.get('attention_bias', False),
      qk_norm=v.get('use_qk_norm', False), norm_type=v.get('norm_type', 'layer_norm'),
      norm_eps=v.get('layer_norm_eps', 1e-6),
      layer_scale_init=v.get('layer_scale_init_value', 0.1),
      use_mean_pooling=v.get('use_mean_pooling', True))
  text = TextConfig(
      vocab_size=t.get('vocab_size', 151936), hidden_size=t.get('hidden_size', 4096),
      num_layers=t.get('num_hidden_layers', 32), num_heads=t.get('num_attention_heads', 32),
      num_kv_heads=t.get('num_key_value_heads') or t.get('num_attention_heads', 32),
      head_dim=t.get('head_dim') or 0, intermediate_size=t.get('intermediate_size', 22016),
      rms_norm_eps=t.get('rms_norm_eps', 1e-6), rope_theta=float(theta),
      tie_word_embeddings=bool(d.get('tie_word_embeddings', t.get('tie_word_embeddings', False))))
  return VLMConfig(vision=vision, text=text, downsample_ratio=d.get('downsample_ratio', 0.5),
                   image_token_id=d.get('image_token_id', 151667), **overrides)
