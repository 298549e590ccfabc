"""Multi-host runs, proven on one machine: 2 processes x 4 CPU devices joined over 127.0.0.1
(gloo collectives) run the flow and GRPO trainers through `launch.train`, and are checked
against one process with the same 8-device mesh (this pytest process, conftest.py):

  1. metrics equal, step by step, on both sides of a checkpoint written by the other layout
     (one process -> two and two -> one), so the hosts read together exactly the global batch;
  2. only process 0 writes metrics.jsonl and TensorBoard (each step once, one event file a run);
  3. killing process 1 makes process 0 exit with JAX's error naming task 1 within
     heartbeat_timeout + a margin, and the newest checkpoint resumes; the slow test kills
     process 0 instead and restarts both processes.

Every child has a hard timeout and is killed in a `finally`; the coordinator binds 127.0.0.1.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental import topologies

from configs.digits import flow as flow_config
from configs.digits import grpo as grpo_config
from rewarddance_jax import checkpoint as ckpt_lib
from rewarddance_jax import metrics as metrics_lib
from rewarddance_jax.data import pairs as pairs_lib, pipeline, prompts as prompts_lib
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.parallel import aot, distributed, mesh as mesh_lib
from rewarddance_jax.parallel import sharding as sharding_lib
from rewarddance_jax.train import flow as flow_trainer, grpo as grpo_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT_S = 10
RUN_TIMEOUT_S = 400   # one two-process run, compile included, on a busy 2-core machine
# One process vs two differ only in the order of the cross-device sums (gloo vs in-process);
# ATOL covers metrics near 0 (GRPO's loss, a mean of terms of both signs).
RTOL, ATOL = 1e-5, 1e-5

pytestmark = pytest.mark.usefixtures('child_jax_env')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _flags(overrides: dict) -> list[str]:
  return [f'--config.{k}={v}' for k, v in overrides.items()]


def _apply(config, overrides: dict):
  for key, value in overrides.items():
    section, _, name = key.rpartition('.')
    node = config
    for part in filter(None, section.split('.')):
      node = node[part]
    node[name] = type(node[name])(value) if not isinstance(value, tuple) else value
  return config


class _Processes:
  """`launch.train` started as process 0 and 1 of a two-process run on 127.0.0.1."""

  def __init__(self, log_dir, name: str, config_arg: str, overrides: dict, workdir: str):
    port = _free_port()
    env = dict(os.environ, JAX_NUM_CPU_DEVICES='4', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
               JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}')
    self.logs = [os.path.join(log_dir, f'{name}.{i}.log') for i in range(2)]
    self.procs = []
    for i in range(2):
      argv = [sys.executable, '-m', 'launch.train', f'--config={config_arg}',
              *_flags(overrides), f'--workdir={workdir}', f'--coordinator=127.0.0.1:{port}',
              '--num_processes=2', f'--process_id={i}', f'--heartbeat_timeout={HEARTBEAT_S}',
              f'--shutdown_timeout={HEARTBEAT_S}']
      with open(self.logs[i], 'w') as log:
        self.procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log,
                                           stderr=subprocess.STDOUT))

  def wait(self, i: int, timeout: float) -> int:
    return self.procs[i].wait(timeout=timeout)

  def log(self, i: int) -> str:
    with open(self.logs[i], encoding='utf-8', errors='replace') as f:
      return f.read()

  def kill_all(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.kill_all()


def _finish(run: _Processes, timeout: float = RUN_TIMEOUT_S):
  """Waits for both processes; each must exit 0."""
  for i in range(2):
    rc = run.wait(i, timeout)
    assert rc == 0, f'process {i} exited {rc}:\n{run.log(i)[-3000:]}'


def _metrics(workdir: str) -> dict:
  """step -> the step's training metrics (without the rate), from metrics.jsonl."""
  out = {}
  for m in metrics_lib.read_metrics(workdir):
    if 'loss' in m:
      assert m['step'] not in out, f'step {m["step"]} logged twice in {workdir}'
      out[m['step']] = {k: v for k, v in m.items() if k not in ('step', 'steps_per_s')}
  return out


def _assert_same(got: dict, want: dict, steps):
  for s in steps:
    assert got[s].keys() == want[s].keys(), s
    for k in want[s]:
      np.testing.assert_allclose(got[s][k], want[s][k], rtol=RTOL, atol=ATOL,
                                 err_msg=f'step {s} {k}')


def _copy_run(src: str, dst: str, keep_steps) -> str:
  """A copy of a workdir with only the checkpoints of `keep_steps` and the metrics up to the
  last of them: the run as if it had stopped there."""
  shutil.copytree(src, dst)
  for name in os.listdir(os.path.join(dst, 'checkpoints')):
    if name.isdigit() and int(name) not in keep_steps:
      shutil.rmtree(os.path.join(dst, 'checkpoints', name))
  path = os.path.join(dst, 'metrics.jsonl')
  with open(path, encoding='utf-8') as f:
    lines = [l for l in f if json.loads(l)['step'] <= max(keep_steps)]
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(lines)
  return dst


def _latest_step(workdir: str) -> int:
  with ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False) as c:
    return c.latest_step()


def _tb_writers(workdir: str) -> set[int]:
  """The pids that wrote TensorBoard event files (their names end in .<pid>.<n>)."""
  return {int(name.split('.')[-2]) for name in os.listdir(os.path.join(workdir, 'tb'))}


def _wait_for_step(workdir: str, step: int, run: _Processes, timeout: float):
  deadline = time.time() + timeout
  while time.time() < deadline:
    path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(path) and max(_metrics(workdir), default=0) >= step:
      return
    for i, p in enumerate(run.procs):
      assert p.poll() is None, f'process {i} exited {p.returncode}:\n{run.log(i)[-3000:]}'
    time.sleep(0.2)
  raise AssertionError(f'step {step} not logged in {timeout} s:\n{run.log(0)[-3000:]}')


# Tiny runs; Adam's eps = 1e-3 keeps its first update from amplifying the rounding differences
# of the two layouts' sums (see test_train_flow.test_sharded_step_equals_single_device).
FLOW = ('configs/digits/flow.py:runlocal', dict(
    log_every=1, **{'samples.every': 0, 'ckpt.every': 2, 'ckpt.keep': 3, 'optax.eps': 1e-3,
                    'optax.warmup_steps': 0, 'optax.decay_steps': 1000, 'data.batch_size': 16}))


def _in_process_flow(workdir: str, total_steps: int, **more) -> dict:
  arg, overrides = FLOW
  config = _apply(flow_config.get_config(arg.split(':')[1]),
                  dict(overrides, total_steps=total_steps, **more))
  flow_trainer.train(config, workdir)
  return _metrics(workdir)


def _kill_and_time(run: _Processes, victim: int) -> tuple[int, float, str]:
  """SIGKILLs process `victim`; (exit code, seconds until the survivor exited, its log)."""
  survivor = 1 - victim
  run.procs[victim].send_signal(signal.SIGKILL)
  t0 = time.time()
  rc = run.wait(survivor, HEARTBEAT_S + 60)
  return rc, time.time() - t0, run.log(survivor)


def test_flow_two_processes_match_one_and_survive_a_lost_peer(tmp_path):
  arg, overrides = FLOW
  ref_dir = str(tmp_path / 'one')
  ref = _in_process_flow(ref_dir, 6)
  assert sorted(ref) == [1, 2, 3, 4, 5, 6]

  # One process's checkpoint at step 2 resumes in two; the run goes on until process 1 dies.
  work = _copy_run(ref_dir, str(tmp_path / 'two'), keep_steps={2})
  writers = _tb_writers(work)
  with _Processes(tmp_path, 'killed', arg, dict(overrides, total_steps=10_000), work) as run:
    _wait_for_step(work, 6, run, RUN_TIMEOUT_S)
    writers.add(run.procs[0].pid)
    rc, lost_after, log0 = _kill_and_time(run, victim=1)
  assert rc != 0 and lost_after < HEARTBEAT_S + 30, (rc, lost_after)
  assert 'stopped sending heartbeats):\n1\n' in log0, log0[-3000:]   # names task 1
  assert f'{work}/checkpoints/2 at step 2.' in log0
  two = _metrics(work)              # each step once: process 1 wrote no line ...
  assert sorted(two) == list(range(1, max(two) + 1))
  assert _tb_writers(work) == writers   # ... and no TensorBoard file
  _assert_same(two, ref, [3, 4, 5, 6])

  # The newest checkpoint the two processes wrote restores in one, which continues as one
  # process would have from the same step.
  last = _latest_step(work)
  assert last >= 4
  ref = _in_process_flow(ref_dir, last + 2)
  one = _in_process_flow(_copy_run(work, str(tmp_path / 'back'), keep_steps={last}), last + 2)
  _assert_same(one, ref, [last + 1, last + 2])


@pytest.mark.slow
def test_flow_two_processes_from_scratch_lose_the_coordinator_and_restart(tmp_path):
  """The rest of the default test's story: sharded init and the judge hook in two processes,
  the death of process 0 (the coordinator), and a restart of both from the newest checkpoint."""
  arg, overrides = FLOW
  overrides = dict(overrides, **{'samples.every': 4})
  ref_dir = str(tmp_path / 'one')
  ref = _in_process_flow(ref_dir, 4, **{'samples.every': 4})
  work = str(tmp_path / 'two')
  with _Processes(tmp_path, 'scratch', arg, dict(overrides, total_steps=10_000), work) as run:
    _wait_for_step(work, 4, run, RUN_TIMEOUT_S)
    rc, lost_after, log1 = _kill_and_time(run, victim=0)
  assert rc != 0 and lost_after < HEARTBEAT_S + 30, (rc, lost_after)
  assert 'the leader task was preempted/died' in log1, log1[-3000:]
  killed = _metrics(work)
  _assert_same(killed, ref, [1, 2, 3, 4])
  judged = [m for m in metrics_lib.read_metrics(work) if 'judge_accuracy' in m]
  assert judged and judged[0]['step'] == 4
  np.testing.assert_allclose(judged[0]['judge_accuracy'], [m['judge_accuracy'] for m in
                             metrics_lib.read_metrics(ref_dir) if 'judge_accuracy' in m][0])
  assert os.path.exists(os.path.join(work, 'samples', 'samples_4.npz'))

  last = _latest_step(work)
  with _Processes(tmp_path, 'restart', arg, dict(overrides, total_steps=last + 2), work) as run:
    _finish(run)
    assert f'{work}/checkpoints/{last} at step {last}.' in run.log(0)
  two = _metrics(work)
  assert sorted(two) == list(range(1, last + 3))
  ref = _in_process_flow(ref_dir, last + 2, **{'samples.every': 4})
  _assert_same(two, ref, [last + 1, last + 2])


GRPO = ('configs/digits/grpo.py:runlocal', dict(
    log_every=1, **{'samples.every': 0, 'ckpt.every': 2, 'ckpt.keep': 3, 'optax.eps': 1e-3,
                    'data.batch_size': 8, 'mesh.ici': (2, 4, 1)}))


def _in_process_grpo(workdir: str, total_steps: int) -> dict:
  arg, overrides = GRPO
  config = _apply(grpo_config.get_config(arg.split(':')[1]), dict(overrides,
                                                                  total_steps=total_steps))
  grpo_trainer.train(config, workdir)
  return _metrics(workdir)


def test_grpo_two_processes_match_one_both_ways(tmp_path):
  """mesh (data 2, fsdp 4): `data` runs across the processes after `fsdp` in the batch axis, so
  each host's devices hold every other block of rows and host_to_global moves them there."""
  arg, overrides = GRPO
  ref_dir = str(tmp_path / 'one')
  ref = _in_process_grpo(ref_dir, 6)
  work = _copy_run(ref_dir, str(tmp_path / 'two'), keep_steps={2})
  with _Processes(tmp_path, 'grpo', arg, dict(overrides, total_steps=4), work) as run:
    _finish(run)
  two = _metrics(work)
  assert sorted(two) == [1, 2, 3, 4]
  _assert_same(two, ref, [3, 4])
  one = _in_process_grpo(_copy_run(work, str(tmp_path / 'back'), keep_steps={4}), 6)
  _assert_same(one, ref, [5, 6])


def test_hosts_read_disjoint_blocks_that_make_the_global_batch():
  """The data a trainer reads: host h of 2 gets the h-th half of each global batch (images,
  GRPO prompt groups, latent-reward pairs), the block host_to_global puts on its devices."""
  def both(make):
    whole = next(make(0, 1))
    halves = [next(make(h, 2)) for h in range(2)]
    for key, value in whole.items():
      joined = [x for half in halves for x in half[key]] if isinstance(value, list) else (
          np.concatenate([half[key] for half in halves]))
      np.testing.assert_array_equal(joined, value, err_msg=key)

  tok = tokenizer_lib.build_digits_tokenizer()
  both(lambda h, n: pipeline.digits_train_iter(16, seed=3, process_index=h, process_count=n))
  records = prompts_lib.digits_prompt_records()
  both(lambda h, n: pipeline.prompt_iter(records, 16, seed=3, tokenizer=tok, repeat_each=4,
                                         process_index=h, process_count=n))
  both(lambda h, n: pairs_lib.DigitPairs(16, split='train', seed=3, tokenizer=tok, max_len=8,
                                         process_index=h, process_count=n))


@pytest.mark.tpu_aot
@pytest.mark.filterwarnings('ignore:Error reading persistent compilation cache entry')
def test_dcn_mesh_axis_spans_slices_of_compile_only_tpus():
  """`config.mesh.dcn` on two slices of v5e:2x2 (compile-only devices; CPU devices have no
  slices): `data` runs across the slices, `fsdp` inside one, and a step reducing over both
  compiles."""
  if not aot.libtpu_available():
    pytest.skip(f'libtpu cannot be loaded/initialised: {aot.libtpu_unavailable_reason()}')
  devices = list(topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu',
                                              num_slices=2).devices)
  mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(dict(
      axes=('data', 'fsdp', 'tensor'), ici=(1, -1, 1), dcn=(-1, 1, 1))), devices)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]
  batch = jax.ShapeDtypeStruct((16, 8), jnp.float32,
                               sharding=sharding_lib.data_sharding(mesh, sharding_lib.DEFAULT_RULES,
                                                                   2))
  jax.jit(lambda x: jnp.mean(x ** 2)).lower(batch).compile()


def test_distributed_initialize_reads_flags_and_environment():
  """Single-process environments do not initialise; bad values are one-line errors naming the
  flag or variable (checked before anything starts)."""
  assert distributed.initialize('auto', env={}) is False
  assert distributed.initialize('auto', env={'SLURM_NTASKS': '1'}) is False
  assert distributed.initialize('off', env={'SLURM_NTASKS': '4'}) is False
  cases = [(dict(coordinator='127.0.0.1'), 'must be host:port'),
           (dict(coordinator='127.0.0.1:1', num_processes=2, process_id=2), 'process_id=2'),
           (dict(env={'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': 'two'}),
            'JAX_NUM_PROCESSES'),
           (dict(heartbeat_timeout_s=0), 'heartbeat_timeout=0'),
           (dict(mode='sometimes'), "distributed='sometimes'")]
  for kwargs, match in cases:
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=match):
      distributed.initialize(kwargs.pop('mode', 'auto'), **{'env': {}, **kwargs})


if __name__ == '__main__':
  sys.exit(pytest.main([__file__]))
