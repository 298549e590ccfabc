"""LoRA on the VLM's language model for reward-model training (`config.reward_model.lora`).

With rank r > 0 the VLM params split into
  trainable = {'lora': LoRA of the LM kernels matching `targets`} (+ 'vision' and 'projector'
              when `train_vision`), the only tree the optimizer sees;
  frozen    = every other top-level part ('lm', 'lm_head' and, without `train_vision`, the
              vision side), carried in the train state unchanged;
and the model runs on
  model_params = merge(frozen ∪ dense trainable, lora, α/r)      (W ← W + α/r · a@b, nn/lora.py)
so the base LM is bitwise unchanged by training. The export writes `model_params` (merged
weights), so `rewards.vlm_export.load_vlm_reward` loads a LoRA-trained reward unchanged.
The LoRA shardings follow the base kernels (`nn.lora.lora_shardings`; 'lora_rank' replicated).
Rank 0 (the default) means full training: `from_config` returns None.

Config: `lora = dict(rank=8, alpha=16.0, targets=LM_TARGETS, train_vision=True)`.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax

from rewarddance_jax import config_lib
from rewarddance_jax.nn import lora as lora_lib

# Paths of the pure param dict: 'lm/layers/<i>/q/kernel' (unscanned) or 'lm/layers/q/kernel'
# (scanned stack, leading layer axis kept by the LoRA).
LM_ATTENTION_TARGETS = r'lm/layers/(\d+/)?(q|k|v|o)/kernel'
LM_TARGETS = r'lm/layers/(\d+/)?(q|k|v|o|gate|up|down)/kernel'
VISION_KEYS = ('vision', 'projector')


@dataclasses.dataclass(frozen=True)
class VLMLoRA:
  """Which VLM params train under LoRA, and how the model params are rebuilt (module doc)."""
  rank: int = 0
  alpha: float | None = None     # None: 2·rank
  targets: str = LM_TARGETS
  train_vision: bool = True

  RANGES = {'rank': '[0, inf)', 'alpha': '(0, inf)'}

  @classmethod
  def from_config(cls, cfg) -> 'VLMLoRA | None':
    """None for a missing section or rank 0 (full training)."""
    lora = config_lib.section(cls, cfg, 'config.reward_model.lora')
    if lora.rank == 0:
      return None
    re.compile(lora.targets)
    return lora if lora.alpha is not None else dataclasses.replace(lora, alpha=2.0 * lora.rank)

  @property
  def scale(self) -> float:
    return lora_lib.lora_scale(self.rank, self.alpha)

  def dense_keys(self, params: dict) -> tuple[str, ...]:
    return tuple(k for k in VISION_KEYS if k in params) if self.train_vision else ()

  def split(self, params: dict) -> tuple[dict, dict]:
    """(dense trainable parts, frozen parts) of the full model params (top-level keys)."""
    keys = self.dense_keys(params)
    return ({k: params[k] for k in keys}, {k: v for k, v in params.items() if k not in keys})

  def init(self, params: dict, key: jax.Array) -> tuple[dict, dict]:
    """(trainable = {'lora', *dense}, frozen); `params` may be shapes for the LoRA part."""
    dense, frozen = self.split(params)
    lora = lora_lib.init_lora(frozen, rank=self.rank, alpha=self.alpha, targets=self.targets,
                              key=key)
    return {'lora': lora, **dense}, frozen

  def shardings(self, params: dict, param_shardings: dict) -> tuple[dict, dict]:
    """(trainable, frozen) shardings; LoRA a/b follow their base kernel's in/out axes."""
    lora_abs = jax.eval_shape(functools.partial(self.init, key=jax.random.key(0)), params)[0]
    dense, frozen = self.split(param_shardings)
    return {'lora': lora_lib.lora_shardings(lora_abs['lora'], frozen), **dense}, frozen

  def model_params(self, trainable: dict, frozen: dict) -> dict:
    """The full VLM params: frozen ∪ dense trainable, with the LoRA merged (pure, jit-able)."""
    dense = {k: v for k, v in trainable.items() if k != 'lora'}
    return lora_lib.merge({**frozen, **dense}, trainable['lora'], self.scale)
