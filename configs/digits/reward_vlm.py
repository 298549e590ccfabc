"""RewardDance VLM reward on the digits: a tiny InternVL-style model trained from scratch.

One model for both uses: pointwise ("does this image show a handwritten digit seven ?", BT +
λ·CE) and pairwise (image 1 reference, image 2 generated, "is image 2 better than image 1 ?",
answer CE, order swapped at random). The end of the run exports `WORKDIR/reward_model` for RL
(`rewards.vlm_export.load_vlm_reward`).

Launch:
  python -m launch.train --config=configs/digits/reward_vlm.py --workdir=/tmp/digits_rm
  python -m launch.train --config=configs/digits/reward_vlm.py:runlocal --workdir=/tmp/rm_smoke
Options (`:opt1,opt2=v`): `rationale` trains on CoT rationales built from the labels
("yes . the image is a seven"; max_len 40); `lora=R` trains rank-R LoRA on the LM kernels
(+ the vision side unless `freeze_vision`) instead of every weight.
Score samples with it:
  python -m launch.score --reward=/tmp/digits_rm/reward_model --images=SAMPLES.npz
"""

import ml_collections

from rewarddance_jax.config_lib import parse_arg
from rewarddance_jax.parallel.sharding import DEFAULT_RULES
from rewarddance_jax.train.vlm_lora import LM_TARGETS


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, steps=0, rationale=False, lora=0, freeze_vision=False)
  steps = arg.steps or (10 if arg.runlocal else 800)
  c = ml_collections.ConfigDict()
  c.trainer = 'vlm_reward'
  c.seed = 0
  c.total_steps = steps
  c.log_every = 50
  c.eval_every = 400
  c.max_nonfinite = 10

  # 16x16 digits are one 16x16 tile (replicated to RGB); 4x4 patches → 16 patches → pixel
  # shuffle → 4 image tokens per image. vocab_size and image_token_id are set by the trainer
  # from the digits tokenizer.
  c.vlm = dict(
      vision=dict(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96,
                  image_size=16, patch_size=4, qkv_bias=True, qk_norm=False),
      text=dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=128, rope_theta=10000.0, tie_word_embeddings=True),
      downsample_ratio=0.5, dtype='float32', scan_layers=False)
  c.tiles = dict(size=16, channels=3, min_tiles=1, max_tiles=1, thumbnail=False)
  c.reward_model = dict(
      # The prompt comes first as well, so that under causal attention the image tokens can
      # already attend to the digit word (a 2-layer LM then learns the match quickly).
      templates=dict(pointwise='{prompt} : <image> does this image show {prompt} ?',
                     pairwise='{prompt} : <image> <image> is image 2 better than image 1 ?',
                     caption='<image> a handwritten digit'),
      criteria='', max_len=24, lambda_ce=0.1, first_token_weight=None,
      train_normalization='full', graded_fraction=0.25, caption_weight=1.0,
      pointwise_weight=1.0, pairwise_weight=1.0,
      # data/augment.py: warp, stroke width, blur, noise on every real digit, so that the reward
      # holds on generated digits (docs/digits_pipeline.md: what a lighter augmentation did).
      augment=dict(rotate_deg=12.0, scale=0.1, shift=1.0, stroke_prob=0.3, blur_prob=0.3,
                   blur_sigma_max=0.8, noise_max=0.15),
      # CoT rationale tokens after the yes/no answer (data/vlm_rationales.py); their CE weight
      # is PaCo's n(1 − α)/(n − 1) with None, else this constant (α = first_token_weight).
      rationale=arg.rationale, rationale_token_weight=None,
      # LoRA on the LM's attention + MLP kernels (train/vlm_lora.py); rank 0 = full training.
      lora=dict(rank=arg.lora, alpha=2.0 * max(arg.lora, 1), targets=LM_TARGETS,
                train_vision=not arg.freeze_vision))
  if arg.rationale:
    c.reward_model.max_len = 40
  c.data = dict(batch_size=32)
  c.optax = dict(lr=2e-3, schedule='cosine', warmup_steps=100, decay_steps=steps,
                 end_lr_fraction=0.05, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4,
                 grad_clip=1.0)
  c.mesh = dict(axes=('data', 'fsdp', 'tensor'), ici=(1, -1, 1), dcn=(1, 1, 1), num_devices=0)
  c.sharding_rules = DEFAULT_RULES
  c.ckpt = dict(every=400, keep=2, async_save=True)
  c.resume_with_changes = False

  if arg.runlocal:
    c.log_every = 5
    c.eval_every = 10
    c.data.batch_size = 16
    c.ckpt.every = 10
  return c
