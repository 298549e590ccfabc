"""The family table and `GeneratorFamily`: one family resolved against one run's config.

Config keys it reads (every trainer, sampler and the scanner the same way):
  config.family              'digits' (default) | 'flux' | 'sd3'
  config.model               the architecture preset (or, with weights, runtime keys only)
  config.init.weights        dict(src=<diffusers directory or pipeline root>, cache_dir='')
  config.vae                 dict(src=<AutoencoderKL directory or pipeline root>, cache_dir='',
                             replicated=True): the codec; without src the identity
  config.guidance            dict(kind, scale, negative) (`base.Guidance`), default the family's
  config.data.latent_shape   (H, W, C) of one sample, default the family's
  config.data.encoded_prompts / prompts / max_text_len   the prompts (`prompt_data`)
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from absl import logging
from flax import nnx

from rewarddance_jax import config_lib
from rewarddance_jax.data import pipeline, prompts as prompts_lib
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.families import base, digits, flux, sd3
from rewarddance_jax.parallel import rng as rng_lib
from rewarddance_jax.parallel import sharding as sharding_lib

FAMILIES = {f.name: f for f in (digits.FAMILY, flux.FAMILY, sd3.FAMILY)}

# config.model keys that say how a model runs, not its architecture: with weights from a
# diffusers directory the architecture is the directory's config.json.
RUNTIME_MODEL_KEYS = ('dtype', 'param_dtype', 'scan_layers', 'remat', 'attention')
WEIGHTS_KEYS = ('src', 'cache_dir')
VAE_KEYS = ('src', 'cache_dir', 'replicated', 'dtype')


def get(name: str) -> base.Family:
  if name not in FAMILIES:
    raise ValueError(f'config.family={name!r} is not one of {sorted(FAMILIES)}.')
  return FAMILIES[name]


def _section(config, name: str, allowed) -> dict:
  d = dict(config.get(name, None) or {})
  config_lib.check_keys(d, allowed, f'config.{name}')
  return d


class GeneratorFamily:
  """The generator family of `config` (module docstring): build or load the generator, its
  codec, guided velocity, latent shape, tokenizer and prompt batches."""

  def __init__(self, config):
    self.config = config
    self.family = get(str(config.get('family', 'digits')))
    self.name = self.family.name
    init = dict(config.get('init', None) or {})
    self.weights = dict(init.get('weights', None) or {})
    config_lib.check_keys(self.weights, WEIGHTS_KEYS, 'config.init.weights (the family is '
                          'config.family)')
    if self.weights.get('src') and self.family.load is None:
      raise ValueError(f'config.family={self.name} has no public-weights loader; '
                       'config.init.weights.src must be empty.')
    g = config.get('guidance', None)
    self.guidance = (config_lib.section(base.Guidance, g, 'config.guidance') if g
                     else self.family.default_guidance)
    if self.guidance.kind not in self.family.guidance_kinds:
      raise ValueError(f'config.guidance.kind={self.guidance.kind!r}: family {self.name} takes '
                       f'{self.family.guidance_kinds}.')
    self.vae = _section(config, 'vae', VAE_KEYS)
    self.conditioning = self.family.conditioning
    data = config.get('data', None) or {}
    self._latent_shape = data.get('latent_shape', None) or self.family.default_latent_shape
    self.encoded_prompts = str(data.get('encoded_prompts', '') or '')
    if self.conditioning == 'encoded' and data and not self.encoded_prompts:
      logging.warning('family %s without config.data.encoded_prompts: batches must bring '
                      'txt/pooled/mask themselves.', self.name)

  @property
  def latent_shape(self) -> tuple[int, ...]:
    """(H, W, C) of one sample: `config.data.latent_shape`, else the family's default."""
    if not self._latent_shape:
      raise ValueError(f'config.data.latent_shape (H, W, C) is required for family {self.name}.')
    return tuple(int(d) for d in self._latent_shape)

  def factory(self, model_cfg, seed: int):
    """A function building the family's model of `model_cfg` (under eval_shape or jit), its
    weights drawn from the run's 'generator_init' stream."""
    return lambda: self.family.make_model(model_cfg,
                                          nnx.Rngs(rng_lib.key(seed, 'generator_init')))

  # -- the generator --------------------------------------------------------------------------

  @property
  def has_weights(self) -> bool:
    return bool(self.weights.get('src'))

  def runtime_overrides(self) -> dict:
    model = dict(self.config.get('model', None) or {})
    fields = RUNTIME_MODEL_KEYS if self.name != 'sd3' else tuple(
        k for k in RUNTIME_MODEL_KEYS if k not in sd3.EXTRA_KEYS)
    return {k: (tuple(model[k]) if isinstance(model[k], list) else model[k])
            for k in fields if k in model}

  def model_config(self):
    """The static model config of `config.model` (a preset; with weights: their config.json)."""
    if self.has_weights:
      return self.family.load_config(self.weights['src'], **self.runtime_overrides())
    return self.family.model_config(dict(self.config.model))

  def init(self, mesh, rules, seed: int, *, abstract: bool = False):
    """(graphdef, params, shardings, model cfg) of a preset generator created shard by shard
    (`abstract`: `jax.ShapeDtypeStruct`s, the target of a checkpoint restore)."""
    cfg = self.model_config()
    self._check_guidance(cfg)
    factory = self.factory(cfg, seed)
    if abstract:
      graphdef, (params,), (shard,) = sharding_lib.sharded_abstract(
          factory, mesh, rules, cache_key=(self.name, cfg))
    else:
      graphdef, (params,), (shard,) = sharding_lib.sharded_init(
          factory, mesh, rules, cache_key=(self.name, cfg, int(seed)))
    return graphdef, params, shard, cfg

  def load(self, mesh, rules, *, progress: bool = True):
    """(graphdef, params, shardings, model cfg) of `config.init.weights.src`."""
    graphdef, params, cfg = self.family.load(
        self.weights['src'], mesh, rules, cache_dir=self.weights.get('cache_dir') or None,
        progress=progress, **self.runtime_overrides())
    self._check_guidance(cfg)
    return graphdef, params, jax.tree.map(lambda a: a.sharding, params), cfg

  def _check_guidance(self, cfg):
    embed = getattr(getattr(cfg, 'mmdit', None), 'guidance_embed', False)
    if self.guidance.kind == 'distilled' and not embed:
      raise ValueError(f'config.guidance.kind="distilled" needs a guidance-distilled model '
                       f'(guidance_embeds); this {self.name} model has none: use "none" or "cfg".')

  def cond_shapes(self, batch: int, model_cfg) -> dict:
    """{batch key: (shape, dtype)} of the conditioning of `batch` rows (with the negative
    prompt's under CFG): what `host_batch` gives the step, for abstract batches (the scanner)."""
    text_len = int(self.config.data.max_text_len)
    if self.conditioning == 'tokens':
      out = {'tokens': ((batch, text_len), np.int32), 'mask': ((batch, text_len), np.bool_)}
    else:
      dims = getattr(model_cfg, 'mmdit', model_cfg)
      out = {'txt': ((batch, text_len, dims.context_dim), np.float32),
             'pooled': ((batch, dims.pooled_dim), np.float32),
             'mask': ((batch, text_len), np.bool_)}
    if self.guidance.kind == 'cfg':
      out.update({base.NEGATIVE + k: v for k, v in out.items()})
    return out

  def velocity(self, graphdef):
    """`velocity(params, x, σ (B,), cond) -> v` with this run's guidance."""
    return base.guided_velocity(graphdef, self.guidance)

  # -- the codec ------------------------------------------------------------------------------

  def codec(self, mesh, rules, *, abstract: bool = False) -> base.Codec:
    """The AutoencoderKL of `config.vae.src` (replicated unless `config.vae.replicated` is
    False: sharded conv kernels make GSPMD split the decoder's activations by channel,
    docs/scaling.md), else the identity."""
    if not self.vae.get('src'):
      return base.IDENTITY_CODEC
    from rewarddance_jax.weights import vae as vae_weights  # pylint: disable=import-outside-toplevel
    if self.vae.get('replicated', True):
      rules = tuple((n, a if n.startswith('act_') else None) for n, a in rules)
    overrides = {'dtype': self.vae['dtype']} if self.vae.get('dtype') else {}
    if abstract:
      from rewarddance_jax.weights import loader  # pylint: disable=import-outside-toplevel
      s = vae_weights.spec(self.vae['src'], **overrides)
      graphdef, params = loader.abstract_params(s.factory, mesh, rules)
    else:
      graphdef, params, _ = vae_weights.load(self.vae['src'], mesh, rules,
                                             cache_dir=self.vae.get('cache_dir') or None,
                                             **overrides)
    return base.vae_codec(graphdef, params)

  # -- prompts --------------------------------------------------------------------------------

  def tokenizer(self, workdir: str | None):
    """The word-level tokenizer of token conditioning, saved beside the run
    (`workdir/tokenizer.json`, read back when present); None for encoded conditioning."""
    if self.conditioning != 'tokens':
      return None
    return tokenizer_lib.load_or_build(workdir, self.config.model.get('vocab_size'))

  @functools.cached_property
  def _negative(self) -> dict | None:
    """One row of negative conditioning for CFG (None without CFG)."""
    if self.guidance.kind != 'cfg':
      return None
    if self.conditioning == 'tokens':
      tok = self.tokenizer(None)
      ids, mask = tokenizer_lib.encode_prompts(tok, [self.guidance.negative],
                                               int(self.config.data.max_text_len))
      return {'tokens': ids, 'mask': mask}
    from rewarddance_jax.weights import text_pipeline  # pylint: disable=import-outside-toplevel
    path = self.guidance.negative or (os.path.join(self.encoded_prompts, 'negative')
                                      if self.encoded_prompts else '')
    if not path or not os.path.isdir(path):
      raise FileNotFoundError(f'config.guidance.negative: no encoded negative prompt at '
                              f'{path!r} (launch.encode_prompts --negative_prompt writes '
                              '<out>/negative).')
    return text_pipeline.EncodedPrompts(path)[[0]]

  def with_negative(self, cond: dict) -> dict:
    """`cond` (numpy, B rows) plus the negative prompt's rows (`neg_*`) when guided by CFG."""
    neg = self._negative
    if neg is None:
      return cond
    b = next(iter(cond.values())).shape[0]
    out = dict(cond)
    for k, v in neg.items():
      if k in cond and v.shape[1:] != cond[k].shape[1:]:
        raise ValueError(f'config.guidance.negative: its {k} has shape {v.shape[1:]}, the '
                         f'prompts {cond[k].shape[1:]} (encode both with the same lengths).')
      out[base.NEGATIVE + k] = np.repeat(np.asarray(v), b, axis=0)
    return out

  def prompt_records(self):
    path = self.config.data.get('prompts', '')
    return prompts_lib.load_prompt_file(path) if path else prompts_lib.digits_prompt_records()

  def host_batch(self, batch: dict) -> dict:
    """The arrays of a host prompt batch: conditioning (+ negative), 'labels' (the digit each
    prompt names, −1 where none, for the digit rules) and, for encoded prompts, 'ids'."""
    keys = ('tokens', 'mask') if self.conditioning == 'tokens' else ('txt', 'pooled', 'mask')
    out = self.with_negative({k: batch[k] for k in keys})
    out['labels'] = prompts_lib.prompt_labels(batch['prompts'])
    if 'ids' in batch:
      out['ids'] = np.asarray(batch['ids'], np.int32)
    return out

  def prompt_data(self, batch_size: int, repeat_each: int, mesh, rules, *, tok=None,
                  seed: int | None = None):
    """(prompt records, this host's batch iterator, to_device): the encoded prompts of
    `config.data.encoded_prompts`, else the prompt file (or the digit prompts) tokenized;
    each prompt `repeat_each` times adjacently."""
    seed = int(self.config.seed if seed is None else seed)
    if self.conditioning == 'encoded':
      if not self.encoded_prompts:
        raise ValueError(f'family {self.name} reads pre-encoded prompts: set '
                         'config.data.encoded_prompts (launch.encode_prompts writes them).')
      from rewarddance_jax.weights import text_pipeline  # pylint: disable=import-outside-toplevel
      encoded = text_pipeline.EncodedPrompts(self.encoded_prompts)
      records = encoded.prompts
      data_iter = pipeline.encoded_prompt_iter(encoded, batch_size, seed=seed,
                                               repeat_each=repeat_each)
    else:
      if tok is None:
        raise ValueError('token conditioning needs the tokenizer (GeneratorFamily.tokenizer).')
      records = self.prompt_records()
      data_iter = pipeline.prompt_iter(records, batch_size, seed=seed, tokenizer=tok,
                                       max_len=int(self.config.data.max_text_len),
                                       repeat_each=repeat_each)

    def to_device(batch):
      return sharding_lib.host_to_global(self.host_batch(batch), mesh, rules)

    return records, data_iter, to_device


def from_config(config) -> GeneratorFamily:
  return GeneratorFamily(config)
