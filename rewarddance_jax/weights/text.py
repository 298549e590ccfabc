"""T5 encoder and CLIP text model: transformers layout → `models/t5.py`, `models/clip_text.py`.

T5EncoderModel keys: shared.weight (or its tied copy encoder.embed_tokens.weight),
encoder.block.i.layer.0.SelfAttention.{q,k,v,o}.weight (no biases),
encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight (the one shared table),
encoder.block.i.layer.{0,1}.layer_norm.weight, encoder.block.i.layer.1.DenseReluDense.
{wi_0,wi_1,wo}.weight, encoder.final_layer_norm.weight.
CLIPTextModel[WithProjection] keys: text_model.embeddings.{token,position}_embedding.weight,
text_model.encoder.layers.i.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2,
layer_norm2}.{weight,bias}, text_model.final_layer_norm.{weight,bias}[, text_projection.weight].
"""

from __future__ import annotations

import os

from flax import nnx

from rewarddance_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from rewarddance_jax.models.t5 import T5Config, T5Encoder
from rewarddance_jax.weights import cache, json_file
from rewarddance_jax.weights import safetensors_io as st
from rewarddance_jax.weights.keymap import IDENTITY, LINEAR, Rule
from rewarddance_jax.weights.spec import ModelSpec

WEIGHTS_NAME = 'model'


def _lin(src: str, dst: tuple, bias: bool) -> list[Rule]:
  out = [Rule(f'{src}.weight', dst + ('kernel',), LINEAR)]
  return out + [Rule(f'{src}.bias', dst + ('bias',))] if bias else out


def t5_rules(cfg: T5Config, embed_key: str = 'shared.weight', prefix: tuple = ()) -> list[Rule]:
  p = tuple(prefix)
  out = [Rule(embed_key, p + ('embed', 'embedding')),
         Rule('encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
              p + ('rel_bias',)),
         Rule('encoder.final_layer_norm.weight', p + ('final_norm', 'scale'))]
  for i in range(cfg.num_layers):
    s, d = f'encoder.block.{i}.layer', p + ('blocks', i)
    for name in ('q', 'k', 'v', 'o'):
      out += _lin(f'{s}.0.SelfAttention.{name}', d + (name,), False)
    out += [Rule(f'{s}.0.layer_norm.weight', d + ('attn_norm', 'scale')),
            Rule(f'{s}.1.layer_norm.weight', d + ('ff_norm', 'scale'))]
    for name in ('wi_0', 'wi_1', 'wo'):
      out += _lin(f'{s}.1.DenseReluDense.{name}', d + (name,), False)
  return out


def clip_rules(cfg: CLIPTextConfig, prefix: tuple = (), src_prefix: str = 'text_model.'
               ) -> list[Rule]:
  """`src_prefix`: 'text_model.' in most checkpoints; transformers 5 saves a bare CLIPTextModel
  without it."""
  p, t = tuple(prefix), src_prefix
  out = [Rule(f'{t}embeddings.token_embedding.weight', p + ('token_embedding', 'embedding')),
         Rule(f'{t}embeddings.position_embedding.weight', p + ('position_embedding',)),
         Rule(f'{t}final_layer_norm.weight', p + ('final_ln', 'scale')),
         Rule(f'{t}final_layer_norm.bias', p + ('final_ln', 'bias'))]
  for i in range(cfg.num_hidden_layers):
    s, d = f'{t}encoder.layers.{i}', p + ('layers', i)
    for src, dst in (('self_attn.q_proj', 'q'), ('self_attn.k_proj', 'k'),
                     ('self_attn.v_proj', 'v'), ('self_attn.out_proj', 'out'),
                     ('mlp.fc1', 'fc1'), ('mlp.fc2', 'fc2')):
      out += _lin(f'{s}.{src}', d + (dst,), True)
    for src, dst in (('layer_norm1', 'ln1'), ('layer_norm2', 'ln2')):
      out += [Rule(f'{s}.{src}.weight', d + (dst, 'scale'), IDENTITY),
              Rule(f'{s}.{src}.bias', d + (dst, 'bias'))]
  if cfg.projection_dim:
    out += [Rule('text_projection.weight', p + ('text_projection', 'kernel'), LINEAR)]
  return out


def _read_json(path: str) -> dict:
  return json_file.read(os.path.join(path, 'config.json'),
                        'a transformers model directory holds one')


def t5_config(c: dict, **overrides) -> T5Config:
  """Our T5Config from a transformers T5 config.json dict; v1.1 (gated-GELU) only."""
  ff = c.get('feed_forward_proj', 'relu')
  if ff not in ('gated-gelu',):
    raise ValueError(f'T5 feed_forward_proj={ff!r}: only v1.1 "gated-gelu" is supported.')
  return T5Config(vocab_size=c['vocab_size'], d_model=c['d_model'], d_kv=c['d_kv'],
                  d_ff=c['d_ff'], num_layers=c['num_layers'], num_heads=c['num_heads'],
                  relative_attention_num_buckets=c.get('relative_attention_num_buckets', 32),
                  relative_attention_max_distance=c.get('relative_attention_max_distance', 128),
                  layer_norm_epsilon=c.get('layer_norm_epsilon', 1e-6), **overrides)


def clip_config(c: dict, **overrides) -> CLIPTextConfig:
  """Our CLIPTextConfig from a CLIPTextModel[WithProjection] (or CLIPModel) config.json dict."""
  arch = (c.get('architectures') or [''])[0]
  text = c.get('text_config', c)
  projection = c.get('projection_dim') if arch in ('CLIPTextModelWithProjection',
                                                   'CLIPModel') else None
  return CLIPTextConfig(
      vocab_size=text.get('vocab_size', 49408), hidden_size=text.get('hidden_size', 512),
      intermediate_size=text.get('intermediate_size', 2048),
      num_hidden_layers=text.get('num_hidden_layers', 12),
      num_attention_heads=text.get('num_attention_heads', 8),
      max_position_embeddings=text.get('max_position_embeddings', 77),
      hidden_act=text.get('hidden_act', 'quick_gelu'),
      layer_norm_eps=text.get('layer_norm_eps', 1e-5),
      eos_token_id=text.get('eos_token_id', 2), projection_dim=projection, **overrides)


def t5_spec(path: str, **overrides) -> ModelSpec:
  cfg = t5_config(_read_json(path), **overrides)
  infos = st.index(path, WEIGHTS_NAME)
  embed_key = 'shared.weight' if 'shared.weight' in infos else 'encoder.embed_tokens.weight'
  ignore = ('encoder.embed_tokens.weight',) if embed_key == 'shared.weight' else ()
  return ModelSpec('t5', path, cfg, lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)),
                   tuple(t5_rules(cfg, embed_key)), prefer=WEIGHTS_NAME, ignore=ignore)


def clip_spec(path: str, **overrides) -> ModelSpec:
  cfg = clip_config(_read_json(path), **overrides)
  infos = st.index(path, WEIGHTS_NAME)
  src_prefix = 'text_model.' if any(k.startswith('text_model.') for k in infos) else ''
  return ModelSpec('clip', path, cfg, lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0)),
                   tuple(clip_rules(cfg, src_prefix=src_prefix)), prefer=WEIGHTS_NAME,
                   ignore=(f'{src_prefix}embeddings.position_ids',))


def load_t5(path: str, mesh, sharding_rules, *, cache_dir: str | None = None,
            progress: bool = False, **overrides):
  """transformers T5EncoderModel directory → (graphdef, params, T5Config)."""
  s = t5_spec(path, **overrides)
  graphdef, params = cache.load_model(s, mesh, sharding_rules, cache_dir=cache_dir,
                                      progress=progress)
  return graphdef, params, s.cfg


def load_clip(path: str, mesh, sharding_rules, *, cache_dir: str | None = None,
              progress: bool = False, **overrides):
  """transformers CLIPTextModel[WithProjection] directory → (graphdef, params, CLIPTextConfig)."""
  s = clip_spec(path, **overrides)
  graphdef, params = cache.load_model(s, mesh, sharding_rules, cache_dir=cache_dir,
                                      progress=progress)
  return graphdef, params, s.cfg
