"""bench/gpu_all.sh refuses the PyTorch-peer parts without PEER, in one line, before any work."""

import os
import pathlib
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'bench' / 'gpu_all.sh'


@pytest.mark.parametrize('peer', [None, 'no/such/peer.py'])
def test_peer_parts_need_a_peer_script(tmp_path, peer):
  env = {k: v for k, v in os.environ.items() if k != 'PEER'}
  env['OUT'] = str(tmp_path / 'out')
  if peer is not None:
    env['PEER'] = peer
  out = subprocess.run(['bash', str(SCRIPT), 'matmul', 'ptrain'], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=30, check=False)
  assert out.returncode == 2 and out.stdout == ''
  assert out.stderr.startswith("error: part 'ptrain' needs PEER=") and out.stderr.count('\n') == 1
  assert not (tmp_path / 'out').exists()   # nothing ran
