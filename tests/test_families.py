"""Generator families: the table, the config keys they read, the guided velocity (hand-computed
CFG and distilled guidance on a stand-in model), and one-line errors for bad input."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.digits import grpo as grpo_config
from rewarddance_jax import families
from rewarddance_jax.data import tokenizer as tokenizer_lib
from rewarddance_jax.families import base


class _Linear:
  """A stand-in generator: v = a·x + b·mean(txt) (+ g when a guidance scalar comes)."""

  def __call__(self, x, sigma, cond, guidance=None):
    del sigma
    v = 2.0 * x + jnp.mean(cond['txt'], axis=(1, 2))[:, None, None, None]
    return v if guidance is None else v + guidance[:, None, None, None]


def _velocity(guidance, monkeypatch):
  monkeypatch.setattr(base.nnx, 'merge', lambda graphdef, params: _Linear())
  return base.guided_velocity(None, guidance)


def test_cfg_is_the_guided_combination(monkeypatch):
  x = jnp.ones((2, 2, 2, 1))
  cond = {'txt': jnp.full((2, 3, 4), 1.0), 'neg_txt': jnp.full((2, 3, 4), -1.0)}
  v = _velocity(base.Guidance('cfg', 4.0), monkeypatch)(None, x, jnp.ones((2,)), cond)
  # v_c = 2 + 1 = 3, v_u = 2 − 1 = 1: v_u + 4·(v_c − v_u) = 9
  np.testing.assert_allclose(v, 9.0)


def test_distilled_guidance_feeds_the_scale(monkeypatch):
  x = jnp.zeros((2, 2, 2, 1))
  v = _velocity(base.Guidance('distilled', 3.5), monkeypatch)(
      None, x, jnp.ones((2,)), {'txt': jnp.zeros((2, 3, 4))})
  np.testing.assert_allclose(v, 3.5)


def test_cfg_without_the_negative_prompt_is_named(monkeypatch):
  fn = _velocity(base.Guidance('cfg', 2.0), monkeypatch)
  with pytest.raises(ValueError, match='neg_txt'):
    fn(None, jnp.ones((1, 2, 2, 1)), jnp.ones((1,)), {'txt': jnp.ones((1, 3, 4))})


def _digits(**top):
  c = grpo_config.get_config('runlocal')
  for k, v in top.items():
    c[k] = v
  return c


def test_defaults_and_table():
  assert sorted(families.FAMILIES) == ['digits', 'flux', 'sd3']
  fam = families.from_config(_digits())
  assert (fam.name, fam.conditioning, fam.guidance.kind) == ('digits', 'tokens', 'none')
  assert fam.latent_shape == (16, 16, 1)
  assert families.get('sd3').default_guidance == base.Guidance('cfg', 4.5)


@pytest.mark.parametrize('top, match', [
    (dict(family='sdxl'), r"config.family='sdxl' is not one of"),
    (dict(guidance=dict(kind='distilled', scale=3.5)), 'family digits takes'),
    (dict(guidance=dict(kind='cfg', scale=-1.0)), r'config.guidance.scale=-1.0'),
    (dict(guidance=dict(kind='cfg', scale=2.0, weight=1.0)), r"config.guidance has unknown"),
    (dict(vae=dict(src='x', tile=2)), r"config.vae has unknown key\(s\) \['tile'\]"),
])
def test_bad_family_config_is_one_line(top, match):
  with pytest.raises(ValueError, match=match):
    families.from_config(_digits(**top))


def test_weights_for_a_family_without_a_loader_and_missing_latent_shape():
  c = _digits()
  c.init = ml_collections.ConfigDict(dict(generator='', weights=dict(src='/models/x')))
  with pytest.raises(ValueError, match='no public-weights loader'):
    families.from_config(c)
  c = _digits(family='flux')
  with pytest.raises(ValueError, match='config.data.latent_shape'):
    _ = families.from_config(c).latent_shape


def test_cfg_negative_rows_repeat_for_token_conditioning():
  c = _digits(guidance=dict(kind='cfg', scale=2.0, negative=''))
  fam = families.from_config(c)
  cond = {'tokens': np.ones((3, int(c.data.max_text_len)), np.int32),
          'mask': np.ones((3, int(c.data.max_text_len)), bool)}
  out = fam.with_negative(cond)
  ids, mask = tokenizer_lib.encode_prompts(fam.tokenizer(None), [''], int(c.data.max_text_len))
  np.testing.assert_array_equal(out['neg_tokens'], np.repeat(ids, 3, 0))
  np.testing.assert_array_equal(out['neg_mask'], np.repeat(mask, 3, 0))
  assert mask.sum() < mask.size   # the empty prompt: only its start / end tokens
