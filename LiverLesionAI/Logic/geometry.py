"""Canonical orientation and fast resampling between canonical grids.

The networks work on canonical grids (see ``phantom.Grid``). An axis-aligned input (any flips or
axis permutation, left-handed included) becomes canonical by a transpose and flips: a view, no copy,
exactly invertible. An oblique input is resampled once onto a canonical grid at its own resolution,
and results are mapped back through physical coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .phantom import Grid
from .preprocessing import canonical_grid, ras_bounds, resample_to_grid

# canonical array axis -> (RAS axis, sign of the RAS coordinate change per index step)
_CANONICAL = ((2, +1), (1, -1), (0, -1))  # [k: +S, j: -A (posterior), i: -R (left)]


@dataclass
class CanonicalVolume:
    array: np.ndarray  # canonical [k, j, i]
    grid: Grid
    permutation: tuple | None  # input array axes in canonical order (None: oblique, resampled)
    flips: tuple
    input_shape: tuple
    input_ijk_to_ras: np.ndarray

    def to_input(self, canonical_array, order=0, cval=0):
        """Bring a canonical-grid array (same grid) back to the input's voxel grid."""
        if self.permutation is not None:
            a = np.flip(canonical_array, axis=self.flips) if self.flips else canonical_array
            inverse = np.argsort(self.permutation)
            return np.ascontiguousarray(np.transpose(a, inverse))
        k, j, i = np.indices(self.input_shape, dtype=np.float32)
        ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1) @ self.input_ijk_to_ras.T
        ras_to_canon = np.linalg.inv(self.grid.ijk_to_ras)
        ci = ijk1 @ ras_to_canon.T
        coords = np.stack([ci[..., 2], ci[..., 1], ci[..., 0]])
        return ndimage.map_coordinates(canonical_array, coords, order=order, mode="constant", cval=cval,
                                       prefilter=False).astype(canonical_array.dtype)


def axis_alignment(ijk_to_ras, tolerance=1e-3):
    """(permutation, flips) making the array canonical, or None when the directions are oblique."""
    m = np.asarray(ijk_to_ras, float)[:3, :3]
    unit = m / np.linalg.norm(m, axis=0)
    # array axis a of a [k, j, i] array corresponds to ijk column 2 - a
    ras_of_axis, sign_of_axis = {}, {}
    for axis in range(3):
        column = unit[:, 2 - axis]
        ras = int(np.argmax(np.abs(column)))
        if abs(column[ras]) < 1 - tolerance:
            return None
        ras_of_axis[axis], sign_of_axis[axis] = ras, np.sign(column[ras])
    if sorted(ras_of_axis.values()) != [0, 1, 2]:
        return None
    permutation, flips = [], []
    for canonical_axis, (ras, sign) in enumerate(_CANONICAL):
        axis = next(a for a, r in ras_of_axis.items() if r == ras)
        permutation.append(axis)
        if sign_of_axis[axis] != sign:
            flips.append(canonical_axis)
    return tuple(permutation), tuple(flips)


def canonicalize(voxels, ijk_to_ras) -> CanonicalVolume:
    ijk_to_ras = np.asarray(ijk_to_ras, float)
    alignment = axis_alignment(ijk_to_ras)
    spacing_ijk = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    if alignment is not None:
        permutation, flips = alignment
        array = np.transpose(voxels, permutation)
        if flips:
            array = np.flip(array, axis=flips)
        # RAS of canonical voxel 0 = input voxel with index n-1 on flipped axes, 0 elsewhere
        index_kji = [0, 0, 0]
        for canonical_axis, axis in enumerate(permutation):
            if canonical_axis in flips:
                index_kji[axis] = voxels.shape[axis] - 1
        origin = (ijk_to_ras @ np.array([index_kji[2], index_kji[1], index_kji[0], 1.0]))[:3]
        spacing = np.array([spacing_ijk[2 - permutation[2]], spacing_ijk[2 - permutation[1]],
                            spacing_ijk[2 - permutation[0]]])
        return CanonicalVolume(array, Grid(origin, spacing, array.shape), permutation, flips, voxels.shape,
                               ijk_to_ras)
    lo, hi = ras_bounds(voxels.shape, ijk_to_ras)
    step = float(spacing_ijk.min())
    grid = canonical_grid(lo, hi, (step, step, step))
    array = resample_to_grid(voxels, ijk_to_ras, grid, order=1, cval=-1024.0)
    return CanonicalVolume(array, grid, None, (), voxels.shape, ijk_to_ras)


def _source_indices(src: Grid, dst: Grid):
    """Fractional source indices of the destination voxel centres along each canonical axis."""
    sx, sy, sz = src.axes()
    dx, dy, dz = dst.axes()
    return ((dz - src.origin[2]) / src.spacing[2], (src.origin[1] - dy) / src.spacing[1],
            (src.origin[0] - dx) / src.spacing[0])


def resample_separable(array, src: Grid, dst: Grid, order=1, cval=0.0, dtype=np.float32):
    """Resample between two canonical grids axis by axis (linear or nearest); far cheaper than a
    general 3D interpolation and exact for axis-aligned grids."""
    out = array
    for axis, coords in enumerate(_source_indices(src, dst)):
        n = out.shape[axis]
        valid = (coords >= -0.5) & (coords <= n - 0.5)
        shape = [-1 if a == axis else 1 for a in range(3)]
        if order == 0:
            idx = np.clip(np.round(coords).astype(np.int64), 0, n - 1)
            out = np.take(out, idx, axis=axis)
            if not valid.all():
                out = np.where(valid.reshape(shape), out, np.asarray(cval, out.dtype))
            continue
        c = np.clip(coords, 0, n - 1)
        i0 = np.floor(c).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        w = (c - i0).astype(np.float32).reshape(shape)
        lo = np.take(out, i0, axis=axis).astype(np.float32, copy=False)
        hi = np.take(out, i1, axis=axis).astype(np.float32, copy=False)
        out = lo + (hi - lo) * w
        if not valid.all():
            out = np.where(valid.reshape(shape), out, np.float32(cval))
    return out.astype(dtype, copy=False)


def sub_grid(grid: Grid, lo, hi):
    """The part of a canonical grid inside the RAS box [lo, hi], as (Grid, index slices)."""
    x, y, z = grid.axes()
    slices = []
    for coords, a, b in ((z, lo[2], hi[2]), (y, lo[1], hi[1]), (x, lo[0], hi[0])):
        idx = np.nonzero((coords >= a) & (coords <= b))[0]
        if idx.size == 0:
            return None, None
        slices.append(slice(int(idx[0]), int(idx[-1]) + 1))
    origin = np.array([x[slices[2].start], y[slices[1].start], z[slices[0].start]])
    shape = tuple(s.stop - s.start for s in slices)
    return Grid(origin, grid.spacing, shape), tuple(slices)


def grid_bounds(grid: Grid):
    return ras_bounds(grid.shape, grid.ijk_to_ras)


def nonzero_box(*arrays):
    """Index slices of the box holding every nonzero voxel of the (same-shape) arrays, or None.

    Two reductions per array instead of a full-volume argwhere or unique: masks fill a small part
    of a CT, so later work is done inside the box.
    """
    along_k, in_plane = None, None
    for array in arrays:
        k = array.any(axis=(1, 2))
        ji = array.any(axis=0)
        along_k = k if along_k is None else along_k | k
        in_plane = ji if in_plane is None else in_plane | ji
    if along_k is None or not along_k.any():
        return None
    spans = [np.flatnonzero(along_k), np.flatnonzero(in_plane.any(axis=1)), np.flatnonzero(in_plane.any(axis=0))]
    return tuple(slice(int(s[0]), int(s[-1]) + 1) for s in spans)
