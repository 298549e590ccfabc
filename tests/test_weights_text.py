"""T5 v1.1 encoder and CLIP text model: transformers parity, and FLUX prompt encoding from a local
tokenizer directory."""

import logging

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from rewarddance_jax.data import prompts as prompts_lib  # noqa: E402
from rewarddance_jax.models import prompt_encoder  # noqa: E402
from rewarddance_jax.parallel.sharding import DEFAULT_RULES  # noqa: E402
from rewarddance_jax.weights import text as text_weights  # noqa: E402
from rewarddance_jax.weights import text_pipeline  # noqa: E402
import weights_testlib as testlib  # noqa: E402
from weights_testlib import O0, run_o0  # noqa: E402

VOCAB = 64


def _randomise(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if ('norm' in name and name.endswith('weight')) else 0.0
      p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def _tiny_t5(path, vocab=VOCAB):
  cfg = transformers.T5Config(vocab_size=vocab, d_model=80, d_kv=8, d_ff=48, num_layers=2,
                              num_heads=4, feed_forward_proj='gated-gelu',
                              relative_attention_num_buckets=8, relative_attention_max_distance=20)
  model = transformers.T5EncoderModel(cfg).eval()
  _randomise(model, 0)
  model.save_pretrained(path)
  return model


def _tiny_clip(path, projection: bool, eos: int = VOCAB - 1):
  cfg = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=16, eos_token_id=eos,
                                    projection_dim=12, hidden_act='quick_gelu')
  cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
  model = cls(cfg).eval()
  _randomise(model, 1)
  model.save_pretrained(path)
  return model


def _ids(b, length, seed):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, VOCAB - 1, (b, length)).astype(np.int64)
  lengths = np.array([length, length - 3, 5])[:b]
  mask = np.arange(length)[None] < lengths[:, None]
  ids[np.arange(b), lengths - 1] = VOCAB - 1           # EOS (CLIP pools here)
  ids[~mask] = 0
  return ids, mask


def _save_word_tokenizer(path):
  """A word-level tokenizer that appends </s> (id 1) as T5's and CLIP's do."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  words = ['<pad>', '</s>', 'a', 'photo', 'of', 'cat', 'dog', 'red', 'blue', 'the']
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='</s>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single='$A </s>',
                                                     special_tokens=[('</s>', 1)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>',
                                              eos_token='</s>')
  fast.save_pretrained(path)


def test_t5_and_clip_match_transformers(tmp_path):
  """SD3 prompt encoding (masked T5, CLIP-with-projection penultimate states and text_embeds),
  then unmasked T5 + CLIPTextModel through the FLUX prompt encoder fed by a local AutoTokenizer."""
  mesh = testlib.mesh((1, 2, 1))
  t5_ref = _tiny_t5(tmp_path / 't5')
  clip_ref = _tiny_clip(tmp_path / 'clip', projection=True)
  t5_g, t5_p, t5_cfg = text_weights.load_t5(str(tmp_path / 't5'), mesh, DEFAULT_RULES)
  clip_g, clip_p, clip_cfg = text_weights.load_clip(str(tmp_path / 'clip'), mesh, DEFAULT_RULES)
  assert clip_cfg.projection_dim == 12 and t5_cfg.num_layers == 2

  ids, mask = _ids(3, 12, 0)
  # SD3 recipe (the same CLIP serves as CLIP-L and CLIP-G here), T5 with its padding mask.
  encode_sd3 = prompt_encoder.make_sd3_encoder(t5_g, clip_g, clip_g, mask_text=True)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
    cond = run_o0(encode_sd3, t5_p, clip_p, clip_p, ids, mask, ids, ids)
  ti, tm = torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))
  with torch.no_grad():
    ref = t5_ref(input_ids=ti, attention_mask=tm).last_hidden_state.numpy()
    c = clip_ref(input_ids=ti, output_hidden_states=True)
  assert np.abs(ref).max() > 0.1
  assert cond['txt'].shape == (3, 12 + 12, 80) and cond['pooled'].shape == (3, 24)
  np.testing.assert_array_equal(cond['mask'][:, 12:], mask)
  valid = mask[..., None]
  # Padded query rows differ by convention only (their outputs are never used): compare tokens.
  np.testing.assert_allclose(np.where(valid, cond['txt'][:, 12:], 0), np.where(valid, ref, 0),
                             atol=1e-4)
  pen = c.hidden_states[-2].numpy()
  np.testing.assert_allclose(cond['txt'][:, :12, :64], np.concatenate([pen, pen], -1), atol=1e-4)
  assert not np.any(cond['txt'][:, :12, 64:])            # zero-padded to the T5 width
  emb = c.text_embeds.numpy()
  np.testing.assert_allclose(cond['pooled'], np.concatenate([emb, emb], -1), atol=1e-4)

  # FLUX recipe from a pipeline directory (CLIPTextModel, which transformers 5 saves without the
  # text_model. prefix; unmasked T5), pre-encoded to disk by launch.encode_prompts and read back.
  root = tmp_path / 'pipe'
  clip2_ref = _tiny_clip(root / 'text_encoder', projection=False, eos=1)
  t5_ref.save_pretrained(root / 'text_encoder_2')
  for sub in ('tokenizer', 'tokenizer_2'):
    _save_word_tokenizer(root / sub)
  enc = text_pipeline.PipelineTextEncoder('flux', str(root), mesh, DEFAULT_RULES, t5_len=10,
                                          clip_len=8)
  prompts = ['a photo of a cat', 'the red dog', 'a blue cat']
  with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):   # batches of 2: compile at O0
    enc.encode = enc.encode.lower(*enc.inputs(prompts[:2])).compile(compiler_options=O0)
  (tmp_path / 'p.jsonl').write_text(''.join(f'{{"prompt": "{p}"}}\n' for p in prompts))
  records = prompts_lib.load_prompt_file(str(tmp_path / 'p.jsonl'))
  summary = text_pipeline.encode_records(enc, records, str(tmp_path / 'enc'), batch_size=2)
  assert summary['prompts'] == 3
  stored = text_pipeline.EncodedPrompts(str(tmp_path / 'enc'))
  assert len(stored) == 3 and stored.prompts == prompts
  cond = stored[[2, 0]]
  tok = prompt_encoder.load_tokenizer(str(root / 'tokenizer'))
  t5_ids, t5_mask = prompt_encoder.tokenize(tok, [prompts[2], prompts[0]], 10)
  assert t5_mask.sum(1).tolist() == [4, 6]                 # words + </s>
  clip_ids, _ = prompt_encoder.tokenize(tok, [prompts[2], prompts[0]], 8)
  with torch.no_grad():
    txt = t5_ref(input_ids=torch.from_numpy(t5_ids).long()).last_hidden_state.numpy()
    pooled = clip2_ref(input_ids=torch.from_numpy(clip_ids).long()).pooler_output.numpy()
  assert cond['txt'].shape == (2, 10, 80) and cond['pooled'].shape == (2, 32)
  assert bool(np.all(cond['mask']))
  np.testing.assert_allclose(cond['txt'], txt, atol=1e-4, rtol=0)
  np.testing.assert_allclose(cond['pooled'], pooled, atol=1e-4, rtol=0)


def test_t5_vocab_not_divisible_by_tensor_axis_loads_replicated(tmp_path, caplog):
  """97 tokens on a (1, 2, 2) mesh (vocab -> tensor): the embedding keeps its fsdp split, its
  vocab dimension is replicated with a warning, and the encoder still matches transformers."""
  ref = _tiny_t5(tmp_path, vocab=97)
  mesh = testlib.mesh((1, 2, 2))
  with caplog.at_level(logging.WARNING):
    graphdef, params, _ = text_weights.load_t5(str(tmp_path), mesh, DEFAULT_RULES)
  assert params['embed']['embedding'].sharding.spec == P(None, 'fsdp')
  assert "embed/embedding: dimension 0 (vocab, 97) is not divisible by mesh axis 'tensor'" in (
      caplog.text)
  ids, mask = _ids(2, 12, 3)
  ids[0, 3] = 96                                         # the last, odd row of the table
  with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
    out = run_o0(lambda p, i, m: nnx.merge(graphdef, p)(i, m), params, ids, mask)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids),
               attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state.numpy()
  valid = mask[..., None]
  np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, want, 0), atol=1e-4)
