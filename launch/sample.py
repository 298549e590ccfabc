"""Sample a trained digits generator: checkpoint → image grid (PNG) + samples npz.

  python -m launch.sample --workdir=/tmp/digits_flow [--step=2000] [--per_class=10]
      [--num_steps=20] [--kind=ode|dance|flow_grpo|cps] [--noise_level=0.0] [--out=DIR] [--seed=0]

Reads the run's own config and tokenizer from the workdir, restores the params (EMA if the run
kept them) onto this machine's mesh, samples the ten digit prompts, writes `<out>/samples_<step>`
.npz/.png and prints the independent judge's prompt-alignment accuracy.
"""

import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags

from rewarddance_jax import checkpoint as ckpt_lib
from rewarddance_jax import judge as judge_lib
from rewarddance_jax import logs
from rewarddance_jax.train import common, generate

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory written by launch.train.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
_PER_CLASS = flags.DEFINE_integer('per_class', 10, 'Images per digit prompt.')
_NUM_STEPS = flags.DEFINE_integer('num_steps', None, 'Sampling steps (default: the config).')
_KIND = flags.DEFINE_string('kind', None, 'Step kind (default: the config sampler).')
_NOISE = flags.DEFINE_float('noise_level', None, 'η / a for SDE kinds (default: the config).')
_OUT = flags.DEFINE_string('out', None, 'Output directory (default: WORKDIR/samples).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  logs.quiet_libraries()
  workdir = _WORKDIR.value
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise app.UsageError(f'{workdir} has no checkpoints/ directory; is it a launch.train workdir?')
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
  step = _STEP.value if _STEP.value is not None else ckpt.latest_step()
  if step is None or step not in ckpt.all_steps():
    raise app.UsageError(f'no checkpoint step {step} in {ckpt_dir} (have {ckpt.all_steps()}).')
  config = ml_collections.ConfigDict(ckpt.restore(step, json=('config',))['config'])
  for name, flag in (('num_steps', _NUM_STEPS), ('kind', _KIND), ('noise_level', _NOISE)):
    if flag.value is not None:
      config.sampler[name] = flag.value
  config.mesh.ici = tuple(config.mesh.ici)
  mesh, rules = common.setup_mesh(config)
  tok = common.digits_tokenizer(workdir, config.model.get('vocab_size'))
  graphdef, params, pshard, _ = common.build_generator(config, mesh, rules)
  has_ema = os.path.isdir(os.path.join(str(ckpt.step_directory(step)), 'ema'))
  item = 'ema' if has_ema else 'params'
  restored = ckpt.restore(step, arrays={item: ckpt_lib.abstract_like(params, pshard)})
  ckpt.close()
  sample_fn = generate.make_sampler(graphdef, config.sampler, (16, 16, 1))
  with common.mesh_context(mesh, rules):
    images, labels, prompts = generate.sample_digits(
        sample_fn, restored[item], tok, per_class=_PER_CLASS.value,
        max_len=int(config.data.max_text_len), key=jax.random.key(_SEED.value))
  out = _OUT.value or os.path.join(workdir, 'samples')
  path = generate.write_samples(out, f'samples_{step}', images, labels, prompts)
  acc = judge_lib.DigitJudge.load_or_train().accuracy(images, labels)
  print(json.dumps({'samples': path, 'png': path[:-4] + '.png', 'step': step, 'params': item,
                    'sampler': dict(config.sampler), 'judge_accuracy': round(float(acc), 4),
                    'n': int(np.asarray(labels).size)}))


if __name__ == '__main__':
  app.run(main)
