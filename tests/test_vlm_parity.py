"""InternVL parity with transformers on a tiny random config (2 vision + 2 language layers, GQA,
qk-norm, several tiles per image), through the safetensors importer (single file and shards)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rewarddance_jax.models.vlm import InternVL, check_placeholders
from rewarddance_jax.models.vlm import preprocess
from rewarddance_jax.weights import internvl as importer

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

IMAGE_TOKEN = 99
TILES = 3


def _hf_model(tie: bool):
  cfg = transformers.InternVLConfig(
      vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, image_size=28, patch_size=7, attention_bias=True,
                         use_qk_norm=True, layer_scale_init_value=0.5),
      text_config=dict(model_type='qwen2', vocab_size=100, hidden_size=48, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, intermediate_size=96,
                       rope_parameters=dict(rope_type='default', rope_theta=1000.0)),
      image_token_id=IMAGE_TOKEN, downsample_ratio=0.5, tie_word_embeddings=tie)
  torch.manual_seed(0)
  model = transformers.InternVLForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # random everything, so zero-initialised cls/pos/λ cannot hide a bug
    for p in model.parameters():
      p.copy_(0.3 * torch.randn_like(p))
  return model


def _inputs(rng):
  per_tile = (28 // 7 // 2) ** 2
  n_img = TILES * per_tile
  ids = rng.integers(0, 90, size=(2, 20))
  ids[:, 3:3 + n_img] = IMAGE_TOKEN
  tiles = rng.normal(size=(2, TILES, 28, 28, 3)).astype(np.float32)
  return ids, tiles, n_img


def _ours(directory, ids, tiles, **overrides):
  cfg, params = importer.load_internvl(directory, **overrides)
  with nnx.use_eager_sharding(False):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: InternVL(cfg, rngs=nnx.Rngs(0))))
  model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
  return np.asarray(jax.jit(lambda m, i, t: m(i, t))(model, jnp.asarray(ids), jnp.asarray(tiles)))


@pytest.mark.parametrize('tie,scan,shards', [(True, False, False), (False, True, True)])
def test_logits_match_transformers(tmp_path, tie, scan, shards):
  model = _hf_model(tie)
  ids, tiles, n_img = _inputs(np.random.default_rng(0))
  check_placeholders(ids, IMAGE_TOKEN, n_img)
  with torch.no_grad():
    pix = torch.from_numpy(tiles.reshape(-1, 28, 28, 3).transpose(0, 3, 1, 2).copy())
    want = model(input_ids=torch.from_numpy(ids), pixel_values=pix).logits.numpy()
  model.save_pretrained(tmp_path, max_shard_size='20KB' if shards else '1GB')
  assert os.path.isfile(tmp_path / importer.INDEX_FILE) == shards
  got = _ours(str(tmp_path), ids, tiles, scan_layers=scan)
  assert got.shape == want.shape
  np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)


def test_import_errors_list_every_bad_key(tmp_path):
  from safetensors.numpy import save_file
  model = _hf_model(tie=False)
  model.save_pretrained(tmp_path)
  tensors = importer.read_safetensors(str(tmp_path))
  tensors['model.extra.weight'] = np.zeros(3, np.float32)
  del tensors['language_model.model.norm.weight']   # the on-disk (hub) layout
  tensors['lm_head.weight'] = np.zeros((100, 47), np.float32)
  os.remove(tmp_path / importer.SINGLE_FILE)
  save_file(tensors, str(tmp_path / importer.SINGLE_FILE))
  with pytest.raises(ValueError) as err:
    importer.load_internvl(str(tmp_path))
  msg = str(err.value)
  assert 'model.extra.weight' in msg and 'model.language_model.norm.weight' in msg
  assert 'lm_head.weight (100, 47)' in msg


def test_dynamic_tiling_grid_matches_transformers():
  from transformers.models.got_ocr2 import image_processing_pil_got_ocr2 as got
  for h, w in [(16, 16), (28, 60), (100, 30), (56, 28), (20, 90)]:
    for lo, hi in [(1, 6), (1, 12), (2, 4)]:
      cols, rows = got.get_optimal_tiled_canvas((h, w), (28, 28), lo, hi)
      assert preprocess.best_grid(h, w, 28, lo, hi) == (cols, rows), (h, w, lo, hi)
  x = jnp.linspace(0, 1, 2 * 28 * 56).reshape(2, 28, 56, 1)
  tiles = preprocess.make_tiles(x, 28, max_tiles=4)
  assert tiles.shape == (2, 3, 28, 28, 3)        # 2x1 grid + thumbnail
  np.testing.assert_allclose(tiles[:, 1, :, :, 0] * 0.229 + 0.485, x[:, :, 28:, 0], atol=1e-6)


def _save_tokenizer(directory):
  """A word-level tokenizer.json over the tiny model's 100 ids, with the InternVL image markers,
  answer words and a chat template (tokenizer_config.json), as a checkpoint directory holds."""
  import tokenizers
  words = ['<unk>', 'yes', 'no', 'Yes', 'No', '<img>', '</img>', 'a', 'cat', 'dog', 'image']
  vocab = {w: i for i, w in enumerate(words)}
  vocab['<IMG_CONTEXT>'] = IMAGE_TOKEN
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(['<img>', '</img>', '<IMG_CONTEXT>'])
  tok.save(os.path.join(directory, 'tokenizer.json'))
  template = ("{% for m in messages %}user {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant {% endif %}")
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump({'chat_template': template}, f)


def test_pretrained_internvl_reward_matches_transformers(tmp_path):
  # A transformers InternVL directory loads as a P("yes") reward as it is; its reward equals
  # σ(logsumexp(l_yes, l_Yes) − logsumexp(l_no, l_No)) of transformers' logits at the answer
  # position, for the same prompt ids and tiles.
  from rewarddance_jax.rewards import vlm_export
  model = _hf_model(tie=False)
  model.save_pretrained(tmp_path)
  _save_tokenizer(str(tmp_path))
  prompts = ['a cat', 'a dog']
  reward = vlm_export.load_vlm_reward(str(tmp_path), 'pointwise', 'two_way', prompts=prompts,
                                      index_key='ids')
  pixels = np.random.default_rng(1).uniform(size=(3, 28, 28, 3)).astype(np.float32)
  ids_of_rows = np.array([1, 0, 1], np.int32)
  got = np.asarray(jax.jit(lambda p: reward({'pixels': p}, {'ids': jnp.asarray(ids_of_rows)}))(
      jnp.asarray(pixels)))

  _, _, _, tok, prompters, tile_spec = vlm_export.load_vlm_parts(str(tmp_path))
  prompter = prompters['pointwise']
  assert prompter.chat_template and (prompter.image_start, prompter.image_end) == ('<img>', '</img>')
  enc = prompter.encode([prompts[i] for i in ids_of_rows])
  tiles = np.asarray(tile_spec(jnp.asarray(pixels)))                  # (3, 1, 28, 28, 3)
  with torch.no_grad():
    pix = torch.from_numpy(tiles.reshape(-1, 28, 28, 3).transpose(0, 3, 1, 2).copy())
    logits = model(input_ids=torch.from_numpy(enc['ids'].astype(np.int64)),
                   pixel_values=pix).logits.numpy()
  at = logits[np.arange(3), enc['pos']].astype(np.float64)
  lse = lambda ids: np.log(np.sum(np.exp(at[:, ids]), axis=1))  # noqa: E731
  want = 1 / (1 + np.exp(-(lse([1, 3]) - lse([2, 4]))))
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert 0 < got.min() and got.max() < 1 and abs(got[0] - got[1]) > 1e-4


def test_reward_params_are_sharded_by_the_rules_and_score_the_same(tmp_path):
  from rewarddance_jax.parallel import mesh as mesh_lib
  from rewarddance_jax.parallel.sharding import DEFAULT_RULES
  from rewarddance_jax.rewards import registry
  import ml_collections
  _hf_model(tie=False).save_pretrained(tmp_path)
  _save_tokenizer(str(tmp_path))
  cfg = {'v': dict(kind='vlm_yes', path=str(tmp_path))}     # the ten digit prompts, by label
  mesh = mesh_lib.create_mesh(ml_collections.ConfigDict({'ici': (1, 4, 1)}), jax.devices()[:4])
  host = registry.build_rewards(cfg)
  placed = registry.build_rewards(cfg, mesh, DEFAULT_RULES)
  leaves = jax.tree.leaves(placed.rewards[0].params['model'])
  assert all(isinstance(x, jax.Array) for x in leaves)
  assert any(not x.sharding.is_fully_replicated for x in leaves)     # weights split on fsdp
  pixels = jnp.asarray(np.random.default_rng(2).uniform(size=(4, 28, 28, 3)), jnp.float32)
  batch = {'labels': jnp.asarray([0, 3, 7, 9], jnp.int32)}
  score = jax.jit(lambda r: r.total({'pixels': pixels}, batch, jax.random.key(0)))
  np.testing.assert_allclose(np.asarray(score(placed)), np.asarray(score(host)), atol=1e-5)
