"""The layers of the library hold: `lint-imports` keeps every contract of .importlinter (the
repository root), function-level imports included; no module uses another module's private name."""

import ast
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('rewarddance_jax', 'launch')


def _lint_imports() -> str:
  exe = os.path.join(os.path.dirname(sys.executable), 'lint-imports')
  if not os.path.isfile(exe):
    exe = shutil.which('lint-imports')
  assert exe, 'lint-imports not found: install the test extra (pip install -e ".[test]").'
  return exe


def test_import_contracts_are_kept():
  # This checkout's packages first (an editable install may point at another one).
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  cmd = [_lint_imports(), '--no-cache', '--config', os.path.join(ROOT, '.importlinter')]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode == 0, f'import contracts broken:\n{out.stdout}\n{out.stderr}'


def _is_module(dotted: str) -> bool:
  path = os.path.join(ROOT, *dotted.split('.'))
  return os.path.isdir(path) or os.path.isfile(path + '.py')


def _private(name: str) -> bool:
  return name.startswith('_') and not name.startswith('__')


def _private_uses(path: str, module: str) -> list[str]:
  """`from m import _x` and `m._x` in the file at `path` where `m` is another module of ours."""
  tree = ast.parse(open(path, encoding='utf-8').read(), path)
  ours, found = {}, []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split('.')[0] in PACKAGES and a.asname:
          ours[a.asname] = a.name
    elif isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] in PACKAGES:
      for a in node.names:
        if _private(a.name):
          found.append(f'{path}:{node.lineno}: from {node.module} import {a.name}')
        elif _is_module(f'{node.module}.{a.name}'):
          ours[a.asname or a.name] = f'{node.module}.{a.name}'
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in ours and ours[node.value.id] != module and _private(node.attr)):
      found.append(f'{path}:{node.lineno}: {node.value.id}.{node.attr}')
  return found


def test_no_private_name_is_used_across_modules():
  found = []
  for package in PACKAGES:
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
      for f in sorted(files):
        if f.endswith('.py'):
          path = os.path.join(dirpath, f)
          module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
          found += _private_uses(path, module.removesuffix('.__init__'))
  assert not found, 'private names used across modules:\n' + '\n'.join(found)
