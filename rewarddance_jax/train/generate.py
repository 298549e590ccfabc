"""Sampling glue between a generator param tree and flow/: samplers, searches and digit grids.

  1. `make_cond_sampler` / `make_sampler`: jitted samplers of the guided velocity
     (`families.base.guided_velocity`) for any family's conditioning, or token ids.
  2. `sample_digits(...)` draws `per_class` images for each of the ten digit prompts with the
     configured schedule and step kind, from a fixed key (so sample grids are comparable across
     steps and runs), and returns images in [0, 1] with labels and prompts.
  3. `write_samples(dir, name, ...)` writes `<name>.npz` (the samples format of data/samples.py)
     and `<name>.png` (a grid, one row per digit).
  4. `make_judge_hook(...)`: the loop hook every digits trainer uses (samples + judge accuracy).
  5. `search_prompts(...)`: best-of-N / Search over Paths on any family's prompts with a
     verifier; `search_digits` on the digit prompts.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rewarddance_jax import metrics as metrics_lib
from rewarddance_jax.data import digits
from rewarddance_jax.data import samples as samples_lib
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.families.base import Guidance, guided_velocity
from rewarddance_jax.flow import rollout as rollout_lib
from rewarddance_jax.flow import schedules, search
from rewarddance_jax.parallel import rng as rng_lib


def to_unit(x: jax.Array) -> jax.Array:
  """Model space [-1, 1] → image space [0, 1]."""
  return jnp.clip((x + 1.0) * 0.5, 0.0, 1.0)


def sampler_sigmas(sampler_cfg, image_seq_len: int | None = None) -> np.ndarray:
  return schedules.get_sigmas(sampler_cfg.schedule, int(sampler_cfg.num_steps),
                              shift=float(sampler_cfg.get('shift', 1.0)),
                              image_seq_len=image_seq_len)


def digit_prompts(per_class: int) -> tuple[list[str], np.ndarray]:
  labels = np.repeat(np.arange(10), per_class)
  return [digits.prompt_for_label(int(l)) for l in labels], labels


def make_sampler(graphdef, sampler_cfg, image_shape: tuple[int, ...], guidance=Guidance()):
  """A jitted `(params, tokens, mask, key) -> images in [0, 1]` for the configured sampler
  (token conditioning, identity codec); `make_cond_sampler` is the general form.

  Params are an argument, so one compiled sampler serves every checkpoint of a model: equal
  (graphdef, schedule, kind, noise level, shape) return the same jitted function (the pipeline's
  evaluation samples six stages of one generator and compiles once)."""
  return _token_sampler(make_cond_sampler(graphdef, sampler_cfg, image_shape, guidance))


@functools.lru_cache(maxsize=8)
def _token_sampler(sample):
  return jax.jit(lambda params, tokens, mask, key: to_unit(
      sample(params, {'tokens': tokens, 'mask': mask}, key)))


def make_cond_sampler(graphdef, sampler_cfg, image_shape: tuple[int, ...], guidance=Guidance()):
  """A jitted `(params, cond, key) -> x̂0 latents` of the configured sampler for any family:
  `cond` as the family's batches hold it (`GeneratorFamily.host_batch`), the guided velocity."""
  return _sampler(graphdef, guidance, tuple(float(s) for s in sampler_sigmas(sampler_cfg)),
                  str(sampler_cfg.get('kind', 'ode')),
                  float(sampler_cfg.get('noise_level', 0.0)), tuple(image_shape))


@functools.lru_cache(maxsize=8)
def _sampler(graphdef, guidance, sigmas_tuple, kind, noise_level, image_shape):
  sigmas = jnp.asarray(np.asarray(sigmas_tuple, np.float32))
  velocity = guided_velocity(graphdef, guidance)

  @jax.jit
  def sample(params, cond, key):
    b = jax.tree.leaves(cond)[0].shape[0]
    x_init = rollout_lib.initial_noise(jax.random.fold_in(key, 0), (b,) + tuple(image_shape))
    traj = rollout_lib.rollout(lambda x, s: velocity(params, x, s, cond), x_init, sigmas,
                               jax.random.fold_in(key, 1), kind=kind, noise_level=noise_level,
                               keep_steps=())
    return traj.x0_hat

  return sample


def sample_digits(sample_fn, params, tok, *, per_class: int, max_len: int, key: jax.Array,
                  batch_sharding=None):
  """Runs `sample_fn` on the ten digit prompts × per_class; returns (images, labels, prompts)."""
  prompts, labels = digit_prompts(per_class)
  tokens, mask = tokenizer_lib.encode_prompts(tok, prompts, max_len)
  if batch_sharding is not None:
    tokens = jax.device_put(tokens, batch_sharding(tokens.ndim))
    mask = jax.device_put(mask, batch_sharding(mask.ndim))
  images = np.asarray(jax.device_get(sample_fn(params, tokens, mask, key)), np.float32)
  return images, labels, prompts


def write_samples(directory: str, name: str, images: np.ndarray, labels: np.ndarray,
                  prompts: list[str], ncols: int | None = None) -> str:
  """Writes `<name>.npz` and `<name>.png` under `directory`; returns the npz path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f'{name}.npz')
  samples_lib.save_samples(path, images, labels, prompts)
  metrics_lib.save_png(os.path.join(directory, f'{name}.png'), sample_grid(images, ncols))
  return path


def sample_grid(images: np.ndarray, ncols: int | None = None) -> np.ndarray:
  """The uint8 grid of `write_samples`' PNG (default: ten rows, one per digit prompt)."""
  return metrics_lib.image_grid(images, ncols=ncols or max(1, len(images) // 10))


def make_judge_hook(config, graphdef, tok, workdir: str, image_shape: tuple[int, ...],
                    params_item: str = 'params', extra=None):
  """A loop hook `(state, step) -> metrics`: ODE samples of the ten digit prompts from a fixed key
  (`state['ema']` if present, else `state[params_item]`) → `samples/samples_<step>.npz/.png` and
  the grid as the image metric 'samples', and the independent judge's prompt-alignment accuracy. `extra(images, labels, tokens, mask) -> dict`
  adds metrics (tokens/mask: the prompts as the generator saw them, for latent rewards that run
  the generator's own blocks).
  """
  sample_fn = make_sampler(graphdef, config.sampler, image_shape)
  sample_key = rng_lib.key(config.seed, 'judge_samples')
  max_len = int(config.data.max_text_len)

  @functools.cache
  def judge():
    from rewarddance_jax import judge as judge_lib  # pylint: disable=import-outside-toplevel
    return judge_lib.DigitJudge.load_or_train()

  def hook(state, step):
    params = state.get('ema', state[params_item])
    images, labels, prompts = sample_digits(sample_fn, params, tok,
                                            per_class=int(config.samples.per_class),
                                            max_len=max_len, key=sample_key)
    if jax.process_index() == 0:   # every host holds the same samples
      write_samples(os.path.join(workdir, 'samples'), f'samples_{step}', images, labels, prompts)
    out = {'judge_accuracy': judge().accuracy(images, labels), 'samples': sample_grid(images)}
    if extra is not None:
      tokens, mask = tokenizer_lib.encode_prompts(tok, prompts, max_len)
      out.update(extra(images, labels, tokens, mask))
    logging.info('step %d: judge prompt-alignment accuracy %.3f', step, out['judge_accuracy'])
    return out

  return hook


def search_prompts(velocity, params, cond: dict, sampler_cfg, verifier, *, image_shape,
                   key: jax.Array, method: str, n: int = 4, m: int = 2, delta_f: float = 0.1,
                   every: int = 1):
  """Inference-time search over P prompts with a verifier (flow/search.py), any family.

  `cond`: numpy conditioning, one row per prompt; `velocity(params, x, σ, cond)` the family's
  guided generator; `verifier(x̂0 (R, ...)) -> (R,)` scores rows in prompt-major order. method
  'sop' is Search over Paths (N beams, M re-noisings, Δf, every `every` grid steps), 'bon'
  best-of-n. Returns the `SearchResult` (x0 (P, ...), scores, model calls per image).
  """
  sigmas = sampler_sigmas(sampler_cfg)
  fn = jax.jit(lambda x, s, c: velocity(params, x, s, c))
  rows = len(next(iter(cond.values())))

  def velocity_for(reps):
    c = {k: jnp.asarray(np.repeat(v, reps, 0)) for k, v in cond.items()}
    return lambda x, s: fn(x, s, c)

  x_init = rollout_lib.initial_noise(key, (rows * n,) + tuple(image_shape))
  if method == 'sop':
    return search.search_over_paths(lambda reps: velocity_for(n * reps), x_init, sigmas,
                                    verifier, jax.random.fold_in(key, 1), n=n, m=m,
                                    delta_f=delta_f, every=every)
  if method == 'bon':
    return search.best_of_n(velocity_for(n), x_init, jnp.asarray(sigmas), verifier, n)
  raise ValueError(f'search method {method!r} is not one of (bon, sop).')


def search_digits(graphdef, params, tok, sampler_cfg, score, *, per_class: int, max_len: int,
                  key: jax.Array, method: str, n: int = 4, m: int = 2, delta_f: float = 0.1,
                  every: int = 1, image_shape: tuple[int, ...] = (16, 16, 1)):
  """`search` over the ten digit prompts; `score(images in [0, 1], labels) -> (R,)` is the
  verifier. Returns (images, labels, prompts, model calls per image)."""
  prompts, labels = digit_prompts(per_class)
  tokens, mask = tokenizer_lib.encode_prompts(tok, prompts, max_len)

  def verifier(x0):
    lab = np.repeat(labels, x0.shape[0] // len(labels))
    return jnp.asarray(score(np.asarray(to_unit(x0)), lab))

  res = search_prompts(guided_velocity(graphdef, Guidance()), params,
                       {'tokens': tokens, 'mask': mask}, sampler_cfg, verifier,
                       image_shape=image_shape, key=key, method=method, n=n, m=m,
                       delta_f=delta_f, every=every)
  return np.asarray(to_unit(res.x0), np.float32), labels, prompts, int(res.model_calls)


def sample_family(fam, graphdef, params, codec, sampler_cfg, *, prompts_dir: str,
                  count: int, key: jax.Array, search_method: str = 'none', verifier=None,
                  **search_kw):
  """Samples the first `count` prompts of an encoded-prompts directory with the family's
  guided velocity, decoded by its codec: (images in [0, 1], prompt ids, prompts, model calls).
  With `search_method` bon | sop each image is the verifier's pick (`search_prompts`);
  `verifier` is a WeightedRewards scoring {'latents', 'pixels'} against the rows' 'ids'."""
  from rewarddance_jax.weights import text_pipeline  # pylint: disable=import-outside-toplevel
  encoded = text_pipeline.EncodedPrompts(prompts_dir)
  ids = np.arange(min(int(count), len(encoded)), dtype=np.int32)
  if not len(ids):
    raise ValueError(f'{prompts_dir}: no prompts to sample (count={count}).')
  cond = fam.with_negative(encoded[list(ids)])
  decode = jax.jit(codec.decode)
  if search_method == 'none':
    sample = make_cond_sampler(graphdef, sampler_cfg, fam.latent_shape, fam.guidance)
    x0 = sample(params, jax.tree.map(jnp.asarray, cond), key)
    calls = int(sampler_cfg.num_steps)
  else:
    if verifier is None:
      raise ValueError('search needs a verifier reward.')
    score = jax.jit(lambda r, x0, batch: r.total(
        {'latents': x0, 'pixels': codec.decode(x0, codec.params)}, batch, jax.random.key(0)))

    def verify(x0):
      batch = {'ids': jnp.asarray(np.repeat(ids, x0.shape[0] // len(ids)))}
      return score(verifier, x0, batch)

    res = search_prompts(fam.velocity(graphdef), params, cond, sampler_cfg, verify,
                         image_shape=fam.latent_shape, key=key, method=search_method,
                         **search_kw)
    x0, calls = res.x0, int(res.model_calls)
  images = np.asarray(jax.device_get(decode(x0, codec.params)), np.float32)
  return images, ids, [encoded.prompts[i] for i in ids], calls


def judge_hooks(config, graphdef, tok, workdir: str, image_shape: tuple[int, ...], rewards=None):
  """The loop hooks of a digits generator trainer: `make_judge_hook` every `config.samples.every`
  steps (none when 0), adding the mean of `rewards` (a WeightedRewards) on those samples as
  'sample_reward' when given."""
  every = int(config.samples.get('every', 0))
  if every <= 0:
    return []
  extra = None
  if rewards is not None:
    score = jax.jit(lambda r, images, batch: r.total(
        {'pixels': images, 'latents': images * 2.0 - 1.0}, batch, jax.random.key(0)))

    def extra(images, labels, tokens, mask):
      batch = {'labels': jnp.asarray(labels, jnp.int32), 'tokens': jnp.asarray(tokens),
               'mask': jnp.asarray(mask)}
      return {'sample_reward': float(jnp.mean(score(rewards, jnp.asarray(images), batch)))}

  return [(every, make_judge_hook(config, graphdef, tok, workdir, image_shape, extra=extra))]
