"""Resume after faults, in process: a corrupt newest checkpoint falls back to the previous one, a
run that died before its first checkpoint reruns without duplicated metrics; both bitwise equal
to an uninterrupted run."""

import glob
import os
import shutil

import jax
import numpy as np
import pytest

from configs.digits import flow as flow_config
from rewarddance_jax import checkpoint
from rewarddance_jax import metrics as metrics_lib
from rewarddance_jax.train import flow as flow_trainer, loop as loop_lib


def _config(**overrides):
  c = flow_config.get_config('runlocal,steps=6')
  c.samples.every = 0
  c.log_every = 1
  c.ckpt.every = 2
  c.ckpt.keep = 3
  c.ckpt.async_save = False
  c.data.batch_size = 8
  c.mesh.num_devices = 1
  for k, v in overrides.items():
    sec, _, key = k.rpartition('.')
    (c[sec] if sec else c)[key] = v
  return c


def _result(workdir):
  lines = [m for m in metrics_lib.read_metrics(workdir) if 'loss' in m]
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False) as ckpt:
    params = ckpt.read_item(ckpt.latest_step(), 'params')
  return ([(m['step'], m['loss'], m['grad_norm']) for m in lines],
          [np.asarray(x).tobytes() for x in jax.tree.leaves(params)])


@pytest.fixture
def reference(tmp_path):
  """Per test: the compile options the run uses are the test's own (conftest `fast_compiles`)."""
  work = str(tmp_path / 'reference')
  flow_trainer.train(_config(), work)
  return _result(work)


def _truncate_data(step_dir):
  files = glob.glob(os.path.join(step_dir, 'params', 'ocdbt.process_0', 'd', '*'))
  os.truncate(max(files, key=os.path.getsize), 100)


def _garble(name):
  def damage(step_dir):
    with open(os.path.join(step_dir, name), 'w', encoding='utf-8') as f:
      f.write('garbage{')
  return damage


DAMAGES = {'truncated data file': _truncate_data,
           'missing commit marker': lambda d: os.remove(os.path.join(d, 'commit_success.txt')),
           'garbled _METADATA': _garble('params/_METADATA'),
           'garbled json item': _garble('data_iter/metadata'),
           'garbled saved config': _garble('config/metadata')}


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(
    tmp_path, reference, caplog):
  first = str(tmp_path / 'first')
  flow_trainer.train(_config(total_steps=4), first)   # checkpoints 2 and 4
  for name, damage in DAMAGES.items():
    work = str(tmp_path / name.replace(' ', '_'))
    shutil.copytree(first, work)
    damage(os.path.join(work, 'checkpoints', '4'))
    caplog.clear()
    flow_trainer.train(_config(), work)
    warnings = [r.getMessage() for r in caplog.records if 'moved it to' in r.getMessage()]
    assert len(warnings) == 1 and f'{work}/checkpoints/4' in warnings[0], (name, warnings)
    assert '\n' not in warnings[0] and 'TensorStore(' not in warnings[0], warnings[0]
    assert os.path.isdir(os.path.join(work, 'checkpoints_corrupt', '4')), name  # kept, not deleted
    assert sorted(os.listdir(os.path.join(work, 'checkpoints'))) == ['2', '4', '6'], name
    assert _result(work) == reference, name


def test_every_checkpoint_corrupt_starts_over(tmp_path, reference):
  work = str(tmp_path / 'w')
  flow_trainer.train(_config(total_steps=2), work)
  _truncate_data(os.path.join(work, 'checkpoints', '2'))
  flow_trainer.train(_config(), work)
  assert os.listdir(os.path.join(work, 'checkpoints_corrupt')) == ['2']
  assert _result(work) == reference


class _Died(Exception):
  pass


def test_death_before_the_first_checkpoint_leaves_no_duplicated_metrics(tmp_path, monkeypatch,
                                                                        reference):
  work = str(tmp_path / 'w')
  real_run = loop_lib.run

  def dies_at_step_4(**kw):
    def die(state, step):
      if step == 4:
        raise _Died()
    kw['hooks'] = list(kw['hooks']) + [(1, die)]
    return real_run(**kw)

  monkeypatch.setattr(loop_lib, 'run', dies_at_step_4)
  with pytest.raises(_Died):
    flow_trainer.train(_config(**{'ckpt.every': 100}), work)
  monkeypatch.setattr(loop_lib, 'run', real_run)
  assert not os.path.exists(os.path.join(work, 'checkpoints', '2'))
  assert [m['step'] for m in metrics_lib.read_metrics(work) if 'loss' in m] == [1, 2, 3]
  flow_trainer.train(_config(**{'ckpt.every': 100}), work)
  assert _result(work) == reference
