"""The shared loop's guards (issue 23): runs that lose nothing.

1. A step whose returned state holds a NaN or an infinity is skipped inside the jitted program
   (old state kept bitwise, `skipped` = 1) although the trainer reported nothing: on a toy step
   and on the flow trainer with Adam eps = 0; no checkpoint holds a non-finite value, and the
   halt after `max_nonfinite` skips names the last good checkpoint.
2. Loop counts (total_steps, log_every, ckpt.every, ckpt.keep, max_nonfinite) and optax values
   are checked with one-line errors naming the key; keep = 1 keeps the final step.
3. A resume compares the checkpoint's config with the current one: a changed key is refused
   (one line, `key: old -> new`), accepted with `resume_with_changes` and then recorded.
"""

import importlib
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rewarddance_jax import checkpoint as ckpt_lib
from rewarddance_jax import metrics as metrics_lib
from rewarddance_jax.train import common, flow as flow_trainer, loop as loop_lib, optim
from test_train_flow import _config


class _Scales:
  """A data iterator over fixed per-step scalars, with the loop's get_state / set_state."""

  def __init__(self, values):
    self.values, self.pos = list(values), 0

  def __next__(self):
    self.pos += 1
    return np.float32(self.values[self.pos - 1])

  def get_state(self):
    return {'pos': self.pos}

  def set_state(self, state):
    self.pos = int(state['pos'])


W0 = np.arange(4, dtype=np.float32)
CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')


def _toy_step(state, scale, key):
  """w ← w·scale + 1 and a counter, with a finite loss and skipped = 0 whatever `scale` is."""
  del key
  new = {'params': {'w': state['params']['w'] * scale + 1.0},
         'opt_state': {'count': state['opt_state']['count'] + 1}}
  return new, {'loss': jnp.sum(state['params']['w']), 'skipped': jnp.int32(0)}


def _toy_run(workdir, scales, *, config_json=None, **loop_kw):
  mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
  rep = NamedSharding(mesh, P())
  state = jax.device_put({'params': {'w': jnp.asarray(W0)},
                          'opt_state': {'count': jnp.int32(0)}}, rep)
  kw = dict(total_steps=len(scales), log_every=1, ckpt_every=1, keep=100, async_save=False,
            progress=False)
  kw.update(loop_kw)
  return loop_lib.run(
      workdir=str(workdir), loop=loop_lib.LoopConfig(**kw), state=state,
      state_shardings=jax.tree.map(lambda _: rep, state), step_fn=_toy_step,
      data_iter=_Scales(scales), to_device=jnp.asarray, key=jax.random.key(0), mesh=mesh,
      config_json=config_json)


def _restore(workdir, step, target):
  with ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False) as ckpt:
    return jax.device_get(ckpt.restore(step, arrays={'params': ckpt_lib.abstract_like(target)})[
        'params'])


def _steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


def test_nonfinite_update_is_skipped_bitwise_and_never_checkpointed(tmp_path):
  scales = [2.0, math.nan, math.inf, 0.5, 1.0]
  state, last = _toy_run(tmp_path, scales)
  w = W0
  for s in (2.0, 0.5, 1.0):   # the kept updates
    w = w * np.float32(s) + np.float32(1.0)
  assert last == 5
  np.testing.assert_array_equal(np.asarray(state['params']['w']), w)
  assert int(state['opt_state']['count']) == 3
  assert [m['skipped'] for m in metrics_lib.read_metrics(str(tmp_path))] == [0, 1, 1, 0, 0]
  target = {'w': W0}
  saved = {s: _restore(str(tmp_path), s, target)['w'] for s in _steps(str(tmp_path))}
  assert sorted(saved) == [1, 2, 3, 4, 5]
  assert all(np.isfinite(v).all() for v in saved.values())
  np.testing.assert_array_equal(saved[2], saved[1])
  np.testing.assert_array_equal(saved[3], saved[1])


def test_halt_names_the_last_good_checkpoint(tmp_path):
  with pytest.raises(loop_lib.NonFiniteError) as excinfo:
    _toy_run(tmp_path, [2.0, math.nan, math.nan, math.nan, 1.0], max_nonfinite=2)
  message = str(excinfo.value)
  assert '\n' not in message and '2 consecutive non-finite' in message
  assert message.endswith(f'last good checkpoint: {tmp_path / "checkpoints" / "3"}.'), message
  np.testing.assert_array_equal(_restore(str(tmp_path), 3, {'w': W0})['w'], W0 * 2 + 1)


def test_flow_trainer_with_adam_eps_0_keeps_its_initial_params(tmp_path):
  # Adam with eps = 0 divides 0 by 0 where a gradient is exactly 0: finite loss and gradients,
  # NaN params; only the loop's check of the new state catches it.
  cfg = _config(**{'optax.eps': 0.0, 'max_nonfinite': 3, 'ckpt.every': 1})
  work = str(tmp_path / 'eps0')
  with pytest.raises(loop_lib.NonFiniteError, match='3 consecutive non-finite'):
    flow_trainer.train(cfg, work)
  ms = [m for m in metrics_lib.read_metrics(work) if 'loss' in m]
  assert ms and all(m['skipped'] == 1 and np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])
                    for m in ms)
  mesh, rules = common.setup_mesh(cfg)
  init = jax.device_get(common.build_generator(cfg, mesh, rules)[1])
  assert _steps(work) == [2, 3]   # ckpt.keep = 2
  for step in _steps(work):
    saved = _restore(work, step, init)
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(saved))
    jax.tree.map(np.testing.assert_array_equal, saved, init)


@pytest.mark.parametrize('key,value', [('total_steps', -5), ('total_steps', 0),
                                       ('log_every', 0), ('ckpt.every', 0), ('ckpt.keep', 0),
                                       ('max_nonfinite', 0)])
def test_loop_numbers_are_checked(key, value):
  with pytest.raises(ValueError) as excinfo:
    loop_lib.LoopConfig.from_config(_config(**{key: value}))
  assert str(excinfo.value) == f'config.{key}={value!r} must be an integer in [1, inf).'
  loop_lib.LoopConfig.from_config(_config(**{key: 1}))


def test_keep_1_keeps_the_final_step(tmp_path):
  _toy_run(tmp_path, [1.0] * 5, ckpt_every=2, keep=1)
  assert _steps(str(tmp_path)) == [5]


@pytest.mark.parametrize('key,value', [('lr', -1e-3), ('lr', math.nan), ('lr', math.inf),
                                       ('b1', 1.0), ('b2', -0.1), ('eps', -1e-8),
                                       ('weight_decay', math.nan), ('grad_clip', -1.0),
                                       ('warmup_steps', -1), ('lr', 'fast')])
def test_optax_numbers_are_checked(key, value):
  base = _config().optax.to_dict()
  with pytest.raises(ValueError) as excinfo:
    optim.make_optimizer(ml_collections.ConfigDict({**base, key: value}))
  message = str(excinfo.value)
  assert message.startswith(f'config.optax.{key}={value!r} must be ') and '\n' not in message
  optim.make_optimizer(ml_collections.ConfigDict({**base, key: 0}))   # the lower bound is allowed


def test_config_changes_lists_dotted_keys():
  saved = {'optax': {'lr': 1e-3, 'b1': 0.9}, 'data': {'batch_size': 16}, 'total_steps': 3,
           'mesh': {'ici': [1, -1, 1]}, 'flow': {'shift': math.nan}, 'gone': 1}
  current = {'optax': {'lr': 5e-3, 'b1': 0.9}, 'data': {'batch_size': 32}, 'total_steps': 9,
             'mesh': {'ici': (2, -1, 1)}, 'flow': {'shift': math.nan}, 'new': 'x',
             'ckpt': {'keep': 1}, 'resume_with_changes': True}
  assert loop_lib.config_changes(saved, current) == [
      'data.batch_size: 16 -> 32', 'gone: 1 -> <absent>', 'new: <absent> -> "x"',
      'optax.lr: 0.001 -> 0.005']
  assert loop_lib.config_changes(current, current) == []


def test_resume_with_a_changed_config_is_refused_or_recorded(tmp_path):
  cfg = _config(total_steps=3)
  flow_trainer.train(cfg, str(tmp_path))
  before = open(tmp_path / 'metrics.jsonl', 'rb').read()
  changed = _config(**{'optax.lr': 5e-3})
  with pytest.raises(ValueError) as excinfo:
    flow_trainer.train(changed, str(tmp_path))
  message = str(excinfo.value)
  assert '\n' not in message and 'optax.lr: 0.001 -> 0.005' in message
  assert 'resume_with_changes' in message and str(tmp_path / 'checkpoints' / '3') in message
  assert open(tmp_path / 'metrics.jsonl', 'rb').read() == before
  assert _steps(str(tmp_path)) == [3]

  changed.resume_with_changes = True
  assert flow_trainer.train(changed, str(tmp_path)) == {'step': 6}
  records = metrics_lib.read_metrics(str(tmp_path))
  notes = [r for r in records if 'config_changes' in r]
  assert notes == [{'step': 3, 'config_changes': 'optax.lr: 0.001 -> 0.005'}]
  assert sorted(r['step'] for r in records if 'loss' in r) == [1, 2, 3, 4, 5, 6]
  with ckpt_lib.Checkpointer(tmp_path / 'checkpoints', async_save=False) as ckpt:
    assert ckpt.restore(6, json=('config',))['config']['optax']['lr'] == 5e-3
  # The next resume compares with that new config: the same config passes without the flag.
  changed.resume_with_changes = False
  changed.total_steps = 7
  assert flow_trainer.train(changed, str(tmp_path)) == {'step': 7}


def test_every_config_accepts_resume_with_changes_outside_the_step_key():
  for family in ('digits', 'flux', 'sd3'):
    for name in sorted(os.listdir(os.path.join(CONFIGS, family))):
      if name.endswith('.py') and name not in ('common.py', '__init__.py'):
        module = f'configs.{family}.{name[:-3]}'
        assert importlib.import_module(module).get_config().resume_with_changes is False, module
  cfg = _config()
  mesh, _ = common.setup_mesh(cfg)
  assert (common.step_cache_key(_config(resume_with_changes=True), mesh)
          == common.step_cache_key(cfg, mesh))
  assert loop_lib.LoopConfig.from_config(_config(resume_with_changes=True)).resume_with_changes
  assert not loop_lib.LoopConfig.from_config(cfg).resume_with_changes
