"""Sections the SD3.5 configs share: the SD3.5-medium architecture, and for training from public
weights the generator and VAE of a diffusers directory, pre-encoded prompts with the negative
prompt for classifier-free guidance, and the reward (`configs/sd3/grpo_sd35_medium.py`)."""

from configs.flux.common import reward_section

# SD3.5-medium (models/sd3.SD3Config defaults = the diffusers config of SD3.5-medium).
SD35_MEDIUM = dict(name='sd3.5-medium', latent_channels=16, patch_size=2, num_heads=24,
                   head_dim=64, depth=24, context_dim=4096, caption_projection_dim=1536,
                   pooled_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm=True, mlp_ratio=4.0)


def add_sd3_data(c, arg, *, batch_size: int):
  """c.family, c.guidance (CFG, `arg.cfg`; the negative prompt is `<arg.prompts>/negative`, what
  `launch.encode_prompts --negative_prompt` writes), c.model (bf16 compute, fp32 params, full
  remat), c.init / c.vae from `arg.src`, c.data (latent of `arg.res`) and c.rewards (a rule, a
  latent reward run at arg.reward_path, or vlm_yes with an InternVL directory)."""
  if arg.res % 16:
    raise ValueError(f'config arg res={arg.res} must be a multiple of 16 (VAE 8 × patch 2).')
  c.family = 'sd3'
  c.guidance = dict(kind='cfg', scale=float(arg.cfg), negative='')
  c.model = dict(SD35_MEDIUM, dtype='bfloat16', param_dtype='float32', remat='full',
                 attention='auto')
  c.init = dict(generator='', use_ema=False, weights=dict(src=arg.src, cache_dir=arg.cache_dir))
  c.vae = dict(src=arg.src, cache_dir=arg.cache_dir, replicated=True)
  latent = arg.res // 8
  c.data = dict(batch_size=batch_size, max_text_len=333, prompts='',
                encoded_prompts=arg.prompts, latent_shape=(latent, latent, 16))
  c.rewards = reward_section(arg)
  return c
