"""config_lib.section: a config section becomes a frozen dataclass, or one line names the culprit."""

import dataclasses

import pytest

from rewarddance_jax import config_lib


@dataclasses.dataclass(frozen=True)
class Inner:
  n: int = 1
  x: float = 0.5
  o: float | None = None

  RANGES = {'n': '[1, inf)', 'x': '[0, 1)', 'o': '(0, 2]'}


@dataclasses.dataclass(frozen=True)
class Outer:
  need: str
  inner: Inner = Inner()
  sizes: tuple[int, ...] = (1,)


def test_section_builds_nested_dataclasses_and_tuples():
  out = config_lib.section(Outer, {'need': 'a', 'inner': {'n': 3, 'x': 0, 'o': 2},
                                   'sizes': [4, 5]}, 'config.s')
  assert out == Outer(need='a', inner=Inner(n=3, x=0.0, o=2.0), sizes=(4, 5))
  assert isinstance(out.inner.x, float) and isinstance(out.sizes, tuple)
  assert config_lib.section(Outer, None, 'config.s', need='b') == Outer(need='b')


@pytest.mark.parametrize('cfg, message', [
    ({'inner': {'n': 0}}, 'config.s.inner.n=0 must be an integer in [1, inf).'),
    ({'inner': {'n': 1.5}}, 'config.s.inner.n=1.5 must be an integer in [1, inf).'),
    ({'inner': {'n': True}}, 'config.s.inner.n=True must be an integer in [1, inf).'),
    ({'inner': {'x': 1.0}}, 'config.s.inner.x=1.0 must be a number in [0, 1).'),
    ({'inner': {'x': float('nan')}}, 'config.s.inner.x=nan must be a number in [0, 1).'),
    ({'inner': {'x': 'big'}}, "config.s.inner.x='big' must be a number in [0, 1)."),
    ({'inner': {'o': 0}}, 'config.s.inner.o=0 must be a number in (0, 2].'),
    ({'bogus': 1}, "config.s has unknown key(s) ['bogus']; allowed: ['inner', 'need', 'sizes']."),
    ({'inner': {'m': 1}}, "config.s.inner has unknown key(s) ['m']; allowed: ['n', 'o', 'x']."),
])
def test_section_errors_are_one_line_naming_the_key(cfg, message):
  with pytest.raises(ValueError) as excinfo:
    config_lib.section(Outer, {'need': 'a', **cfg}, 'config.s')
  assert str(excinfo.value) == message


def test_a_missing_required_key_is_named():
  with pytest.raises(ValueError, match=r"^config.s is missing key\(s\) \['need'\]\.$"):
    config_lib.section(Outer, {}, 'config.s')


def test_every_declared_range_names_a_numeric_field_and_parses():
  import importlib  # pylint: disable=import-outside-toplevel
  import pkgutil  # pylint: disable=import-outside-toplevel
  import typing  # pylint: disable=import-outside-toplevel
  import rewarddance_jax  # pylint: disable=import-outside-toplevel
  seen = 0
  for info in pkgutil.walk_packages(rewarddance_jax.__path__, 'rewarddance_jax.'):
    module = importlib.import_module(info.name)
    for cls in vars(module).values():
      if (isinstance(cls, type) and dataclasses.is_dataclass(cls) and 'RANGES' in vars(cls)
          and cls.__module__ == info.name):
        hints = typing.get_type_hints(cls)
        for key, spec in cls.RANGES.items():
          assert config_lib._numeric_kind(hints[key]) is not None, (cls, key)  # pylint: disable=protected-access
          lo, hi, _, _ = config_lib._interval(spec)  # pylint: disable=protected-access
          assert lo < hi, (cls, key)
        seen += 1
  assert seen >= 15


@pytest.mark.parametrize('key, value, match', [
    ('data.batch_size', -5, r'config.data.batch_size=-5 must be an integer in \[1, inf\)'),
    ('sampler.num_steps', 0, r'config.sampler.num_steps=0 must be an integer'),
    ('sampler.shift', 0.0, r'config.sampler.shift=0.0 must be a number in \(0, inf\)'),
    ('samples.per_class', -1, r'config.samples.per_class=-1 must be an integer'),
    ('seed', -1, r'config.seed=-1 must be an integer in \[0, inf\)'),
])
def test_plain_sections_are_range_checked(key, value, match):
  from configs.digits import grpo as grpo_config  # pylint: disable=import-outside-toplevel
  c = grpo_config.get_config('runlocal')
  sec, _, k = key.rpartition('.')
  (c[sec] if sec else c)[k] = value
  with pytest.raises(ValueError, match=match):
    config_lib.check_plain_sections(c)
  config_lib.check_plain_sections(grpo_config.get_config('runlocal'))   # the defaults pass
