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


@pytest.fixture
def fast_compiles():
  """XLA CPU optimisation passes dominate the compile time of tiny models; skipping them leaves
  the math unchanged (tests compare with tolerances). Use: pytestmark =
  pytest.mark.usefixtures('fast_compiles')."""
  old = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', old)
