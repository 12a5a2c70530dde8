"""Lesion labelling and measurement against phantoms with known answers, and the real expert lesions."""

import json
import time
import unittest
from pathlib import Path

import numpy as np

from liverlesionai.lesions import (
    LesionGeometryError,
    build_lesion_records,
    label_lesions,
    lesion_axes_mm,
    measure_lesions,
)
from liverlesionai.records import LESION_TYPES

IRCADB = Path(__file__).resolve().parents[1].parent / "shared/data/ircadb-01"


def rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    r = np.eye(3)
    a, b = [x for x in range(3) if x != axis]
    r[a, a], r[a, b], r[b, a], r[b, b] = np.cos(t), -np.sin(t), np.sin(t), np.cos(t)
    return r


def phantom(inside, spacing, direction=np.eye(3), centre=(10.0, -20.0, 30.0), half_extent_mm=25.0):
    """Instance map (id 1) of the physical object ``inside(r, a, s)`` sampled on a grid of the given
    voxel spacing (i, j, k) and direction, with a voxel centre exactly on ``centre``."""
    spacing = np.asarray(spacing, dtype=float)
    n = np.ceil(half_extent_mm / spacing).astype(int)  # voxels each side of the centre, per i, j, k
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, dtype=float) @ np.diag(spacing)
    m[:3, 3] = np.asarray(centre) - m[:3, :3] @ n
    k, j, i = np.indices(tuple(2 * n[::-1] + 1)).astype(float)
    ras = np.tensordot(m[:3, :3], np.stack([i, j, k]), axes=1) + m[:3, 3, None, None, None]
    rel = ras - np.asarray(centre)[:, None, None, None]
    return inside(*rel).astype(np.uint16), m


def sphere(d):
    return lambda r, a, s: r**2 + a**2 + s**2 <= (d / 2) ** 2


def ellipsoid(dr, da, ds):
    return lambda r, a, s: (2 * r / dr) ** 2 + (2 * a / da) ** 2 + (2 * s / ds) ** 2 <= 1


ORIENTATIONS = {
    "axial": np.eye(3),
    "flipped LPS": np.diag([-1.0, -1.0, 1.0]),
    "left-handed": np.diag([1.0, 1.0, -1.0]),
    "sagittal (i=A, j=S, k=R)": np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=float),
    "coronal (i=R, j=S, k=-A)": np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=float),
    "rotated about S": rotation(2, 33.0),
    "oblique": rotation(0, 25.0) @ rotation(2, 20.0),
}


class LabelLesionsTest(unittest.TestCase):
    def test_ids_ordered_by_volume_and_small_dropped(self):
        mask = np.zeros((20, 20, 20), dtype=bool)
        mask[1:3, 1:3, 1:3] = True  # 8 voxels, first in raster order
        mask[10:15, 10:15, 10:15] = True  # 125 voxels
        mask[1:4, 15:18, 15:18] = True  # 27 voxels
        mask[18, 1, 18] = True  # single voxel
        instances, n = label_lesions(mask, min_voxels=2)
        self.assertEqual(n, 3)
        self.assertEqual(instances.dtype, np.uint16)
        self.assertEqual(instances[12, 12, 12], 1)
        self.assertEqual(instances[2, 16, 16], 2)
        self.assertEqual(instances[1, 1, 1], 3)
        self.assertEqual(instances[18, 1, 18], 0)
        self.assertEqual(np.bincount(instances.ravel()).tolist(), [8000 - 160, 125, 27, 8])

    def test_diagonal_neighbours_are_one_lesion(self):
        mask = np.zeros((5, 5, 5), dtype=np.uint8)
        mask[1, 1, 1] = mask[2, 2, 2] = mask[3, 3, 3] = 1
        instances, n = label_lesions(mask)
        self.assertEqual(n, 1)
        self.assertEqual(int(instances.sum()), 3)

    def test_empty_mask(self):
        instances, n = label_lesions(np.zeros((4, 5, 6), dtype=bool))
        self.assertEqual((n, instances.shape, int(instances.max())), (0, (4, 5, 6), 0))

    def test_rejects_2d(self):
        with self.assertRaisesRegex(ValueError, "3D"):
            label_lesions(np.ones((4, 4), dtype=bool))


class MeasureLesionsTest(unittest.TestCase):
    def measure_one(self, instances, m, hu=None):
        hu = np.zeros(instances.shape, np.int16) if hu is None else hu
        result = measure_lesions(hu, instances, m)
        self.assertEqual(list(result), [1])
        return result[1]

    def test_sphere_isotropic(self):
        inst, m = phantom(sphere(20.0), (0.5, 0.5, 0.5))
        r = self.measure_one(inst, m)
        self.assertAlmostEqual(r["long_axis_mm"], 20.0, delta=0.55)
        self.assertAlmostEqual(r["short_axis_mm"], 20.0, delta=0.55)
        self.assertAlmostEqual(r["volume_ml"], 4 / 3 * np.pi * 10**3 / 1000, delta=0.05)
        np.testing.assert_allclose(r["centroid_ras"], (10.0, -20.0, 30.0), atol=1e-6)

    def test_ellipsoid_anisotropic_axes(self):
        for spacing in [(0.7, 0.7, 2.5), (0.8, 1.3, 1.0), (0.5, 0.5, 5.0)]:
            with self.subTest(spacing=spacing):
                inst, m = phantom(ellipsoid(30.0, 12.0, 16.0), spacing)
                r = self.measure_one(inst, m)
                tol = max(spacing[:2]) + 0.05
                self.assertAlmostEqual(r["long_axis_mm"], 30.0, delta=tol)
                self.assertAlmostEqual(r["short_axis_mm"], 12.0, delta=tol)

    def test_disc_of_any_in_plane_spacing_measures_its_diameter(self):
        for d, s in [(25.0, 0.6), (7.0, 0.8), (40.0, 1.5)]:
            disc = lambda r, a, z: (r**2 + a**2 <= (d / 2) ** 2) & (np.abs(z) <= 2.0)  # noqa: E731
            inst, m = phantom(disc, (s, s, 1.0), half_extent_mm=d / 2 + 3)
            r = self.measure_one(inst, m)
            with self.subTest(d=d, spacing=s):
                self.assertAlmostEqual(r["long_axis_mm"], d, delta=s)
                self.assertAlmostEqual(r["short_axis_mm"], d, delta=s)

    def test_long_axis_is_on_the_axial_plane_where_it_is_longest(self):
        # Cone along S: diameter 30 mm at the base, shrinking upward; and tilted cylinder along R.
        cone = lambda r, a, s: (s >= -10) & (s <= 10) & (r**2 + a**2 <= ((10 - s) * 0.75) ** 2)  # noqa: E731
        inst, m = phantom(cone, (0.5, 0.5, 1.0), half_extent_mm=16)
        r = self.measure_one(inst, m)
        self.assertAlmostEqual(r["long_axis_mm"], 30.0, delta=0.55)
        # Capsule along R: segment |r| <= 16 with radius 4, so 40 mm long and 8 mm wide.
        def capsule(r, a, s):
            return (np.abs(r) - np.clip(np.abs(r), 0, 16)) ** 2 + a**2 + s**2 <= 16

        inst, m = phantom(capsule, (0.5, 0.5, 0.5))
        r = self.measure_one(inst, m)
        self.assertAlmostEqual(r["long_axis_mm"], 40.0, delta=0.55)
        self.assertAlmostEqual(r["short_axis_mm"], 8.0, delta=0.55)

    def test_square_in_plane_diagonal(self):
        # 10 mm cube rotated 30 degrees about S: long axis = face diagonal, short = the other diagonal.
        cube = lambda r, a, s: (np.abs(r) <= 5) & (np.abs(a) <= 5) & (np.abs(s) <= 5)  # noqa: E731
        inst, m = phantom(cube, (0.25, 0.25, 1.0), direction=rotation(2, 30.0), half_extent_mm=9)
        r = self.measure_one(inst, m)
        self.assertAlmostEqual(r["long_axis_mm"], 10 * np.sqrt(2), delta=0.35)
        self.assertAlmostEqual(r["short_axis_mm"], 10 * np.sqrt(2), delta=0.35)

    def test_same_object_in_every_orientation(self):
        shape = ellipsoid(24.0, 10.0, 14.0)
        spacing_ras = np.array([0.7, 0.9, 1.2])  # mm along R, A, S for the axis-aligned grids
        reference = None
        for name, direction in ORIENTATIONS.items():
            with self.subTest(orientation=name):
                # Give each ijk axis the spacing of the RAS axis it runs along: same physical grid.
                spacing = spacing_ras[np.argmax(np.abs(direction), axis=0)]
                inst, m = phantom(shape, spacing, direction=direction)
                r = self.measure_one(inst, m)
                self.assertAlmostEqual(r["long_axis_mm"], 24.0, delta=1.2, msg=name)
                self.assertAlmostEqual(r["short_axis_mm"], 10.0, delta=1.2, msg=name)
                np.testing.assert_allclose(r["centroid_ras"], (10.0, -20.0, 30.0), atol=0.3)
                true_ml = 4 / 3 * np.pi * 12 * 5 * 7 / 1000
                self.assertAlmostEqual(r["volume_ml"], true_ml, delta=0.03 * true_ml)
                if reference is None:
                    reference = r
                elif "oblique" not in name and "rotated" not in name:
                    # Same sampling of the same object: identical up to the axis relabelling.
                    self.assertEqual(r["voxel_count"], reference["voxel_count"])
                    self.assertAlmostEqual(r["long_axis_mm"], reference["long_axis_mm"], delta=0.9)

    def test_volume_exact_and_hu_statistics_and_slices(self):
        inst = np.zeros((10, 12, 14), dtype=np.uint16)
        inst[2:7, 3:8, 4:9] = 1  # 125 voxels
        inst[8, 0, 0] = 2
        hu = np.full(inst.shape, -100, dtype=np.int16)
        hu[2:7, 3:8, 4:9] = np.arange(125).reshape(5, 5, 5) % 2 * 20 + 40  # 63 x 40 HU, 62 x 60 HU
        m = np.diag([-0.5, 0.6, -2.0, 1.0])  # left-handed
        m[:3, 3] = (7.0, 8.0, 9.0)
        res = measure_lesions(hu, inst, m)
        self.assertEqual(sorted(res), [1, 2])
        self.assertEqual(res[1]["voxel_count"], 125)
        self.assertAlmostEqual(res[1]["volume_ml"], 125 * 0.6 / 1000, places=12)
        values = np.array([40] * 63 + [60] * 62, dtype=float)
        self.assertAlmostEqual(res[1]["mean_hu"], values.mean(), places=9)
        self.assertAlmostEqual(res[1]["std_hu"], values.std(), places=9)
        self.assertEqual(res[1]["slice_range"], (2, 6))
        np.testing.assert_allclose(res[1]["centroid_ras"], (7 - 0.5 * 6, 8 + 0.6 * 5, 9 - 2.0 * 4))
        self.assertEqual(res[2]["slice_range"], (8, 8))
        self.assertAlmostEqual(res[2]["long_axis_mm"], np.hypot(0.5, 0.6) * 1.0, delta=0.2)

    def test_empty_and_bad_input(self):
        self.assertEqual(measure_lesions(np.zeros((3, 3, 3)), np.zeros((3, 3, 3), np.uint16), np.eye(4)), {})
        with self.assertRaisesRegex(ValueError, "differ in size"):
            measure_lesions(np.zeros((3, 3, 3)), np.zeros((3, 3, 4), np.uint16), np.eye(4))
        with self.assertRaisesRegex(LesionGeometryError, "degenerate"):
            measure_lesions(np.zeros((3, 3, 3)), np.ones((3, 3, 3), np.uint16), np.diag([1, 0, 1, 1.0]))
        with self.assertRaisesRegex(ValueError, "integer"):
            lesion_axes_mm(np.ones((3, 3, 3), np.float32), np.eye(4))

    def test_build_records_types_by_argmax(self):
        inst = np.zeros((6, 6, 6), dtype=np.uint16)
        inst[0:2, 0:2, 0:2] = 1
        inst[4:6, 4:6, 4:6] = 2
        hu = np.full(inst.shape, 30, dtype=np.int16)
        probs = {1: {"cyst": 0.2, "hemangioma": 0.7, "metastasis": 0.1}, 2: {"metastasis": 0.9, "cyst": 0.1}}
        records = build_lesion_records(hu, inst, np.eye(4), probs)
        self.assertEqual([r.lesion_id for r in records], [1, 2])
        self.assertEqual([r.lesion_type for r in records], ["hemangioma", "metastasis"])
        self.assertEqual(set(records[1].probabilities), set(LESION_TYPES))
        self.assertAlmostEqual(records[1].probability, 0.9)
        self.assertEqual(records[0].volume_ml, 8 / 1000)
        self.assertEqual(build_lesion_records(hu, np.zeros_like(inst), np.eye(4), {}), [])
        with self.assertRaisesRegex(ValueError, "Lesion 2 has no type"):
            build_lesion_records(hu, inst, np.eye(4), {1: probs[1]})
        with self.assertRaisesRegex(ValueError, "unknown types"):
            build_lesion_records(hu, inst, np.eye(4), {1: probs[1], 2: {"tumor": 1.0}})


@unittest.skipUnless((IRCADB / "case_01/lesions.json").is_file(), "3D-IRCADb case_01 not available")
class RealExpertLesionsTest(unittest.TestCase):
    def test_reproduces_expert_volumes_and_hu(self):
        import SimpleITK as sitk

        case = IRCADB / "case_01"
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "image.nii.gz")))
        instances = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "lesion_instances.nii.gz")))
        expected = json.loads((case / "lesions.json").read_text())["lesions"]
        m = np.diag([-0.57, -0.57, 1.6, 1.0])
        start = time.perf_counter()
        measured = measure_lesions(hu, instances, m)
        elapsed = time.perf_counter() - start
        print(f"\nmeasure_lesions on 512x512x129 with {len(measured)} lesions: {elapsed * 1000:.0f} ms")
        self.assertEqual(sorted(measured), [e["id"] for e in expected])
        for e in expected:
            got = measured[e["id"]]
            self.assertEqual(got["voxel_count"], e["voxels"])
            self.assertAlmostEqual(got["volume_ml"], e["volume_ml"], delta=0.0006)
            self.assertAlmostEqual(got["mean_hu"], e["mean_HU"], delta=0.051)
            self.assertAlmostEqual(got["std_hu"], e["std_HU"], delta=0.051)
            self.assertEqual(got["slice_range"], (e["bbox_zyx"][0], e["bbox_zyx"][3]))
            self.assertGreaterEqual(got["long_axis_mm"], got["short_axis_mm"])
        self.assertLess(elapsed, 1.0)
