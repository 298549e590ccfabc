"""Sampling glue between a generator param tree and flow/: velocity closures and digit grids.

  1. `velocity_fn(graphdef, params, cond, guidance)` closes a Generator over its params and
     conditioning, giving the `(x, σ) -> v` function that flow/ samplers call.
  2. `sample_digits(...)` draws `per_class` images for each of the ten digit prompts with the
     configured schedule and step kind, from a fixed key (so sample grids are comparable across
     steps and runs), and returns images in [0, 1] with labels and prompts.
  3. `write_samples(dir, name, ...)` writes `<name>.npz` (the samples format of data/samples.py)
     and `<name>.png` (a grid, one row per digit).
  4. `make_judge_hook(...)`: the loop hook every digits trainer uses (samples + judge accuracy).
  5. `search_digits(...)`: best-of-N / Search over Paths on the digit prompts with a verifier.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from rewarddance_jax import metrics as metrics_lib
from rewarddance_jax.data import digits
from rewarddance_jax.data import samples as samples_lib
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.flow import rollout as rollout_lib
from rewarddance_jax.flow import schedules, search


def velocity_fn(graphdef, params, cond: dict, guidance=None):
  model = nnx.merge(graphdef, params)

  def v(x, sigma):
    return model(x, sigma, cond, guidance)

  return v


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


def make_sampler(graphdef, sampler_cfg, image_shape: tuple[int, ...]):
  """A jitted `(params, tokens, mask, key) -> images in [0, 1]` for the configured sampler.

  Params are an argument, so one compiled sampler serves every checkpoint of a model: equal
  (graphdef, schedule, kind, noise level, shape) return the same jitted function (the pipeline's
  evaluation samples six stages of one generator and compiles once)."""
  return _sampler(graphdef, tuple(float(s) for s in sampler_sigmas(sampler_cfg)),
                  str(sampler_cfg.get('kind', 'ode')),
                  float(sampler_cfg.get('noise_level', 0.0)), tuple(image_shape))


@functools.lru_cache(maxsize=8)
def _sampler(graphdef, sigmas_tuple, kind, noise_level, image_shape):
  sigmas = jnp.asarray(np.asarray(sigmas_tuple, np.float32))

  @jax.jit
  def sample(params, tokens, mask, key):
    cond = {'tokens': tokens, 'mask': mask}
    x_init = rollout_lib.initial_noise(jax.random.fold_in(key, 0),
                                       (tokens.shape[0],) + tuple(image_shape))
    traj = rollout_lib.rollout(velocity_fn(graphdef, params, cond), x_init, sigmas,
                               jax.random.fold_in(key, 1), kind=kind, noise_level=noise_level,
                               keep_steps=())
    return to_unit(traj.x0_hat)

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
  grid = metrics_lib.image_grid(images, ncols=ncols or max(1, len(images) // 10))
  metrics_lib.save_png(os.path.join(directory, f'{name}.png'), grid)
  return path


def make_judge_hook(config, graphdef, tok, workdir: str, image_shape: tuple[int, ...],
                    params_item: str = 'params', extra=None):
  """A loop hook `(state, step) -> metrics`: ODE samples of the ten digit prompts from a fixed key
  (`state['ema']` if present, else `state[params_item]`) → `samples/samples_<step>.npz/.png`, and
  the independent judge's prompt-alignment accuracy. `extra(images, labels, tokens, mask) -> dict`
  adds metrics (tokens/mask: the prompts as the generator saw them, for latent rewards that run
  the generator's own blocks).
  """
  sample_fn = make_sampler(graphdef, config.sampler, image_shape)
  sample_key = jax.random.key(int(config.seed) + 1)
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
    out = {'judge_accuracy': judge().accuracy(images, labels)}
    if extra is not None:
      tokens, mask = tokenizer_lib.encode_prompts(tok, prompts, max_len)
      out.update(extra(images, labels, tokens, mask))
    logging.info('step %d: judge prompt-alignment accuracy %.3f', step, out['judge_accuracy'])
    return out

  return hook


def search_digits(graphdef, params, tok, sampler_cfg, score, *, per_class: int, max_len: int,
                  key: jax.Array, method: str, n: int = 4, m: int = 2, delta_f: float = 0.1,
                  every: int = 1, image_shape: tuple[int, ...] = (16, 16, 1)):
  """Inference-time search over the ten digit prompts with a verifier (flow/search.py).

  `score(images in [0, 1], labels) -> (R,)` is the verifier. method 'sop' is Search over Paths
  (N beams, M re-noisings, Δf, every `every` grid steps); 'bon' is best-of-n. Returns
  (images, labels, prompts, model calls per image).
  """
  prompts, labels = digit_prompts(per_class)
  tokens, mask = tokenizer_lib.encode_prompts(tok, prompts, max_len)
  sigmas = sampler_sigmas(sampler_cfg)
  fn = jax.jit(lambda x, s, c: velocity_fn(graphdef, params, c)(x, s))

  def velocity_for(reps):
    cond = {'tokens': jnp.asarray(np.repeat(tokens, reps, 0)),
            'mask': jnp.asarray(np.repeat(mask, reps, 0))}
    return lambda x, s: fn(x, s, cond)

  def verifier(x0):
    lab = np.repeat(labels, x0.shape[0] // len(labels))
    return jnp.asarray(score(np.asarray(to_unit(x0)), lab))

  x_init = rollout_lib.initial_noise(key, (len(prompts) * n,) + tuple(image_shape))
  if method == 'sop':
    res = search.search_over_paths(lambda reps: velocity_for(n * reps), x_init, sigmas, verifier,
                                   jax.random.fold_in(key, 1), n=n, m=m, delta_f=delta_f,
                                   every=every)
  elif method == 'bon':
    res = search.best_of_n(velocity_for(n), x_init, jnp.asarray(sigmas), verifier, n)
  else:
    raise ValueError(f'search method {method!r} is not one of (bon, sop).')
  return np.asarray(to_unit(res.x0), np.float32), labels, prompts, int(res.model_calls)


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
