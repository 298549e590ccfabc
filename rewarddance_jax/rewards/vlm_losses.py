"""Reward-model training losses of RewardDance (docs/algorithms.md §4.3), pure jnp.

1. `yes_probability(logits, yes_ids, no_ids, normalization)`: r = P("yes") from the answer
   position's logits (RD §3.2.1 Eq. 2); 'full' = Σ_{y∈yes} softmax(l)_y, 'two_way' =
   σ(logsumexp l_yes − logsumexp l_no) (several ids per answer sum case/spacing variants).
2. `answer_weights(mask, first_token_weight, rest_weight)`: per-token weights of the answer
   (+ CoT rationale) tokens. first_token_weight None: all 1. α: the first answer token gets α
   and each of the other n−1 tokens n(1−α)/(n−1) (PaCo-Reward's first-token weighting, weights
   sum to n) or, with `rest_weight` = c, the constant c (c = 1: the rationale tokens keep their
   plain CE weight); a one-token answer keeps weight 1.
3. `token_ce(logits, targets, mask, first_token_weight, rest_weight)`: pairwise generative loss
   (RD §3.2.1: next-token CE on "yes"/"no", optionally followed by rationale tokens):
     L = mean_b ℓ_b,  ℓ_b = Σ_t w_bt · (−log softmax(logits_bt)[target_bt]) / n_b,
     n_b = Σ_t mask_bt;  `token_nll_rows` returns ℓ_b (B,).
4. `pointwise_bt_loss(logits_w, logits_l, ...)`: pointwise generative loss (RD §3.2.3, our
   coefficient λ = 0.1): with s = log P(yes) at the answer position,
     L = mean_b [ −log σ(s_w − s_l) + λ·(−log P(yes | x_w) − log P(no | x_l)) ].
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

NORMALIZATIONS = ('full', 'two_way')


def _ids(ids: Sequence[int]) -> jax.Array:
  return jnp.asarray(tuple(ids), jnp.int32)


def log_yes_no(logits: jax.Array, yes_ids: Sequence[int], no_ids: Sequence[int],
               normalization: str = 'two_way') -> tuple[jax.Array, jax.Array]:
  """(log P(yes), log P(no)) of logits (B, V) under the chosen normalisation; fp32."""
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'normalization={normalization!r} is not one of {NORMALIZATIONS}.')
  logits = logits.astype(jnp.float32)
  l_yes = jax.nn.logsumexp(logits[..., _ids(yes_ids)], axis=-1)
  l_no = jax.nn.logsumexp(logits[..., _ids(no_ids)], axis=-1)
  if normalization == 'full':
    z = jax.nn.logsumexp(logits, axis=-1)
    return l_yes - z, l_no - z
  return jax.nn.log_sigmoid(l_yes - l_no), jax.nn.log_sigmoid(l_no - l_yes)


def yes_probability(logits: jax.Array, yes_ids: Sequence[int], no_ids: Sequence[int],
                    normalization: str = 'two_way') -> jax.Array:
  """r = P("yes") at the answer position, logits (B, V) → (B,) fp32 in (0, 1)."""
  return jnp.exp(log_yes_no(logits, yes_ids, no_ids, normalization)[0])


def answer_weights(mask: jax.Array, first_token_weight: float | None = None,
                   rest_weight: float | None = None) -> jax.Array:
  """Weights (B, T) of the answer tokens marked by `mask` (contiguous per row)."""
  mask = mask.astype(jnp.float32)
  if first_token_weight is None:
    return mask
  alpha = float(first_token_weight)
  n = jnp.sum(mask, axis=-1, keepdims=True)
  first = (jnp.cumsum(mask, axis=-1) == 1.0) & (mask > 0)
  if rest_weight is None:
    rest = n * (1.0 - alpha) / jnp.maximum(n - 1.0, 1.0)
  else:
    rest = jnp.full_like(n, float(rest_weight))
  w = jnp.where(first, alpha, rest) * mask
  return jnp.where(n == 1.0, mask, w)


def token_nll_rows(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                   first_token_weight: float | None = None,
                   rest_weight: float | None = None) -> jax.Array:
  """Per-row weighted next-token CE ℓ_b (B,); logits (B, T, V), targets/mask (B, T)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  w = answer_weights(mask, first_token_weight, rest_weight)
  n = jnp.maximum(jnp.sum(mask.astype(jnp.float32), axis=-1), 1.0)
  return jnp.sum(w * nll, axis=-1) / n


def token_ce(logits: jax.Array, targets: jax.Array, mask: jax.Array,
             first_token_weight: float | None = None,
             rest_weight: float | None = None) -> jax.Array:
  """Weighted next-token CE over the answer tokens, mean over rows (module doc, item 3)."""
  return jnp.mean(token_nll_rows(logits, targets, mask, first_token_weight, rest_weight))


def pointwise_bt_loss(logits_w: jax.Array, logits_l: jax.Array, yes_ids: Sequence[int],
                      no_ids: Sequence[int], lambda_ce: float = 0.1,
                      normalization: str = 'full') -> jax.Array:
  """BT on s = log P(yes) of preferred vs rejected + λ·CE(yes | x_w) + λ·CE(no | x_l)."""
  s_w, _ = log_yes_no(logits_w, yes_ids, no_ids, normalization)
  s_l, no_l = log_yes_no(logits_l, yes_ids, no_ids, normalization)
  bt = -jax.nn.log_sigmoid(s_w - s_l)
  return jnp.mean(bt + lambda_ce * (-s_w - no_l))
