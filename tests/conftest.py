"""Test set-up: 8 fake CPU devices, offline hubs, absl flags parsed (grain reads one)."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# With libtpu installed (the `tpu` extra, for the AOT tests) JAX would first try to start a TPU
# backend; the tests run on CPU devices, and AOT topology compilation works without it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Two pytest workers (-n 2) each load libtpu for the AOT tests; without this the second is refused.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Trainers retrace per run (fresh closures) but compile identical HLO: a persistent compilation
# cache turns the repeated compiles of the resume/mesh tests into cache hits.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "rewarddance_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fast_compiles(request):
  """XLA CPU optimisation passes dominate the compile time of tiny models (they halve it, and a
  cold CI run is mostly compiles); skipping them leaves the math unchanged (tests compare with
  tolerances or between two runs compiled alike). Tests that compile for TPU (`tpu_aot`: memory
  and FLOP figures depend on fusion) or need the default pipeline (`xla_optimized`) keep it."""
  if request.node.get_closest_marker('tpu_aot') or request.node.get_closest_marker('xla_optimized'):
    yield
    return
  old = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', old)


@pytest.fixture(autouse=True)
def fresh_step_cache():
  """Trainers keep their jitted step per config (`loop.run`'s `step_key`); a test reuses steps
  of its own earlier runs (resume, re-run) but never one left by another test."""
  from rewarddance_jax.train import loop  # pylint: disable=import-outside-toplevel
  loop.clear_step_cache()
  yield
  loop.clear_step_cache()


@pytest.fixture
def child_jax_env(monkeypatch):
  """Environment for JAX child processes (launcher subprocesses, a notebook kernel): CPU, most
  XLA optimisations off as in-process (`fast_compiles`), and the suite's compile cache, so a
  child compiles what another already did only once. Children cache every compile, however short
  (in-process the threshold is 0.5 s): each new process would otherwise redo the many small
  compiles (eager ops, samplers) of the one before (test_launch: 65 → 57 s)."""
  for name, value in child_env().items():
    monkeypatch.setenv(name, value)


def child_env() -> dict:
  """The variables `child_jax_env` sets, for a fixture of wider scope."""
  return {'JAX_PLATFORMS': 'cpu', 'JAX_DISABLE_MOST_OPTIMIZATIONS': '1',
          'JAX_COMPILATION_CACHE_DIR': jax.config.jax_compilation_cache_dir,
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Tests marked `slow` run first. With `--dist worksteal` (pytest.ini) an idle worker takes
  tests from the end of the other's queue, so the run then ends on short tests instead of one
  worker waiting for the other's last long one."""
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)
