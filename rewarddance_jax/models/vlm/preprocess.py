"""Image preprocessing for the VLM: pixels in [0, 1] → normalised tiles, in jnp (differentiable).

  1. grey → RGB by replication when the model expects 3 channels;
  2. tiling (InternVL dynamic tiling, transformers `GotOcr2ImageProcessor.crop_image_to_patches`):
     the (cols, rows) grid with cols·rows in [min_tiles, max_tiles] whose aspect ratio is closest
     to the image's (ties: more tiles while the image area exceeds half the tiled area); the image
     is resized to (rows·S, cols·S) and cut row-major into S×S tiles, plus a thumbnail (the whole
     image at S×S) when there is more than one tile. Shapes are static, so the grid is chosen in
     Python from the array shape and the function stays jit-able;
  3. resize with bicubic, antialiased interpolation (`jax.image.resize`);
  4. normalise per channel: (x − mean) / std (ImageNet statistics by default, as InternVL).
Output (B, T, S, S, C) for `InternVL.hidden(ids, tiles)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def supported_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
  """All (cols, rows) with min_tiles ≤ cols·rows ≤ max_tiles, ordered by tile count."""
  grids = {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
           if min_tiles <= c * r <= max_tiles}
  return sorted(grids, key=lambda g: g[0] * g[1])


def best_grid(height: int, width: int, tile: int, min_tiles: int = 1,
              max_tiles: int = 12) -> tuple[int, int]:
  """The (cols, rows) grid InternVL picks for a height×width image."""
  aspect, area = width / height, width * height
  best, best_diff = (1, 1), float('inf')
  for grid in supported_grids(min_tiles, max_tiles):
    diff = abs(aspect - grid[0] / grid[1])
    if diff < best_diff:
      best, best_diff = grid, diff
    elif diff == best_diff and area > 0.5 * tile * tile * grid[0] * grid[1]:
      best = grid
  return best


def _resize(x: jax.Array, h: int, w: int) -> jax.Array:
  if x.shape[1:3] == (h, w):
    return x
  return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method='bicubic', antialias=True)


def make_tiles(pixels: jax.Array, tile: int, *, channels: int = 3, min_tiles: int = 1,
               max_tiles: int = 1, thumbnail: bool = True, mean=IMAGENET_MEAN,
               std=IMAGENET_STD) -> jax.Array:
  """pixels (B, H, W, C) in [0, 1] → normalised tiles (B, T, tile, tile, channels), fp32."""
  x = jnp.asarray(pixels, jnp.float32)
  if x.ndim != 4:
    raise ValueError(f'pixels must be (B, H, W, C), got shape {x.shape}.')
  if x.shape[-1] == 1 and channels == 3:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[-1] != channels:
    raise ValueError(f'pixels have {x.shape[-1]} channels; the vision encoder expects {channels}.')
  b, h, w, _ = x.shape
  cols, rows = best_grid(h, w, tile, min_tiles, max_tiles)
  big = _resize(x, rows * tile, cols * tile)
  tiles = big.reshape(b, rows, tile, cols, tile, channels).transpose(0, 1, 3, 2, 4, 5)
  tiles = tiles.reshape(b, rows * cols, tile, tile, channels)
  if thumbnail and rows * cols > 1:
    tiles = jnp.concatenate([tiles, _resize(x, tile, tile)[:, None]], axis=1)
  mean = jnp.asarray(mean[:channels], jnp.float32)
  std = jnp.asarray(std[:channels], jnp.float32)
  return (tiles - mean) / std
