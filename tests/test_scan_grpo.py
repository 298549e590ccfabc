"""The scanner's 'grpo' and 'reward' steps, the VLM presets and the layout notebook.

  1. The whole GRPO iteration of the tiny digits config (`configs/digits/grpo.py:runlocal`)
     AOT-compiles for v5e:2x2: positive per-chip memory that fits 16 GiB, and its analytic
     FLOPs equal rollout 2·P·S·B·N + update 6·P·S·B·T counted by hand from the config.
  2. The abstract VLM reward (InternVL 'tiny' preset + a small VAE) builds from shapes only
     (no array is materialised) and its reward step compiles; FLOPs per sample match the
     formula on its parameter counts.
  3. The InternVL3 presets have the public parameter counts (2.09B and 7.94B), from shapes.
  4. A rule-set layout parses and relabels; `notebooks/scan_layouts.ipynb` runs under nbclient
     and shows a table row per layout.
Skipped (with libtpu's error text) only when libtpu cannot be loaded or initialised.
"""

import dataclasses
import math
import os

import jax
import pytest
from flax import nnx

from configs.digits import grpo as grpo_config
from rewarddance_jax.models.generator import Generator, generator_config
from rewarddance_jax.models.vlm import InternVL, vlm_config, vlm_preset
from rewarddance_jax.parallel import aot
from rewarddance_jax.parallel import sharding as sharding_lib
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


def _cpu_mesh():
  return jax.make_mesh((1, 1, 1), ('data', 'fsdp', 'tensor'))


def _num_params(factory):
  _, (state,) = sharding_lib.abstract_state(factory, _cpu_mesh(), sharding_lib.DEFAULT_RULES)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(state)))


def test_grpo_step_compiles_with_hand_counted_flops():
  config = grpo_config.get_config('runlocal')
  rows = scanner.scan_layouts(config, TOPOLOGY, [{'mesh': (1, -1, 1), 'step': 'grpo'}])
  (row,) = rows
  assert row['error'] is None, row['error']
  assert row['layout'] == '1,-1,1:none:noscan:grpo' and row['num_devices'] == 4
  assert row['argument_gib'] > 0 and row['temp_gib'] > 0 and row['fits']
  assert row['flops'] > 0 and row['bytes_accessed'] > 0
  p = _num_params(lambda: Generator(generator_config(config.model), rngs=nnx.Rngs(0)))
  b, n, g = config.data.batch_size, config.grpo.num_steps, config.grpo
  t = int((n - 1) * g.selection.fraction)
  s = (16 // config.model.patch_size) ** 2 + config.data.max_text_len
  want = (2 * p * s * b * n + 6 * p * s * b * t) / 4
  assert row['model_flops'] == pytest.approx(want)


def _vlm_reward_config():
  config = grpo_config.get_config('runlocal')
  config.data.latent_shape = (8, 8, 4)
  config.scan = dict(reward=dict(
      vlm=vlm_preset('tiny'), vae='flux', vae_dtype='float32', max_len=12, yes_id=1,
      no_id=2))
  # A 2-level VAE with 4 latent channels keeps the decode small.
  return config


def test_vlm_reward_step_from_shapes(monkeypatch):
  from rewarddance_jax.models import vae as vae_lib  # pylint: disable=import-outside-toplevel
  small = vae_lib.VAEConfig(latent_channels=4, block_out_channels=(32, 32), layers_per_block=1)
  monkeypatch.setitem(vae_lib.VAE_PRESETS, 'flux', small)
  config = _vlm_reward_config()
  (row,) = scanner.scan_layouts(config, TOPOLOGY, [{'mesh': (2, 2, 1), 'step': 'reward'}])
  assert row['error'] is None, row['error']
  assert row['fits'] and row['argument_gib'] > 0
  vcfg = vlm_config(vlm_preset('tiny'))
  _, (state,) = sharding_lib.abstract_state(lambda: InternVL(vcfg, rngs=nnx.Rngs(0)),
                                            _cpu_mesh(), sharding_lib.DEFAULT_RULES)
  tree = nnx.to_pure_dict(state)
  size = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))  # pylint: disable=unnecessary-lambda-assignment
  lm_layers = size(tree['lm']) - size(tree['lm']['embed'])
  head = size(tree['lm']['embed'])  # tied embeddings: the head is the embedding
  grid = vcfg.vision.grid
  per_sample = 2 * (size(tree['vision']) * (grid * grid + 1)
                    + size(tree['projector']) * vcfg.tokens_per_tile + lm_layers * 12 + head)
  assert row['model_flops'] == pytest.approx(per_sample * config.data.batch_size / 4)


@pytest.mark.parametrize('name,billions', [('internvl3-2b', 2.089), ('internvl3-8b', 7.944)])
def test_internvl3_presets_match_public_sizes(name, billions):
  # Scanned layers hold the same arrays stacked; the shape pass is then one layer per stack
  # (0.5 s instead of 18 s for 2B).
  cfg = dataclasses.replace(vlm_config(vlm_preset(name)), scan_layers=True)
  n = _num_params(lambda: InternVL(cfg, rngs=nnx.Rngs(0)))
  assert n / 1e9 == pytest.approx(billions, abs=0.002)


def test_rule_set_layouts_parse_and_apply():
  (layout,) = scanner.parse_layouts('2,-1,1:full:scan:grpo:fsdp_all')
  assert layout == {'mesh': (2, -1, 1), 'remat': 'full', 'scan_layers': True, 'step': 'grpo',
                    'rules': 'fsdp_all'}
  assert scanner.layout_label(layout) == '2,-1,1:full:scan:grpo:fsdp_all'
  cfg = scanner._apply_layout(grpo_config.get_config('runlocal'), layout)  # pylint: disable=protected-access
  rules = dict(sharding_lib.rules_from_config(cfg.sharding_rules))
  assert rules['embed'] == ('fsdp', 'data') and rules['mlp'] == 'tensor'
  assert cfg.model.remat == 'full' and cfg.model.scan_layers


def test_notebook_runs(monkeypatch):
  nbclient = pytest.importorskip('nbclient')
  nbformat = pytest.importorskip('nbformat')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # this process may hold libtpu already
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', 'scan_layouts.ipynb'), as_version=4)
  nbclient.NotebookClient(nb, timeout=120, kernel_name='python3',
                          resources={'metadata': {'path': ROOT}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs]
  tables = [o['data']['text/markdown'] for o in outputs
            if o.get('output_type') == 'display_data' and 'text/markdown' in o.get('data', {})]
  assert len(tables) == 1
  lines = [l for l in tables[0].splitlines() if l.startswith('|')]
  assert len(lines) == 2 + 4
  assert lines[-1].startswith('| 3,1,1:none:noscan:reward | error: ValueError')
  assert sum(' yes ' in l for l in lines[2:]) == 3
  text = ''.join(o.get('text', '') for o in outputs if o.get('output_type') == 'stream')
  assert 'fastest layout:' in text
