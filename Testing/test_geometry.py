"""Canonical orientation and resampling: every flip, permutation, left-handed and oblique direction."""

import itertools

import numpy as np
import pytest

from liverlesionai.geometry import canonicalize, resample_separable, sub_grid
from liverlesionai.phantom import Grid


def _affine(permutation, signs, spacing=(0.7, 0.8, 2.5), origin=(10.0, -20.0, 30.0)):
    m = np.eye(4)
    m[:3, :3] = 0
    for col, (row, sign) in enumerate(zip(permutation, signs)):
        m[row, col] = sign * spacing[col]
    m[:3, 3] = origin
    return m


def _ras_of_voxels(shape, m):
    k, j, i = np.indices(shape)
    return (np.stack([i, j, k, np.ones_like(i)], -1) @ m.T)[..., :3]


ORIENTATIONS = [(p, s) for p in itertools.permutations(range(3)) for s in itertools.product((1, -1), repeat=3)]


@pytest.mark.parametrize("permutation,signs", ORIENTATIONS[::3] + [((0, 1, 2), (-1, -1, 1)), ((2, 0, 1), (1, -1, -1))])
def test_canonicalize_keeps_physical_positions(permutation, signs):
    shape = (5, 6, 7)
    m = _affine(permutation, signs)
    voxels = np.arange(np.prod(shape)).reshape(shape)
    canon = canonicalize(voxels, m)
    assert canon.permutation is not None
    # each canonical voxel holds the value of the input voxel at the same RAS position
    ras_in = _ras_of_voxels(shape, m).reshape(-1, 3)
    ras_canon = _ras_of_voxels(canon.array.shape, canon.grid.ijk_to_ras).reshape(-1, 3)
    lookup = {tuple(np.round(r, 3)): v for r, v in zip(ras_in, voxels.ravel())}
    assert all(lookup[tuple(np.round(r, 3))] == v for r, v in zip(ras_canon, canon.array.ravel()))
    # canonical axes: i toward left (-x), j toward posterior (-y), k toward superior (+z)
    d = canon.grid.ijk_to_ras[:3, :3]
    assert d[0, 0] < 0 and d[1, 1] < 0 and d[2, 2] > 0
    assert np.array_equal(canon.to_input(canon.array), voxels)


def test_oblique_input_is_resampled_and_mapped_back():
    rng = np.random.default_rng(0)
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([1.0, 1.0, 2.0])
    voxels = np.zeros((12, 30, 30), np.float32)
    voxels[4:8, 10:20, 10:20] = 100
    canon = canonicalize(voxels, m)
    assert canon.permutation is None
    back = canon.to_input((canon.array > 50).astype(np.uint8))
    inner = np.zeros_like(voxels, bool)
    inner[5:7, 12:18, 12:18] = True
    assert back[inner].all() and not back[voxels == 0][:50].any()
    del rng


def test_resample_separable_linear_and_nearest():
    src = Grid(np.array([0.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0]), (10, 10, 10))
    z = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((10, 10, 10), np.float32)
    dst = Grid(np.array([0.0, 0.0, 0.5]), np.array([2.0, 2.0, 2.0]), (4, 5, 5))
    out = resample_separable(z, src, dst, order=1)
    assert np.allclose(out[:, 0, 0], [0.5, 2.5, 4.5, 6.5])
    nearest = resample_separable(z.astype(np.uint16), src, dst, order=0, dtype=np.uint16)
    assert nearest.dtype == np.uint16 and set(np.unique(nearest)) <= set(range(10))
    outside = Grid(np.array([0.0, 0.0, -5.0]), np.ones(3), (3, 2, 2))
    assert np.all(resample_separable(z, src, outside, 1, cval=-7)[:2] == -7)


def test_sub_grid_matches_positions():
    grid = Grid(np.array([50.0, 40.0, -10.0]), np.array([0.5, 0.5, 2.0]), (20, 40, 40))
    sub, slices = sub_grid(grid, np.array([40.0, 35.0, -5.0]), np.array([45.0, 38.0, 10.0]))
    x, y, z = grid.axes()
    sx, sy, sz = sub.axes()
    assert np.allclose(sx, x[slices[2]]) and np.allclose(sy, y[slices[1]]) and np.allclose(sz, z[slices[0]])


def test_nonzero_box_matches_find_objects():
    from scipy import ndimage

    from liverlesionai.geometry import nonzero_box

    rng = np.random.default_rng(3)
    for _ in range(20):
        a = np.zeros((9, 11, 13), np.uint8)
        b = np.zeros((9, 11, 13), np.uint16)
        for array in (a, b):
            for _ in range(rng.integers(0, 3)):
                array[tuple(rng.integers(0, n) for n in array.shape)] = rng.integers(1, 5)
        expected = ndimage.find_objects(((a > 0) | (b > 0)).astype(np.uint8))
        assert nonzero_box(a, b) == (expected[0] if expected else None)
