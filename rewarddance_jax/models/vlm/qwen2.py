"""Qwen2 decoder (transformers `Qwen2Model`), Flax NNX, on input embeddings.

  1. x = embeddings (B, L, D); positions 0..L−1 (right padding: a pad never precedes a real token,
     so causal attention keeps real tokens exact and no position shift is needed);
  2. blocks: x += o(Attn(RoPE(q), RoPE(k), v)) on RMSNorm(x), grouped-query attention (K kv heads
     shared by N/K query heads each), q/k/v with bias, o without; x += down(silu(gate)·up) on
     RMSNorm(x);
  3. final RMSNorm. RoPE is transformers' rotate-half form: frequencies θ^(−2k/d), the first and
     second halves of each head rotate together (not interleaved pairs as in nn/rope.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rewarddance_jax.models.vlm.config import VLMConfig
from rewarddance_jax.nn import layers
from rewarddance_jax.nn.stack import make_stack, run_stack
from rewarddance_jax.parallel.sharding import constrain

_TOKENS = ('act_batch', 'act_len', 'act_embed')


def rope_half(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotate-half RoPE of x (B, L, H, D) at integer positions (B, L); fp32 angles."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  ang = positions.astype(jnp.float32)[..., None] * inv_freq          # (B, L, D/2)
  ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(ang).astype(x.dtype), jnp.sin(ang).astype(x.dtype)
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class DecoderBlock(nnx.Module):
  """One Qwen2 layer; carry = (x, positions, key_mask or None)."""

  def __init__(self, cfg: VLMConfig, rngs: nnx.Rngs):
    t = cfg.text
    kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    d, hd, pd = t.hidden_size, t.dim_head, jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.input_norm = layers.RMSNorm(d, eps=t.rms_norm_eps, name='norm', param_dtype=pd)
    self.post_norm = layers.RMSNorm(d, eps=t.rms_norm_eps, name='norm', param_dtype=pd)
    self.q = layers.dense(d, t.num_heads * hd, ('embed', 'heads'), **kw)
    self.k = layers.dense(d, t.num_kv_heads * hd, ('embed', 'heads'), **kw)
    self.v = layers.dense(d, t.num_kv_heads * hd, ('embed', 'heads'), **kw)
    self.o = layers.dense(t.num_heads * hd, d, ('heads', 'embed'), use_bias=False, **kw)
    self.gate = layers.dense(d, t.intermediate_size, ('embed', 'mlp'), use_bias=False, **kw)
    self.up = layers.dense(d, t.intermediate_size, ('embed', 'mlp'), use_bias=False, **kw)
    self.down = layers.dense(t.intermediate_size, d, ('mlp', 'embed'), use_bias=False, **kw)

  def __call__(self, carry):
    x, positions, mask = carry
    t = self.cfg.text
    h = self.input_norm(x)
    split = lambda y: y.reshape(*y.shape[:2], -1, t.dim_head)
    q = rope_half(split(self.q(h)), positions, t.rope_theta)
    k = rope_half(split(self.k(h)), positions, t.rope_theta)
    full_mask = None if mask is None else mask[:, None, None, :]
    # jax.nn.dot_product_attention handles GQA (N query heads over K kv heads) and the causal
    # mask natively; softmax in fp32.
    out = jax.nn.dot_product_attention(q, k, split(self.v(h)), mask=full_mask, is_causal=True)
    x = x + self.o(out.reshape(*x.shape[:2], -1))
    h = self.post_norm(x)
    x = x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))
    return constrain(x, _TOKENS), positions, mask


class Qwen2(nnx.Module):
  """Token embeddings + decoder stack + final norm (the LM head lives in the VLM)."""

  def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs):
    t = cfg.text
    self.cfg = cfg
    self.embed = nnx.Embed(
        t.vocab_size, t.hidden_size, dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ('vocab', 'embed')),
        rngs=rngs)
    self.layers = make_stack(DecoderBlock, cfg, t.num_layers, rngs)
    self.norm = layers.RMSNorm(t.hidden_size, eps=t.rms_norm_eps, name='norm',
                               param_dtype=jnp.dtype(cfg.param_dtype))

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x (B, L, D) input embeddings, mask (B, L) bool key mask or None → hidden (B, L, D)."""
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    x, _, _ = run_stack(self.layers, self.cfg, self.cfg.text.num_layers,
                        (constrain(x, _TOKENS), positions, mask))
    return self.norm(x)
