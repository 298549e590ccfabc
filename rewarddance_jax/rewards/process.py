"""PAVRM: a process-aware reward on noisy latents x_t (arXiv 2511.21541; docs/algorithms.md §6).

The model is the generator's first K blocks with the reward's own LoRA (models/backbone.py; PRFL
fine-tunes blocks 0–7 fully, we tune a LoRA) and this head (PRFL §4.2 Eqs. 4–5,
PRFL:scripts/pavrm/train_pavrm.py `model_init`):
  1. ĥ = the visual tokens after the last recorded block (B, N, W);
  2. one learned query q (1×W, xavier-uniform): z_obs = MHA(q, ĥ, ĥ) with q/k/v/out projections;
  3. z = z_obs + q (the query residual: a content-agnostic quality prior, Table 5);
  4. logit r_φ(x_t, t, c) = Linear(h2→1)(ReLU(Linear(h1→h2)(ReLU(Linear(W→h1)(z))))), xavier-uniform
     weights and zero biases (PRFL: 5120→1024→512→1).
Attention runs over the full sequence (no per-shard averaging; §10 #25).

Losses:
  bce         L = −mean(y·log σ(r) + (1 − y)·log(1 − σ(r)))  (PRFL Eq. 6; pairs give y = 1 for the
              chosen and y = 0 for the rejected sample, each at its own x_t)
  siamese_bt  L = −mean(log σ(r(x_w) − r(x_l))), same noise and t for the pair (PRFL App. A.3.1;
              the code's random 50% swap with BCE on σ(r_a − r_b) gives exactly this value, since
              BCE(−Δ, 0) = BCE(Δ, 1)).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rewarddance_jax.models.backbone import Backbone, cond_from_batch
from rewarddance_jax.nn import layers
from rewarddance_jax.nn.attention import attention
from rewarddance_jax.rewards.base import Reward

LOSSES = ('bce', 'siamese_bt')
OUTPUTS = ('sigmoid', 'logit')


def bce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """−mean(y·log σ(r) + (1 − y)·log(1 − σ(r))), computed stably with softplus (PRFL Eq. 6)."""
  logits, labels = logits.astype(jnp.float32), labels.astype(jnp.float32)
  return jnp.mean(labels * jax.nn.softplus(-logits) + (1.0 - labels) * jax.nn.softplus(logits))


def siamese_bt_loss(logit_w: jax.Array, logit_l: jax.Array) -> jax.Array:
  """−mean(log σ(r_w − r_l)) (PRFL App. A.3.1, shared noise and t within the pair)."""
  return bce_loss(logit_w - logit_l, jnp.ones_like(logit_w))


def pair_loss(logit_w: jax.Array, logit_l: jax.Array, kind: str = 'bce') -> jax.Array:
  """The PAVRM loss on a batch of (chosen, rejected) logits."""
  if kind == 'bce':
    return bce_loss(jnp.concatenate([logit_w, logit_l]),
                    jnp.concatenate([jnp.ones_like(logit_w), jnp.zeros_like(logit_l)]))
  if kind == 'siamese_bt':
    return siamese_bt_loss(logit_w, logit_l)
  raise ValueError(f'process loss kind {kind!r} is not one of {LOSSES}.')


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  width: int                          # backbone hidden size W
  num_heads: int = 8
  hidden: tuple[int, int] = (1024, 512)
  dtype: str = 'float32'

  RANGES = {'width': '[1, inf)', 'num_heads': '[1, inf)'}

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f'head width {self.width} is not divisible by num_heads {self.num_heads}.')
    object.__setattr__(self, 'hidden', tuple(int(h) for h in self.hidden))


_xavier = nnx.initializers.xavier_uniform()


class PAVRMHead(nnx.Module):
  """Query-attention pooling with the query residual + MLP → (B,) logit (fp32)."""

  def __init__(self, cfg: HeadConfig, *, rngs: nnx.Rngs):
    w, (h1, h2) = cfg.width, cfg.hidden
    kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), kernel_init=_xavier)
    self.cfg = cfg
    self.query = nnx.Param(_xavier(rngs.params(), (1, w)).reshape(1, 1, w),
                           out_sharding=(None, None, 'embed'))
    self.q = layers.dense(w, w, ('embed', 'heads'), **kw)
    self.k = layers.dense(w, w, ('embed', 'heads'), **kw)
    self.v = layers.dense(w, w, ('embed', 'heads'), **kw)
    self.out = layers.dense(w, w, ('heads', 'embed'), **kw)
    self.fc1 = layers.dense(w, h1, ('embed', 'mlp'), **kw)
    self.fc2 = layers.dense(h1, h2, ('mlp', None), **kw)
    self.fc3 = layers.dense(h2, 1, (None, None), **kw)

  def __call__(self, feats: dict) -> jax.Array:
    h = feats['img'][-1].astype(jnp.dtype(self.cfg.dtype))
    b, heads = h.shape[0], self.cfg.num_heads
    query = jnp.broadcast_to(self.query[...].astype(h.dtype), (b, 1, h.shape[-1]))
    split = lambda t: t.reshape(*t.shape[:2], heads, -1)
    z = attention(split(self.q(query)), split(self.k(h)), split(self.v(h)), impl='xla')
    z = self.out(z.reshape(b, 1, -1)) + query
    logit = self.fc3(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(z)))))
    return logit[:, 0, 0].astype(jnp.float32)


def head_config(backbone: Backbone, **kw) -> HeadConfig:
  return HeadConfig(width=backbone.width, **kw)


@functools.lru_cache(maxsize=8)
def head_graphdef(cfg: HeadConfig):
  """The head's graphdef (abstract build, no memory)."""
  with nnx.use_eager_sharding(False):
    return nnx.graphdef(nnx.eval_shape(lambda: PAVRMHead(cfg, rngs=nnx.Rngs(0))))


def score(backbone: Backbone, head_gd, base: Any, params: dict, x_t: jax.Array,
          sigma: jax.Array, cond: dict, guidance: jax.Array | None = None) -> jax.Array:
  """(B,) logits r_φ(x_t, σ, c); `params` = {'lora', 'head'}, `base` = generator params (frozen)."""
  feats = backbone(base, params['lora'], x_t, sigma, cond, guidance)
  return nnx.merge(head_gd, params['head'])(feats)


def process_reward(backbone: Backbone, head_gd, base: Any, params: dict, *,
                   output: str = 'sigmoid', name: str = 'pavrm') -> Reward:
  """A `Reward` reading samples['noisy_latents'] (x_t) and samples['sigma'] (B,).

  output 'sigmoid' gives σ(r_φ) ∈ (0, 1) as PRFL's reward step uses it (Alg. 1); 'logit' gives r_φ.
  Reward params = {'base': generator params (shared, not copied), 'lora', 'head'}.
  """
  if output not in OUTPUTS:
    raise ValueError(f'process reward output={output!r} is not one of {OUTPUTS}.')

  def fn(p, samples, batch, key):
    del key
    logit = score(backbone, head_gd, p['base'], p, samples['noisy_latents'], samples['sigma'],
                  cond_from_batch(batch), batch.get('guidance'))
    return jax.nn.sigmoid(logit) if output == 'sigmoid' else logit

  return Reward(name=name, fn=fn, inputs='noisy_latents', differentiable=True,
                params={'base': base, 'lora': params['lora'], 'head': params['head']})
