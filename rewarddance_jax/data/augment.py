"""Image augmentation for reward training on real digits, so the reward holds on generated ones.

A reward trained only on clean real digits meets, in RL, the generator's digits: slanted,
thicker or thinner strokes, blur and speckle. `digit_augment` draws, per image (N, H, W, 1) in
[0, 1], in this order:
  1. an affine warp about the image centre: rotation U(±rotate_deg) degrees, zoom
     U(1 ± scale), translation U(±shift) pixels per axis (bilinear, zeros outside);
  2. with probability `stroke_prob`, a 2×2 grey dilation or erosion (50/50): thicker / thinner
     strokes;
  3. with probability `blur_prob`, a Gaussian blur of std U(0.3, blur_sigma_max) pixels
     (blur_sigma_max > 0);
  4. pixel noise N(0, s²), s ~ U(0, noise_max);
then clips to [0, 1]. Every draw comes from the `rng` argument (the caller's stateless per-batch
generator), so batches stay reproducible and resumable.

What it changed on the digits pipeline: docs/digits_pipeline.md ("VLM reward").
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _affine(rng: np.random.Generator, image: np.ndarray, rotate_deg: float, scale: float,
            shift: float) -> np.ndarray:
  """(H, W) → (H, W): rotation, zoom and translation about the centre (bilinear)."""
  angle = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg))
  zoom = rng.uniform(1.0 - scale, 1.0 + scale)
  # affine_transform maps output coordinates to input ones: the inverse of the warp.
  inverse = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / zoom
  centre = (np.array(image.shape, np.float64) - 1.0) / 2.0
  offset = centre - inverse @ centre + rng.uniform(-shift, shift, 2)
  return ndimage.affine_transform(image, inverse, offset=offset, order=1, mode='constant')


def digit_augment(rng: np.random.Generator, images: np.ndarray, *, rotate_deg: float = 12.0,
                  scale: float = 0.1, shift: float = 1.0, stroke_prob: float = 0.3,
                  blur_prob: float = 0.3, blur_sigma_max: float = 0.8,
                  noise_max: float = 0.15) -> np.ndarray:
  """Augmented copy of `images` (N, H, W, 1) float in [0, 1]; float32 (see the module doc)."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 1:
    raise ValueError(f'digit_augment expects (N, H, W, 1) images, got shape {images.shape}.')
  out = np.empty_like(images)
  for i in range(len(images)):
    x = _affine(rng, images[i, ..., 0], rotate_deg, scale, shift)
    if stroke_prob and rng.random() < stroke_prob:
      x = (ndimage.grey_dilation(x, size=2) if rng.random() < 0.5
           else ndimage.grey_erosion(x, size=2))
    if blur_sigma_max and rng.random() < blur_prob:
      x = ndimage.gaussian_filter(x, rng.uniform(0.3, blur_sigma_max))
    out[i, ..., 0] = x + rng.normal(0.0, rng.uniform(0.0, noise_max), x.shape)
  return np.clip(out, 0.0, 1.0)
