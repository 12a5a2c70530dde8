"""Property-based geometry tests (hypothesis): random spacings, origins and directions, left-handed included.

- array -> file (NRRD, NIfTI, MetaImage) -> MRML volume node -> array keeps every voxel at its physical position;
- a result -> seg.nrrd -> result keeps every mask voxel at its physical position;
- lesion measurements do not change when the same physical object is stored with flipped or permuted axes.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liverlesionai.lesions import measure_lesions
from liverlesionai.records import CTVolume, SegmentationResult
from liverlesionai.segfile import read_seg_nrrd, write_seg_nrrd
from liverlesionai.volume_io import read_ct, write_volume

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PERMUTATIONS = list(itertools.permutations(range(3)))


def rotation_from(quaternion):
    w, x, y, z = np.asarray(quaternion, float) / np.linalg.norm(quaternion)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


@st.composite
def geometries(draw):
    """A 4x4 IJK-to-RAS: axis-aligned (any permutation and flips) or oblique, right- or left-handed."""
    spacing = np.array([draw(st.floats(0.3, 6.0)) for _ in range(3)])
    origin = np.array([draw(st.floats(-400.0, 400.0)) for _ in range(3)])
    if draw(st.booleans()):
        direction = np.eye(3)[:, list(draw(st.sampled_from(PERMUTATIONS)))]
        direction = direction * np.array([draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)])
    else:
        quaternion = [draw(st.floats(-1, 1)) for _ in range(4)]
        if np.linalg.norm(quaternion) < 0.1:
            quaternion = [1.0, 0.0, 0.0, 0.0]
        direction = rotation_from(quaternion)
        if draw(st.booleans()):
            direction[:, 0] *= -1  # left-handed
    m = np.eye(4)
    m[:3, :3] = direction * spacing
    m[:3, 3] = origin
    return m


def positions_by_value(voxels, ijk_to_ras):
    """value -> RAS position of the voxel holding it (values are unique)."""
    k, j, i = np.indices(voxels.shape).reshape(3, -1)
    ras = (ijk_to_ras @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].T
    order = np.argsort(voxels.ravel(), kind="stable")
    return voxels.ravel()[order], ras[order]


@pytest.fixture(scope="module")
def scene():
    pytest.importorskip("slicer")
    from liverlesionai import mrml

    return mrml.create_standalone_scene()


@SETTINGS
@given(m=geometries(), shape=st.tuples(st.integers(2, 6), st.integers(2, 7), st.integers(2, 8)),
       ext=st.sampled_from([".nrrd", ".nii.gz", ".mha"]))
def test_file_and_mrml_round_trip_keeps_voxel_positions(tmp_path_factory, scene, m, shape, ext):
    from liverlesionai import mrml

    voxels = np.arange(np.prod(shape), dtype=np.int16).reshape(shape) - 1000
    path = write_volume(tmp_path_factory.mktemp("rt") / f"ct{ext}", voxels, m)
    from_file = read_ct(path)
    node = mrml.volume_node_from_ct(scene, from_file)
    try:
        back = mrml.ct_from_volume_node(node)
    finally:
        scene.RemoveNode(node)
    values0, ras0 = positions_by_value(voxels, m)
    for ct in (from_file, back):
        values, ras = positions_by_value(ct.voxels, ct.ijk_to_ras)
        np.testing.assert_array_equal(values, values0)
        # NIfTI stores the geometry as float32: allow its rounding (1e-6 relative of |origin| <= 400 mm)
        np.testing.assert_allclose(ras, ras0, atol=2e-3)


@SETTINGS
@given(m=geometries(), seed=st.integers(0, 2**16))
def test_seg_nrrd_round_trip_keeps_mask_positions(tmp_path_factory, m, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(3, 9, size=3))
    liver = (rng.random(shape) < 0.4).astype(np.uint8)
    result = SegmentationResult(liver, np.zeros(shape, np.uint16), [], m, 0.0, [], "test")
    path = write_seg_nrrd(tmp_path_factory.mktemp("seg") / "case.seg.nrrd", result)
    back = read_seg_nrrd(path)
    k, j, i = np.nonzero(liver)
    expected = (m @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].T
    k, j, i = np.nonzero(back.liver_mask)
    got = (back.ijk_to_ras @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].T
    key = lambda p: np.lexsort(np.round(p, 3).T)  # noqa: E731
    np.testing.assert_allclose(got[key(got)], expected[key(expected)], atol=1e-4)


def restack(voxels, ijk_to_ras, permutation, flips):
    """The same physical voxels stored with array axes permuted and flipped; the matrix follows."""
    new = np.transpose(voxels, permutation)
    for axis in flips:
        new = np.flip(new, axis)
    to_old = np.eye(4)  # new (i, j, k, 1) -> old (i, j, k, 1)
    to_old[:3, :3] = 0
    for a in range(3):  # new array axis a holds old array axis permutation[a]
        new_col, old_col = 2 - a, 2 - permutation[a]
        if a in flips:
            to_old[old_col, new_col] = -1.0
            to_old[old_col, 3] = voxels.shape[permutation[a]] - 1
        else:
            to_old[old_col, new_col] = 1.0
    return np.ascontiguousarray(new), ijk_to_ras @ to_old


@SETTINGS
@given(spacing=st.tuples(st.floats(0.5, 3.0), st.floats(0.5, 3.0), st.floats(0.8, 5.0)),
       radii=st.tuples(st.floats(2.0, 7.0), st.floats(2.0, 7.0), st.floats(2.0, 7.0)),
       permutation=st.sampled_from(PERMUTATIONS), flips=st.sets(st.integers(0, 2)), seed=st.integers(0, 999))
def test_lesion_measurements_invariant_to_flips_and_permutations(spacing, radii, permutation, flips, seed):
    rng = np.random.default_rng(seed)
    m = np.eye(4)
    m[:3, :3] = np.diag([-spacing[0], -spacing[1], spacing[2]])
    m[:3, 3] = rng.uniform(-100, 100, 3)
    shape = (12, 14, 16)
    k, j, i = np.indices(shape)
    ras = (m @ np.stack([i, j, k, np.ones_like(i)]).reshape(4, -1).astype(float))[:3].T.reshape(*shape, 3)
    center = (m @ np.array([8.0, 7.0, 6.0, 1.0]))[:3]
    r = np.linalg.norm((ras - center) / np.array(radii) / np.array(spacing), axis=-1)
    instances = (r < 1.0).astype(np.uint16)
    instances[(r >= 1.0) & (r < 1.0 + 1e-9)] = 0
    if not instances.any():
        instances[6, 7, 8] = 1
    hu = rng.normal(40, 10, shape).astype(np.float32)

    reference = measure_lesions(hu, instances, m)[1]
    hu2, m2 = restack(hu, m, permutation, sorted(flips))
    inst2, _ = restack(instances, m, permutation, sorted(flips))
    # the restacked volume really is the same physical object
    ids = np.arange(hu.size).reshape(shape)
    v0, p0 = positions_by_value(ids, m)
    v1, p1 = positions_by_value(*restack(ids, m, permutation, sorted(flips)))
    np.testing.assert_array_equal(v0, v1)
    np.testing.assert_allclose(p0, p1, atol=1e-9)

    measured = measure_lesions(hu2, inst2, m2)[1]
    for key in ("voxel_count", "volume_ml", "long_axis_mm", "short_axis_mm", "mean_hu", "std_hu"):
        assert measured[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-6), key
    np.testing.assert_allclose(measured["centroid_ras"], reference["centroid_ras"], atol=1e-6)


def test_validate_accepts_any_orientation_of_the_same_ct():
    """validate_ct judges the physical volume: permuted/flipped storage gives the same verdict and warnings."""
    from liverlesionai.validation import validate_ct

    k, j, i = np.indices((30, 40, 40))
    hu = np.where(np.hypot(j - 19.5, i - 19.5) < 17, 50, -1000).astype(np.int16)
    m = np.diag([-8.0, -8.0, 6.0, 1.0])
    expected = validate_ct(CTVolume(hu, m, "ct"))
    for permutation in PERMUTATIONS:
        for flips in ([], [0], [1, 2]):
            v, m2 = restack(hu, m, permutation, flips)
            assert validate_ct(CTVolume(v, m2, "ct")) == expected
