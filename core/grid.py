"""Geometry between the original slice and the model's patch grid.

The model sees the slice resized to S x S and cut into p x p patches, a grid of (h, w) = (S/p, S/p) patches
that covers the whole original slice. A pixel centre (x + 0.5, y + 0.5) of an original (Y, X) slice falls
into patch column floor((x + 0.5) * w / X) and row floor((y + 0.5) * h / Y). The same rule maps a patch
mask back to the original size (nearest), and bilinear upsampling treats patch values as samples at the
patch centres (``align_corners=False``), so both views agree.
"""

from __future__ import annotations

import numpy as np


def points_to_patches(xy: np.ndarray, slice_shape: tuple[int, int], grid_shape: tuple[int, int]) -> np.ndarray:
    """Patch (row, col) of each point.

    xy : (N, 2) x = column, y = row in pixels of the original slice.
    slice_shape : (Y, X) of the original slice. grid_shape : (h, w) of the patch grid.
    Returns (N, 2) int64 (row, col) in the grid.
    """
    points = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    height, width = slice_shape
    rows = np.floor((points[:, 1] + 0.5) * grid_shape[0] / height).astype(np.int64)
    cols = np.floor((points[:, 0] + 0.5) * grid_shape[1] / width).astype(np.int64)
    return np.stack([np.clip(rows, 0, grid_shape[0] - 1), np.clip(cols, 0, grid_shape[1] - 1)], axis=1)


def check_points_inside(xy: np.ndarray, slice_shape: tuple[int, int]) -> np.ndarray:
    """Boolean (N,) mask of points inside the slice (0 <= x < X, 0 <= y < Y)."""
    points = np.asarray(xy).reshape(-1, 2)
    return (points[:, 0] >= 0) & (points[:, 0] < slice_shape[1]) & (points[:, 1] >= 0) & (points[:, 1] < slice_shape[0])


def grid_to_pixels_nearest(grid: np.ndarray, slice_shape: tuple[int, int]) -> np.ndarray:
    """Nearest resize of a (h, w) patch map to (Y, X), every pixel taking the value of its patch."""
    height, width = slice_shape
    rows = np.minimum((np.arange(height) + 0.5) * grid.shape[0] / height, grid.shape[0] - 1).astype(np.int64)
    cols = np.minimum((np.arange(width) + 0.5) * grid.shape[1] / width, grid.shape[1] - 1).astype(np.int64)
    return grid[rows[:, None], cols[None, :]]


def upsample_bilinear(grid: np.ndarray, slice_shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a (h, w) score map to (Y, X) float32 (patch values at patch centres)."""
    import torch  # lazily: torch's interpolate is ~10x faster than scipy here, but costs ~2 s to import
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=tuple(slice_shape), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def pixels_to_grid_mean(image: np.ndarray, grid_shape: tuple[int, int]) -> np.ndarray:
    """Area-average a (Y, X) map onto a (h, w) grid using the same pixel-to-patch rule."""
    height, width = image.shape
    rows = np.minimum(((np.arange(height) + 0.5) * grid_shape[0] / height).astype(np.int64), grid_shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * grid_shape[1] / width).astype(np.int64), grid_shape[1] - 1)
    index = rows[:, None] * grid_shape[1] + cols[None, :]
    n_cells = grid_shape[0] * grid_shape[1]
    sums = np.bincount(index.ravel(), weights=np.asarray(image, dtype=np.float64).ravel(), minlength=n_cells)
    counts = np.bincount(index.ravel(), minlength=n_cells)
    return (sums / np.maximum(counts, 1)).reshape(grid_shape).astype(np.float32)
