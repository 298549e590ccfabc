"""Scores images with a VLM yes-reward and writes the per-image rewards.

  python -m launch.score --reward=RUN/reward_model --images=SAMPLES.npz
  python -m launch.score --reward=RUN/reward_model --images=DIR_OF_PNGS \
      --prompts="a handwritten digit seven" [--mode=pairwise --ref=REF.npz] \
      [--normalization=full] [--out=rewards.csv]

1. loads the reward saved by the vlm_reward trainer (`rewards/vlm_export.py`);
2. images: a samples .npz (`data/samples.py`: images, labels, prompts) or a folder of PNG/JPEG
   files (sorted by name, converted to [0, 1]); prompts: the npz's own, or `--prompts` = a text
   file with one prompt per line or one literal prompt for every image;
3. pairwise mode needs `--ref` (npz or folder): reference image i pairs with image i (a single
   reference is used for all);
4. scores in batches of `--batch` (one jitted forward pass each), prints `name<TAB>reward` and
   writes the same as CSV (`--out`, default `<images>.rewards.csv`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import flags

from launch import cli

_REWARD = flags.DEFINE_string('reward', None, 'directory of a saved VLM reward (reward_model/).')
_IMAGES = flags.DEFINE_string('images', None, 'samples .npz or a folder of images.')
_PROMPTS = flags.DEFINE_string('prompts', None, 'prompt file (one per line) or one prompt.')
_MODE = flags.DEFINE_enum('mode', 'pointwise', ['pointwise', 'pairwise'], 'reward use.')
_REF = flags.DEFINE_string('ref', None, 'reference images for pairwise (npz or folder).')
_NORM = flags.DEFINE_enum('normalization', 'two_way', ['full', 'two_way'], 'P(yes) form.')
_OUT = flags.DEFINE_string('out', None, 'CSV output path.')
_BATCH = flags.DEFINE_integer('batch', 64, 'images per forward pass.')
flags.mark_flags_as_required(['reward', 'images'])

_IMAGE_EXT = ('.png', '.jpg', '.jpeg', '.bmp')


def load_images(path: str) -> tuple[np.ndarray, list[str], list[str] | None]:
  """(images (N, H, W, C) float32 in [0, 1], names, prompts or None)."""
  if os.path.isdir(path):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    names = sorted(f for f in os.listdir(path) if f.lower().endswith(_IMAGE_EXT))
    if not names:
      raise ValueError(f'{path}: no image files ({", ".join(_IMAGE_EXT)}).')
    arrays = []
    for name in names:
      img = np.asarray(Image.open(os.path.join(path, name)), np.float32) / 255.0
      arrays.append(img[..., None] if img.ndim == 2 else img[..., :3])
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
      raise ValueError(f'{path}: images have different shapes {sorted(shapes)}.')
    return np.stack(arrays), names, None
  from rewarddance_jax.data import samples  # pylint: disable=import-outside-toplevel
  data = samples.load_samples(path)
  n = len(data['images'])
  return data['images'], [f'{os.path.basename(path)}[{i}]' for i in range(n)], [
      str(p) for p in data['prompts']]


def resolve_prompts(flag: str | None, from_file: list[str] | None, n: int) -> list[str]:
  if flag is None:
    if from_file is None:
      raise ValueError('--prompts is required for a folder of images.')
    return from_file
  if os.path.isfile(flag):
    with open(flag, encoding='utf-8') as f:
      lines = [l.strip() for l in f if l.strip()]
    if len(lines) == 1:
      lines = lines * n
    if len(lines) != n:
      raise ValueError(f'{flag}: {len(lines)} prompts for {n} images.')
    return lines
  return [flag] * n


def score(reward_dir: str, images: np.ndarray, prompts: list[str], *, mode: str,
          normalization: str, ref: np.ndarray | None = None, batch: int = 64) -> np.ndarray:
  """Per-image rewards (N,) of `images` with their prompts (and references)."""
  from rewarddance_jax.rewards import vlm_export  # pylint: disable=import-outside-toplevel

  graphdef, params, _, _, prompters, tile_spec = vlm_export.load_vlm_parts(reward_dir)
  from rewarddance_jax.rewards import vlm_yes  # pylint: disable=import-outside-toplevel
  if mode not in prompters:
    raise ValueError(f'{reward_dir} has no {mode} prompter (has {sorted(prompters)}).')
  reward = vlm_yes.vlm_yes_reward(graphdef, params, prompters[mode], tile_spec,
                                  normalization=normalization)
  fn = jax.jit(lambda r, x, b: r({'pixels': x}, b))
  n, out = len(images), []
  for i in range(0, n, batch):
    sl = slice(i, min(i + batch, n))
    enc = prompters[mode].encode(prompts[sl])
    b = {'vlm_ids': enc['ids'], 'vlm_pos': enc['pos']}
    if mode == 'pairwise':
      b['ref_pixels'] = ref[sl]
    pad = batch - (sl.stop - sl.start)   # fixed batch shape: one compile
    pix = images[sl]
    if pad:
      pix = np.concatenate([pix, np.repeat(pix[-1:], pad, 0)])
      b = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in b.items()}
    out.append(np.asarray(fn(reward, pix, b))[:sl.stop - sl.start])
  return np.concatenate(out)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {" ".join(argv[1:])}')
  images, names, file_prompts = load_images(_IMAGES.value)
  prompts = resolve_prompts(_PROMPTS.value, file_prompts, len(images))
  ref = None
  if _MODE.value == 'pairwise':
    if not _REF.value:
      raise ValueError('--mode=pairwise needs --ref (reference images).')
    ref = load_images(_REF.value)[0]
    if len(ref) == 1:
      ref = np.repeat(ref, len(images), 0)
    if ref.shape != images.shape:
      raise ValueError(f'--ref images {ref.shape} do not match --images {images.shape}.')
  rewards = score(_REWARD.value, images, prompts, mode=_MODE.value,
                  normalization=_NORM.value, ref=ref, batch=min(_BATCH.value, len(images)))
  out = _OUT.value or _IMAGES.value.rstrip('/') + '.rewards.csv'
  with open(out, 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(['image', 'prompt', 'reward'])
    for name, prompt, r in zip(names, prompts, rewards):
      print(f'{name}\t{r:.6f}')
      w.writerow([name, prompt, f'{r:.6f}'])
  print(f'mean reward {float(np.mean(rewards)):.4f} over {len(rewards)} images; wrote {out}')


if __name__ == '__main__':
  cli.run(main)
