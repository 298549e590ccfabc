"""Sample a trained generator of any family: checkpoint → image grid (PNG) + samples npz.

  python -m launch.sample --workdir=/tmp/digits_flow [--step=2000] [--per_class=10]
      [--num_steps=20] [--kind=ode|dance|flow_grpo|cps] [--noise_level=0.0] [--out=DIR] [--seed=0]
      [--search=none|bon|sop --n=4 --m=2 --delta_f=0.1 --every=1
       --verifier=digit_prototype | --verifier=vlm_yes --verifier_path=RM_DIR/reward_model]

Reads the run's own config from the workdir and restores the params (EMA if the run kept them; a
LoRA run merged into its base) onto this machine's mesh. Digits: samples the ten digit prompts, writes `<out>/samples_<step>`
.npz/.png and prints the independent judge's prompt-alignment accuracy. With --search, each image
is the pick of best-of-N or Search over Paths (RewardDance §3.3.2) under the verifier reward, and
the number of model calls per image is printed. FLUX / SD3.5 runs: the first --count prompts of
the run's encoded prompts (or --prompts), with the run's guidance (CFG's negative prompt) and VAE
decode; --search verifiers are reward kinds (mean_intensity, vlm_yes with --verifier_path).
"""

import json
import os

import ml_collections
import numpy as np
from absl import flags

from launch import cli
from rewarddance_jax import checkpoint as ckpt_lib
from rewarddance_jax import families
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax import evaluate
from rewarddance_jax import judge as judge_lib
from rewarddance_jax import logs
from rewarddance_jax.parallel import rng as rng_lib
from rewarddance_jax.rewards import registry
from rewarddance_jax.train import common, generate

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory written by launch.train.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
_PER_CLASS = flags.DEFINE_integer('per_class', 10, 'Images per digit prompt.')
_NUM_STEPS = flags.DEFINE_integer('num_steps', None, 'Sampling steps (default: the config).')
_KIND = flags.DEFINE_string('kind', None, 'Step kind (default: the config sampler).')
_NOISE = flags.DEFINE_float('noise_level', None, 'η / a for SDE kinds (default: the config).')
_OUT = flags.DEFINE_string('out', None, 'Output directory (default: WORKDIR/samples).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_SEARCH = flags.DEFINE_enum('search', 'none', ['none', 'bon', 'sop'],
                            'Inference-time search: best-of-N or Search over Paths.')
_N = flags.DEFINE_integer('n', 4, 'Search: candidates (bon) or beams (sop) per prompt.')
_M = flags.DEFINE_integer('m', 2, 'Search over Paths: re-noisings per beam.')
_DELTA_F = flags.DEFINE_float('delta_f', 0.1, 'Search over Paths: forward re-noising Δf.')
_EVERY = flags.DEFINE_integer('every', 1, 'Search over Paths: search every k grid steps.')
_VERIFIER = flags.DEFINE_string('verifier', 'digit_prototype', 'Verifier reward kind.')
_VERIFIER_PATH = flags.DEFINE_string('verifier_path', '', 'Trained reward dir (vlm_yes).')
_PROMPTS = flags.DEFINE_string('prompts', None, 'Encoded families (flux, sd3): an encoded-'
                               'prompts directory (default: the run\'s config.data).')
_COUNT = flags.DEFINE_integer('count', 8, 'Encoded families: how many of its prompts to sample.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  logs.quiet_libraries()
  workdir = _WORKDIR.value
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise ValueError(f'{workdir} has no checkpoints/ directory; is it a launch.train workdir?')
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
  step = _STEP.value if _STEP.value is not None else ckpt.latest_step()
  if step is None or step not in ckpt.all_steps():
    raise ValueError(f'no checkpoint step {step} in {ckpt_dir} (have {ckpt.all_steps()}).')
  config = ml_collections.ConfigDict(ckpt.restore(step, json=('config',))['config'])
  if 'sampler' not in config:   # an alignment run without one: a 20-step ODE on the shifted grid
    config.sampler = dict(kind='ode', schedule='shift', num_steps=20, shift=3.0, noise_level=0.0)
  for name, flag in (('num_steps', _NUM_STEPS), ('kind', _KIND), ('noise_level', _NOISE)):
    if flag.value is not None:
      config.sampler[name] = flag.value
  config.mesh.ici = tuple(config.mesh.ici)
  mesh, rules = common.setup_mesh(config)
  fam = families.from_config(config)
  graphdef, params, pshard, _ = common.build_generator(config, mesh, rules, abstract=True)
  item = 'ema' if os.path.isdir(os.path.join(str(ckpt.step_directory(step)), 'ema')) else 'params'
  ckpt.close()
  params = common.restore_generator(workdir, params, pshard, use_ema=True, step=step)
  if fam.conditioning != 'tokens':
    return sample_encoded(config, fam, graphdef, params, mesh, rules, step)
  tok = tokenizer_lib.load_or_build(workdir, config.model.get('vocab_size'))
  kw = dict(per_class=_PER_CLASS.value, max_len=int(config.data.max_text_len),
            key=rng_lib.key(_SEED.value, 'sample'))
  name, extra = f'samples_{step}', {}
  with common.mesh_context(mesh, rules):
    if _SEARCH.value == 'none':
      sample_fn = generate.make_sampler(graphdef, config.sampler, (16, 16, 1))
      images, labels, prompts = generate.sample_digits(sample_fn, params, tok, **kw)
      extra['model_calls'] = int(config.sampler.num_steps)
    else:
      spec = {'verifier': {'kind': _VERIFIER.value}}
      if _VERIFIER_PATH.value:
        spec['verifier']['path'] = _VERIFIER_PATH.value
      score = evaluate.make_scorer(spec)
      images, labels, prompts, calls = generate.search_digits(
          graphdef, params, tok, config.sampler, score, method=_SEARCH.value, n=_N.value,
          m=_M.value, delta_f=_DELTA_F.value, every=_EVERY.value, **kw)
      name += f'_{_SEARCH.value}'
      extra.update(model_calls=calls, search=_SEARCH.value, verifier=_VERIFIER.value,
                   verifier_mean=round(float(np.mean(score(images, labels))), 4))
  out = _OUT.value or os.path.join(workdir, 'samples')
  path = generate.write_samples(out, name, images, labels, prompts)
  acc = judge_lib.DigitJudge.load_or_train().accuracy(images, labels)
  print(json.dumps({'samples': path, 'png': path[:-4] + '.png', 'step': step, 'params': item,
                    'sampler': dict(config.sampler), 'judge_accuracy': round(float(acc), 4),
                    'n': int(np.asarray(labels).size), **extra}))


def sample_encoded(config, fam, graphdef, params, mesh, rules, step: int):
  """A FLUX / SD3.5 run: its encoded prompts, guided velocity and VAE decode."""
  verifier = None
  if _SEARCH.value != 'none':
    entry = {'kind': _VERIFIER.value}
    if _VERIFIER_PATH.value:
      entry.update(path=_VERIFIER_PATH.value)
    if _VERIFIER.value == 'vlm_yes':
      entry.update(prompts=_PROMPTS.value or fam.encoded_prompts, prompt_index='ids')
    verifier = registry.build_rewards({'verifier': entry}, mesh, rules)
  with common.mesh_context(mesh, rules):
    images, ids, prompts, calls = generate.sample_family(
        fam, graphdef, params, fam.codec(mesh, rules), config.sampler,
        prompts_dir=_PROMPTS.value or fam.encoded_prompts, count=_COUNT.value,
        key=rng_lib.key(_SEED.value, 'sample'), search_method=_SEARCH.value, verifier=verifier,
        n=_N.value, **({'m': _M.value, 'delta_f': _DELTA_F.value, 'every': _EVERY.value}
                       if _SEARCH.value == 'sop' else {}))
  name = f'samples_{step}' + ('' if _SEARCH.value == 'none' else f'_{_SEARCH.value}')
  out = _OUT.value or os.path.join(_WORKDIR.value, 'samples')
  path = generate.write_samples(out, name, images, ids, prompts, ncols=len(ids))
  print(json.dumps({'samples': path, 'png': path[:-4] + '.png', 'step': step,
                    'family': fam.name, 'guidance': fam.guidance.kind, 'n': len(ids),
                    'model_calls': calls, 'search': _SEARCH.value}))


if __name__ == '__main__':
  cli.run(main)
