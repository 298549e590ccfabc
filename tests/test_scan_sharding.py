"""The sharding-layout scanner on the tiny flow config for v5e:2x2 (AOT through libtpu).

  1. `scan_layouts` over two layouts that compile and one whose mesh does not divide the 4 chips:
     compiled rows have positive per-chip memory and fit 16 GiB, rows are sorted by estimate, the
     bad mesh is an error row (last) naming the device counts; `format_table` has a line per row.
  2. Layout strings parse (and bad ones raise with the culprit); default layouts divide the chips.
  3. `launch.scan_sharding` as a subprocess (JAX_PLATFORMS=cpu) writes the markdown table; an
     unknown chip or a bad layout string is a one-line error.
Skipped (with libtpu's error text) only when libtpu cannot be loaded or initialised.
"""

import math
import os
import subprocess
import sys

import pytest

from configs.digits import flow as flow_config
from rewarddance_jax.parallel import aot
from rewarddance_jax.scan import layouts as scanner

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.filterwarnings('ignore:Error reading persistent compilation cache entry'),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = 'v5e:2x2'


@pytest.fixture(autouse=True)
def _require_libtpu():
  if not aot.libtpu_available():
    pytest.skip(f'libtpu cannot be loaded/initialised: {aot.libtpu_unavailable_reason()}')


@pytest.fixture(scope='module')
def rows():
  # One real compile (~20 s on 2 cores) and one layout that cannot be built; the unscanned,
  # un-rematted step is compiled for the same topology in test_aot_tpu.py.
  layouts = [{'mesh': (3, 1, 1)},
             {'mesh': (1, -1, 1), 'remat': 'full', 'scan_layers': True}]
  return scanner.scan_layouts(flow_config.get_config('runlocal'), TOPOLOGY, layouts)


def test_rows_memory_fits_and_order(rows):
  assert len(rows) == 2
  ok = [r for r in rows if r['error'] is None]
  assert {r['layout'] for r in ok} == {'1,-1,1:full:scan'}
  for r in ok:
    # The tiny step may keep all its temporaries on chip: libtpu then reports temp 0.
    assert r['argument_gib'] > 0 and r['temp_gib'] >= 0 and r['total_gib'] > r['argument_gib']
    assert r['fits'] and r['hbm_gib'] == 16.0 and r['num_devices'] == 4
    assert r['model_flops'] > 0 and r['bytes_accessed'] > 0 and r['flops'] > 0
    assert 0 < r['estimate_ms'] < math.inf
  estimates = [r['estimate_ms'] for r in rows]
  assert estimates == sorted(estimates)


def test_bad_mesh_is_an_error_row(rows):
  bad = rows[-1]
  assert bad['layout'] == '3,1,1:none:noscan'
  assert bad['error'].startswith('ValueError:') and '4' in bad['error']
  assert '\n' not in bad['error'] and not bad['fits']


def test_a_layout_whose_resident_state_cannot_be_sharded_is_an_error_row(monkeypatch):
  # E.g. tensor = 4 on a 151674-token vocabulary: the step compiles, sharding its resident
  # state raises. The scan must keep going (one error row), not lose the other rows.
  class Step:
    model_flops = 1.0

    def compile_report(self):
      return {}

    @property
    def resident_bytes(self):
      raise ValueError('axis 0 of (151674, 3584) is not divisible by 4')

  monkeypatch.setitem(scanner.STEP_BUILDERS, 'flow', lambda cfg, mesh: Step())
  rows = scanner.scan_layouts(flow_config.get_config('runlocal'), TOPOLOGY,
                           [{'mesh': (1, 1, 4)}])
  assert rows[0]['error'] == 'ValueError: axis 0 of (151674, 3584) is not divisible by 4'
  assert not rows[0]['fits']


def test_format_table_has_a_line_per_row(rows):
  lines = scanner.format_table(rows).splitlines()
  assert len(lines) == 2 + len(rows)
  assert lines[0].startswith('| layout |') and lines[1].startswith('|---|')
  assert lines[-1].startswith('| 3,1,1:none:noscan | error: ValueError')


def test_parse_layouts_and_defaults():
  assert scanner.parse_layouts('1,-1,1:full:scan; 2,2,1:none:noscan') == [
      {'mesh': (1, -1, 1), 'remat': 'full', 'scan_layers': True},
      {'mesh': (2, 2, 1), 'remat': 'none', 'scan_layers': False}]
  for text, match in (('1,-1,1:full', 'expected MESH'), ('a,1,1:none:scan', 'integers'),
                      ('1,-1,1:full:yes', 'scan'), ('1,-1,1:full:scan:bogus', 'unknown step'),
                      ('1,-1,1:full:scan:grpo:bogus', 'unknown rule set')):
    with pytest.raises(ValueError, match=match):
      scanner.parse_layouts(text)
  defaults = scanner.default_layouts(4)
  assert len(defaults) == 16 and all(4 % math.prod(s for s in d['mesh'] if s != -1) == 0
                                     for d in defaults)
  assert len(scanner.default_layouts(3)) == 8  # the meshes with a fixed 2 are dropped
  with pytest.raises(ValueError, match='unknown TPU generation'):
    scanner.chip_specs('v9x:2x2')


def _launch(*args):
  # This process already holds libtpu (the in-process scans); without the flag, libtpu's
  # multi-process lockfile makes the child's compiler fail to initialise.
  env = dict(os.environ, JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  return subprocess.run([sys.executable, '-m', 'launch.scan_sharding',
                         '--config=configs/digits/flow.py:runlocal', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _last_line(text):
  return [l for l in text.strip().splitlines() if l.strip()][-1]


def test_launcher_writes_table(tmp_path):
  out_file = tmp_path / 'scan.md'
  # A layout that fails to build keeps this subprocess free of a 20 s compile; the compiled
  # rows' contents are checked in-process above.
  out = _launch(f'--topology={TOPOLOGY}', '--layouts=3,1,1:none:noscan', f'--out={out_file}')
  assert out.returncode == 0, out.stderr[-2000:]
  text = out_file.read_text()
  assert text.startswith('# Sharding scan: v5e:2x2')
  table = [l for l in text.splitlines() if l.startswith('|')]
  assert len(table) == 3 and table[2].startswith('| 3,1,1:none:noscan |')
  assert 'ValueError' in table[2]
  assert table[2] in out.stdout


def test_launcher_one_line_errors():
  out = _launch('--topology=v9x:2x2')
  assert out.returncode != 0
  assert _last_line(out.stderr).startswith("error: topology 'v9x:2x2': unknown TPU generation")
  out = _launch(f'--topology={TOPOLOGY}', '--layouts=1,-1,1:full')
  assert out.returncode != 0
  assert _last_line(out.stderr).startswith("error: layout '1,-1,1:full': expected MESH")
