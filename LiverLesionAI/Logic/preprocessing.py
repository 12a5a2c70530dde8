"""Preprocessing shared by training and inference: HU normalisation, working grids, resampling, views.

Any input orientation (flips, permutations, left-handed, oblique) is handled by resampling through
physical coordinates onto a canonical working grid (i toward patient left, j toward posterior,
k toward superior), the orientation the networks were trained in.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .phantom import Grid


def normalize_hu(hu, window):
    lo, hi = window
    center, half = (lo + hi) / 2, (hi - lo) / 2
    return (np.clip(hu, lo, hi).astype(np.float32) - np.float32(center)) / np.float32(half)


def denormalize_hu(x, window):
    """``normalize_hu`` inverted (HU inside the window)."""
    lo, hi = window
    return x * np.float32((hi - lo) / 2) + np.float32((lo + hi) / 2)


def ras_bounds(shape_kji, ijk_to_ras):
    """RAS bounding box of a volume's voxel centres."""
    nk, nj, ni = shape_kji
    corners = np.array([[i, j, k, 1.0] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)])
    ras = (ijk_to_ras @ corners.T).T[:, :3]
    return ras.min(axis=0), ras.max(axis=0)


def canonical_grid(lo, hi, spacing, multiple=1):
    """Canonical grid covering the RAS box [lo, hi]; in-plane sizes rounded up to ``multiple``."""
    spacing = np.asarray(spacing, float)
    n = np.floor((hi - lo) / spacing).astype(int) + 1
    n[:2] = -(-n[:2] // multiple) * multiple
    origin = np.array([hi[0], hi[1], lo[2]])  # i grows toward -x (left), j toward -y (posterior)
    return Grid(origin, spacing, (int(n[2]), int(n[1]), int(n[0])))


def grid_to_source_index(grid: Grid, ijk_to_ras, box=None):
    """Continuous source (k, j, i) indices of the grid's voxel centres, as three broadcastable arrays."""
    x, y, z = grid.axes()
    if box is not None:
        z, y, x = z[box[0]], y[box[1]], x[box[2]]
    ras_to_ijk = np.linalg.inv(ijk_to_ras)
    X, Y, Z = x[None, None, :], y[None, :, None], z[:, None, None]
    idx = [ras_to_ijk[r, 0] * X + ras_to_ijk[r, 1] * Y + ras_to_ijk[r, 2] * Z + ras_to_ijk[r, 3] for r in range(3)]
    return idx[2], idx[1], idx[0]  # k, j, i


def resample_to_grid(voxels, ijk_to_ras, grid: Grid, order=1, cval=-1024.0, dtype=np.float32, box=None):
    """Sample a [k, j, i] volume on ``grid`` (or a box of it) through physical coordinates."""
    k, j, i = grid_to_source_index(grid, ijk_to_ras, box)
    shape = np.broadcast_shapes(k.shape, j.shape, i.shape)
    coords = np.stack([np.broadcast_to(a, shape).astype(np.float32) for a in (k, j, i)])
    src = voxels if voxels.dtype in (np.float32, np.uint8) else voxels.astype(np.float32)
    out = ndimage.map_coordinates(src, coords, order=order, mode="constant", cval=cval, prefilter=False)
    return out.astype(dtype, copy=False)


# ----------------------------------------------------------------------------------------------
# Slabs and orthogonal views: one definition for training and inference
# ----------------------------------------------------------------------------------------------
VIEWS = ("axial", "coronal", "sagittal")


def to_view(volume, view):
    """Reorder a canonical [k, j, i] array so that axis 0 is the slab axis of ``view``.

    axial: (k, j, i); coronal: (j, k, i); sagittal: (i, k, j). Rows of coronal and sagittal
    images run along k (inferior to superior): consistent between training and inference.
    """
    # .swapaxes: a view of a numpy array or a torch tensor alike (explain runs it on tensors)
    if view == "axial":
        return volume
    if view == "coronal":
        return volume.swapaxes(0, 1)
    if view == "sagittal":
        return volume.swapaxes(1, 2).swapaxes(0, 1)
    raise ValueError(f"unknown view {view!r}")


def from_view(volume, view):
    """``to_view``'s inverse on the last three axes (leading axes, e.g. classes, are kept)."""
    if view == "axial":
        return volume
    if view == "coronal":
        return np.swapaxes(volume, -3, -2)
    if view == "sagittal":
        return np.moveaxis(volume, -3, -1)
    raise ValueError(f"unknown view {view!r}")


def slab_stack(volume, centers, half):
    """(len(centers), 2*half+1, H, W) slabs from a [slab_axis, H, W] array, edge-padded."""
    padded = np.pad(volume, ((half, half), (0, 0), (0, 0)), mode="edge")
    return np.stack([padded[c:c + 2 * half + 1] for c in centers])


def pad_to_multiple(array, multiple, value):
    """Pad the last two axes up to a multiple; returns the padded array and the original size."""
    h, w = array.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        pad = [(0, 0)] * (array.ndim - 2) + [(0, ph), (0, pw)]
        array = np.pad(array, pad, constant_values=value)
    return array, (h, w)
