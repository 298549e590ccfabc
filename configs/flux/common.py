"""Sections the FLUX training configs share: the generator and VAE from a diffusers directory,
pre-encoded prompts, and the reward (`configs/flux/grpo_flux_dev.py`, `r0_flux_dev.py`)."""

from rewarddance_jax.models.presets import model_preset

# res → padded latent (H, W, C); see grpo_flux_dev's module docstring, item 2.
LATENTS = {720: (96, 96, 16), 1024: (128, 128, 16)}


def add_flux_data(c, arg, *, batch_size: int):
  """c.family, c.guidance and c.model (FLUX.1-dev: bf16 compute, fp32 params, scanned blocks, full
  remat), c.init and c.vae from `arg.src`, c.data (encoded prompts `arg.prompts`, latent of `arg.res`) and c.rewards:
  arg.reward = vlm_yes (an InternVL at arg.reward_path, bf16, scoring each row against its own
  prompt from the same prompt set), thurstone | process (a latent reward run), or a rule."""
  if arg.res not in LATENTS:
    raise ValueError(f'config arg res={arg.res}: choose one of {sorted(LATENTS)}.')
  c.model = model_preset('flux-dev', dtype='bfloat16', param_dtype='float32', scan_layers=True,
                         remat='full')
  c.family = 'flux'
  c.guidance = dict(kind='distilled', scale=3.5)   # FLUX.1-dev's distilled guidance input
  c.init = dict(generator='', use_ema=False, weights=dict(src=arg.src, cache_dir=arg.cache_dir))
  c.vae = dict(src=arg.src, cache_dir=arg.cache_dir, replicated=True)
  c.data = dict(batch_size=batch_size, max_text_len=512, prompts='',
                encoded_prompts=arg.prompts, latent_shape=LATENTS[arg.res])
  c.rewards = reward_section(arg)
  return c


def reward_section(arg) -> dict:
  """config.rewards of arg.reward: vlm_yes (an InternVL at arg.reward_path, bf16, scoring each
  row against its own prompt of arg.prompts), thurstone | process (a latent reward run), or a
  rule with its defaults."""
  if arg.reward == 'vlm_yes':
    return {'vlm_yes': dict(kind='vlm_yes', path=arg.reward_path, mode='pointwise',
                            normalization='two_way', prompts=arg.prompts, prompt_index='ids',
                            dtype='bfloat16')}
  if arg.reward in ('thurstone', 'process'):
    return {arg.reward: dict(kind=arg.reward, path=arg.reward_path)}
  return {arg.reward: dict()}
