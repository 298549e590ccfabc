"""DiNa-LRM: a noise-calibrated Thurstone reward on the generator's own noisy latents.

docs/algorithms.md §5 (arXiv 2602.11146; DRM = HKUST-C4G/diffusion-rm). The reward model is the
generator's first K blocks with the reward's own LoRA (models/backbone.py) and this head:

  1. FiLM per recorded layer and stream: [γ, β] = Linear(2W→2W)(SiLU(Linear(W→2W)(temb))), last
     layer zero-init; h = x·(1 + γ) + β + layer_embed (N(0, 0.02²)); then Linear(W→F), F = W/4.
  2. Concatenate the layers on channels, Linear(n·F→W): V (B, N_v, W) and T (B, N_t, W).
  3. Q: `num_queries` learned tokens (N(0, 0.02²)).
  4. attn1: RMSNorm on Q, V, T; q = Wq·Q; separate (Wk, Wv) per stream; per-token value gate
     g = sigmoid(Linear(W→1)(SiLU(Linear(W→W)(·)))), last layer zero-init (g = ½ at init);
     h = SDPA(q, k_v, g·v_v) + SDPA(q, k_t, g·v_t) (two softmaxes, summed); Q ← Q + Linear(h).
  5. attn2: the same on the visual stream only, without the gate.
  6. FFN: Q ← Q + Linear(4W→W)(GELU(Linear(W→4W)(RMSNorm(Q)))).
  7. score = mean over queries of Linear(W→1)(Q).
Noise ensembling (§5.3, DRM `forward_ensemble`): x̂0 is noised at K levels with independent ε, the
backbone and FiLM run per level with that level's temb, and the aggregated tokens of all levels are
concatenated on the sequence axis (V_ens (B, K·N_v, W), likewise T) before steps 3–7: token fusion,
not score averaging. One level is exactly the single-view model.

Losses (pure functions of the two scores, chosen first; y = 1):
  thurstone           p = Φ((s⁺ − s⁻)/sqrt(2·var(σ) + 1e-6)), var(σ) = k·σ² + σ_u²
                      (k = 2, σ_u² = 0.05, the DRM code constants), L = mean(1 − sqrt(p + 1e-6))
                      (the fidelity loss, §5.1)
  thurstone-constant  the same with var = 0.5
  bt                  L = mean(−log sigmoid(s⁺ − s⁻))
  bt-margin           L = mean(−log sigmoid(s⁺ − s⁻ − margin)), margin 1
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.scipy.special import ndtr

from rewarddance_jax.flow import matching
from rewarddance_jax.models.backbone import Backbone, cond_from_batch
from rewarddance_jax.nn import layers
from rewarddance_jax.nn.attention import attention
from rewarddance_jax.rewards.base import Reward

LOSSES = ('thurstone', 'thurstone-constant', 'bt', 'bt-margin')
DEFAULT_ENSEMBLE = (0.2, 0.5, 0.7)


# ------------------------------------------------------------------------------------------------
# Losses.
# ------------------------------------------------------------------------------------------------


def noise_variance(sigma: jax.Array, k: float = 2.0, sigma_u2: float = 0.05) -> jax.Array:
  """σ_u²(σ) = k·σ² + σ_u², the utility noise at flow level σ (DiNa-LRM §5.1, DRM engine.py)."""
  return k * jnp.square(sigma) + sigma_u2


def normal_cdf(x: jax.Array) -> jax.Array:
  """Φ(x); `ndtr` keeps its relative accuracy in the lower tail, where ½(1 + erf) cancels to 0."""
  return ndtr(x)


def thurstone_probability(s_pos: jax.Array, s_neg: jax.Array, var: jax.Array) -> jax.Array:
  """P(pos ≻ neg) = Φ((s⁺ − s⁻)/sqrt(var + var + 1e-6)) for two utilities of variance `var`."""
  return normal_cdf((s_pos - s_neg) / jnp.sqrt(var + var + 1e-6))


def fidelity_loss(p: jax.Array) -> jax.Array:
  """mean(1 − sqrt(p + 1e-6)): the fidelity loss (Tsai et al. 2007) with y = 1."""
  return jnp.mean(1.0 - jnp.sqrt(p + 1e-6))


def bt_loss(s_pos: jax.Array, s_neg: jax.Array, margin: float = 0.0) -> jax.Array:
  """mean(−log sigmoid(s⁺ − s⁻ − margin)) (Bradley–Terry; margin 1 is DRM's 'bt-margin')."""
  return jnp.mean(jax.nn.softplus(-(s_pos - s_neg - margin)))


def preference_loss(s_pos: jax.Array, s_neg: jax.Array, sigma: jax.Array, kind: str = 'thurstone',
                    *, k: float = 2.0, sigma_u2: float = 0.05, constant_var: float = 0.5,
                    margin: float = 1.0) -> jax.Array:
  """The pair loss `kind` (see the module docstring) of chosen/rejected scores at noise σ (B,)."""
  s_pos, s_neg = s_pos.astype(jnp.float32), s_neg.astype(jnp.float32)
  if kind == 'thurstone':
    return fidelity_loss(thurstone_probability(s_pos, s_neg, noise_variance(sigma, k, sigma_u2)))
  if kind == 'thurstone-constant':
    return fidelity_loss(thurstone_probability(s_pos, s_neg, jnp.float32(constant_var)))
  if kind == 'bt':
    return bt_loss(s_pos, s_neg)
  if kind == 'bt-margin':
    return bt_loss(s_pos, s_neg, margin)
  raise ValueError(f'thurstone loss kind {kind!r} is not one of {LOSSES}.')


# ------------------------------------------------------------------------------------------------
# The head.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  width: int                 # backbone hidden size W
  num_layers: int            # backbone layers fed to the head
  proj_dim: int = 0          # F; 0 → W // 4
  num_queries: int = 4
  num_heads: int = 8
  ffn_ratio: int = 4
  dtype: str = 'float32'

  RANGES = {'width': '[1, inf)', 'num_layers': '[1, inf)', 'proj_dim': '[0, inf)',
            'num_queries': '[1, inf)', 'num_heads': '[1, inf)', 'ffn_ratio': '[1, inf)'}

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f'head width {self.width} is not divisible by num_heads {self.num_heads}.')


_normal02 = nnx.initializers.normal(0.02)
_zeros = nnx.initializers.zeros_init()


class _FiLM(nnx.Module):
  """x·(1 + γ(temb)) + β(temb) + layer_embed, then Linear(W→F)."""

  def __init__(self, w: int, f: int, *, rngs: nnx.Rngs, dtype):
    self.cond_in = layers.dense(w, 2 * w, ('embed', 'mlp'), rngs=rngs, dtype=dtype)
    self.cond_out = layers.dense(2 * w, 2 * w, ('mlp', 'embed'), rngs=rngs, dtype=dtype,
                                 kernel_init=_zeros)
    self.layer_embed = nnx.Param(_normal02(rngs.params(), (w,)), out_sharding=('embed',))
    self.proj = layers.dense(w, f, ('embed', 'mlp'), rngs=rngs, dtype=dtype)

  def __call__(self, x, temb):
    gamma, beta = jnp.split(self.cond_out(jax.nn.silu(self.cond_in(temb))), 2, axis=-1)
    h = x * (1.0 + gamma[:, None]) + beta[:, None] + self.layer_embed[...].astype(x.dtype)
    return self.proj(h)


class _Stream(nnx.Module):
  """Keys and values of one token stream (RMSNorm → Wk, Wv), with an optional value gate."""

  def __init__(self, w: int, gated: bool, *, rngs: nnx.Rngs, dtype):
    self.norm = layers.RMSNorm(w)
    self.k = layers.dense(w, w, ('embed', 'heads'), rngs=rngs, dtype=dtype)
    self.v = layers.dense(w, w, ('embed', 'heads'), rngs=rngs, dtype=dtype)
    self.gate_in = layers.dense(w, w, ('embed', 'mlp'), rngs=rngs, dtype=dtype) if gated else None
    self.gate_out = layers.dense(w, 1, ('mlp', None), rngs=rngs, dtype=dtype,
                                 kernel_init=_zeros) if gated else None

  def __call__(self, x, heads: int):
    x = self.norm(x)
    v = self.v(x)
    if self.gate_in is not None:
      v = v * jax.nn.sigmoid(self.gate_out(jax.nn.silu(self.gate_in(x))))
    split = lambda t: t.reshape(*t.shape[:2], heads, -1)
    return split(self.k(x)), split(v)


class _QueryAttention(nnx.Module):
  """Q ← Q + Linear(Σ_streams SDPA(Wq·RMSNorm(Q), k_s, v_s))."""

  def __init__(self, w: int, heads: int, streams: int, gated: bool, *, rngs: nnx.Rngs, dtype):
    self.heads = heads
    self.norm_q = layers.RMSNorm(w)
    self.q = layers.dense(w, w, ('embed', 'heads'), rngs=rngs, dtype=dtype)
    self.streams = nnx.List([_Stream(w, gated, rngs=rngs, dtype=dtype) for _ in range(streams)])
    self.out = layers.dense(w, w, ('heads', 'embed'), rngs=rngs, dtype=dtype)

  def __call__(self, queries, tokens: Sequence[tuple[jax.Array, jax.Array | None]]):
    q = self.q(self.norm_q(queries))
    q = q.reshape(*q.shape[:2], self.heads, -1)
    h = 0.0
    for stream, (x, mask) in zip(self.streams, tokens):
      k, v = stream(x, self.heads)
      h = h + attention(q, k, v, mask=mask, impl='xla')
    return queries + self.out(h.reshape(*h.shape[:2], -1))


class ThurstoneHead(nnx.Module):
  """DiNa-LRM head: features of one or more noise levels → (B,) score (fp32)."""

  def __init__(self, cfg: HeadConfig, *, rngs: nnx.Rngs):
    w, f = cfg.width, cfg.proj_dim or cfg.width // 4
    dtype = jnp.dtype(cfg.dtype)
    self.cfg = cfg
    kw = dict(rngs=rngs, dtype=dtype)
    self.film_img = nnx.List([_FiLM(w, f, **kw) for _ in range(cfg.num_layers)])
    self.film_txt = nnx.List([_FiLM(w, f, **kw) for _ in range(cfg.num_layers)])
    self.agg_img = layers.dense(cfg.num_layers * f, w, ('mlp', 'embed'), **kw)
    self.agg_txt = layers.dense(cfg.num_layers * f, w, ('mlp', 'embed'), **kw)
    self.queries = nnx.Param(_normal02(rngs.params(), (1, cfg.num_queries, w)),
                             out_sharding=(None, None, 'embed'))
    self.attn1 = _QueryAttention(w, cfg.num_heads, 2, True, **kw)
    self.attn2 = _QueryAttention(w, cfg.num_heads, 1, False, **kw)
    self.ffn_norm = layers.RMSNorm(w)
    self.ffn = layers.FeedForward(w, cfg.ffn_ratio * w, rngs=rngs, dtype=dtype)
    self.score = layers.dense(w, 1, ('embed', None), **kw)

  def tokens(self, feats: dict) -> tuple[jax.Array, jax.Array]:
    """Steps 1–2 for one noise level: (V (B, N_v, W), T (B, N_t, W))."""
    if len(feats['img']) != self.cfg.num_layers:
      raise ValueError(f'head expects {self.cfg.num_layers} backbone layers, got '
                       f'{len(feats["img"])}.')
    dtype, temb = jnp.dtype(self.cfg.dtype), feats['temb'].astype(jnp.dtype(self.cfg.dtype))
    cat = lambda films, xs: jnp.concatenate(
        [film(x.astype(dtype), temb) for film, x in zip(films, xs)], axis=-1)
    return (self.agg_img(cat(self.film_img, feats['img'])),
            self.agg_txt(cat(self.film_txt, feats['txt'])))

  def __call__(self, views: Sequence[dict]) -> jax.Array:
    vis, txt = zip(*[self.tokens(f) for f in views])
    vis, txt = jnp.concatenate(vis, axis=1), jnp.concatenate(txt, axis=1)
    txt_mask = jnp.concatenate([f['txt_mask'] for f in views], axis=1)
    q = jnp.broadcast_to(self.queries[...].astype(vis.dtype), (vis.shape[0],) +
                         self.queries.shape[1:])
    q = self.attn1(q, [(vis, None), (txt, txt_mask)])
    q = self.attn2(q, [(vis, None)])
    q = q + self.ffn(self.ffn_norm(q))
    return jnp.mean(self.score(q)[..., 0].astype(jnp.float32), axis=1)


# ------------------------------------------------------------------------------------------------
# Scoring and the Reward.
# ------------------------------------------------------------------------------------------------


def head_config(backbone: Backbone, **kw) -> HeadConfig:
  return HeadConfig(width=backbone.width, num_layers=len(backbone.layers), **kw)


def score_views(backbone: Backbone, head_graphdef, base: Any, params: dict,
                views: Sequence[tuple[jax.Array, jax.Array]], cond: dict,
                guidance: jax.Array | None = None) -> jax.Array:
  """(B,) scores of K noisy views [(x_t (B, ...), σ (B,))] fused by token concatenation.

  The K views run through the backbone as one batch of K·B rows (one trace, any K).
  `params` = {'lora', 'head'}; `base` = the generator params (frozen).
  """
  b, n = views[0][0].shape[0], len(views)
  x = jnp.concatenate([v[0] for v in views], axis=0)
  sigma = jnp.concatenate([jnp.broadcast_to(jnp.asarray(v[1], jnp.float32), (b,))
                           for v in views], axis=0)
  tile = lambda a: None if a is None else jnp.concatenate([a] * n, axis=0)
  feats = backbone(base, params['lora'], x, sigma, {k: tile(v) for k, v in cond.items()},
                   tile(guidance))
  per_view = [jax.tree.map(lambda a, i=i: a[i * b:(i + 1) * b], feats) for i in range(n)]
  return nnx.merge(head_graphdef, params['head'])(per_view)


def noisy_views(key: jax.Array, x0: jax.Array, sigmas: Sequence[float]) -> list:
  """x̂0 noised at each level with an independent ε per level: [(x_σ, σ (B,))]."""
  out = []
  for i, s in enumerate(sigmas):
    eps = jax.random.normal(jax.random.fold_in(key, i), x0.shape, jnp.float32)
    sig = jnp.full((x0.shape[0],), s, jnp.float32)
    out.append((matching.interpolate(x0.astype(jnp.float32), eps, sig), sig))
  return out


def thurstone_reward(backbone: Backbone, head_graphdef, base: Any, params: dict, *,
                     sigmas: Sequence[float] = (0.4,), name: str = 'thurstone') -> Reward:
  """A `Reward` reading samples['latents'] (x̂0): noises it at `sigmas` with the key (one level:
  single view, DRM's u = 0.4 default; several: the token-fusion ensemble) and scores it.

  Reward params = {'base': generator params (shared, not copied), 'lora', 'head'}. The conditioning
  comes from `batch` ('tokens'/'mask' for the digits, or 'txt'/'pooled'[/'mask'], 'guidance').
  """
  sigmas = tuple(float(s) for s in sigmas)
  if not sigmas or any(not 0.0 <= s <= 1.0 for s in sigmas):
    raise ValueError(f'thurstone reward sigmas={sigmas} must be non-empty levels in [0, 1].')

  def fn(p, samples, batch, key):
    if key is None:
      raise ValueError(f'reward {name!r} noises its input: pass a PRNG key.')
    views = noisy_views(key, samples['latents'], sigmas)
    return score_views(backbone, head_graphdef, p['base'], p, views, cond_from_batch(batch),
                       batch.get('guidance'))

  return Reward(name=name, fn=fn, inputs='latents', differentiable=True,
                params={'base': base, 'lora': params['lora'], 'head': params['head']})


@functools.lru_cache(maxsize=8)
def head_graphdef(cfg: HeadConfig):
  """The head's graphdef (abstract build, no memory)."""
  with nnx.use_eager_sharding(False):
    return nnx.graphdef(nnx.eval_shape(lambda: ThurstoneHead(cfg, rngs=nnx.Rngs(0))))
