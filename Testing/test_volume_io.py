"""volume_io: reading CT (files and DICOM series), writing volumes, LPS <-> RAS geometry.

Geometry is checked through physical positions (RAS of each voxel, found by its unique value), never by
raw index order, and against Slicer's own reader (slicer-core) so that the RAS convention is Slicer's.
"""

import gzip
import itertools
import math
import unittest
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from liverlesionai.errors import InputError, OutputError
from liverlesionai.volume_io import array_from_sitk, read_ct, sitk_from_array, split_extension, write_volume

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/ircadb-01"


def rotation(axis, degrees):
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [n for n in range(3) if n != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def geometry(axes, origin=(12.5, -40.0, 103.25)):
    m = np.eye(4)
    m[:3, :3] = axes
    m[:3, 3] = origin
    return m


SPACING = np.diag([0.7, 0.9, 2.5])
FLIPS = [geometry(np.diag(signs) @ SPACING) for signs in itertools.product((1.0, -1.0), repeat=3)]
PERMUTED = geometry(np.array([[0, 0, -1.0], [1.0, 0, 0], [0, -1.0, 0]]) @ SPACING)
OBLIQUE = geometry(rotation(0, 17) @ rotation(2, -33) @ np.diag([1, -1, 1]) @ SPACING)  # also left-handed
ALL_GEOMETRIES = FLIPS + [PERMUTED, OBLIQUE]


def unique_voxels(shape=(4, 5, 6)):
    return (np.arange(np.prod(shape), dtype=np.int16) - 100).reshape(shape)


def positions_by_value(voxels, ijk_to_ras):
    """{value: RAS position} for an array whose values are all distinct."""
    k, j, i = np.indices(voxels.shape).reshape(3, -1)
    ras = (np.asarray(ijk_to_ras) @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].T
    order = np.argsort(voxels.ravel(), kind="stable")
    return voxels.ravel()[order], ras[order]


class GeometryConversionTest(unittest.TestCase):
    def test_sitk_round_trip_is_exact(self):
        voxels = unique_voxels()
        for m in ALL_GEOMETRIES:
            back, m2 = array_from_sitk(sitk_from_array(voxels, m))
            np.testing.assert_array_equal(back, voxels)
            np.testing.assert_allclose(m2, m, atol=1e-12)

    def test_lps_is_ras_with_x_and_y_negated(self):
        image = sitk_from_array(unique_voxels(), FLIPS[0])
        self.assertEqual(image.GetOrigin(), (-12.5, 40.0, 103.25))
        ras = FLIPS[0] @ [1, 2, 3, 1]
        lps = image.TransformIndexToPhysicalPoint((1, 2, 3))
        np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]])

    def test_sheared_or_degenerate_geometry_is_refused(self):
        sheared = geometry(np.array([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]]))
        with self.assertRaises(ValueError):
            sitk_from_array(unique_voxels(), sheared)
        with self.assertRaises(ValueError):
            sitk_from_array(unique_voxels(), geometry(np.diag([1.0, 0.0, 1.0])))

    def test_split_extension(self):
        self.assertEqual(split_extension("/a/b/case.1.nii.gz"), ("case.1", ".nii.gz"))
        self.assertEqual(split_extension("x.seg.nrrd"), ("x", ".seg.nrrd"))
        self.assertEqual(split_extension("x.MHA"), ("x", ".MHA"))


class WriteReadRoundTripTest(unittest.TestCase):
    def setUp(self):
        self.tmp = TemporaryDirectory()
        self.dir = Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def test_physical_positions_survive_every_format_and_orientation(self):
        voxels = unique_voxels()
        values, expected = positions_by_value(voxels, np.eye(4))
        for ext in (".nii.gz", ".nrrd", ".mha"):
            for n, m in enumerate(ALL_GEOMETRIES):
                with self.subTest(ext=ext, geometry=n):
                    path = write_volume(self.dir / f"v{n}{ext}", voxels, m)
                    ct = read_ct(path)
                    self.assertEqual(ct.name, f"v{n}")
                    self.assertEqual(ct.voxels.dtype, np.int16)
                    got_values, got = positions_by_value(ct.voxels, ct.ijk_to_ras)
                    _, want = positions_by_value(voxels, m)
                    np.testing.assert_array_equal(got_values, values)
                    tolerance = 1e-4 if ext == ".nii.gz" else 1e-9  # NIfTI stores float32 geometry
                    np.testing.assert_allclose(got, want, atol=tolerance)
        self.assertEqual(sorted(p.name for p in self.dir.iterdir() if p.name.startswith(".")), [])

    def test_positions_agree_with_slicers_own_reader(self):
        import slicer
        import vtk
        from vtk.util import numpy_support

        voxels = unique_voxels()
        for ext in (".nrrd", ".nii.gz"):
            for n, m in enumerate([FLIPS[0], FLIPS[7], PERMUTED, OBLIQUE]):
                with self.subTest(ext=ext, geometry=n):
                    path = write_volume(self.dir / f"s{n}{ext}", voxels, m)
                    scene = slicer.vtkMRMLScene()
                    node = slicer.vtkMRMLScalarVolumeNode()
                    scene.AddNode(node)
                    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
                    scene.AddNode(storage)
                    storage.SetFileName(str(path))
                    self.assertTrue(storage.ReadData(node))
                    image = node.GetImageData()
                    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
                    array = array.reshape(image.GetDimensions()[::-1])
                    matrix = vtk.vtkMatrix4x4()
                    node.GetIJKToRASMatrix(matrix)
                    slicer_m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
                    got_values, got = positions_by_value(array, slicer_m)
                    want_values, want = positions_by_value(voxels, m)
                    np.testing.assert_array_equal(got_values, want_values)
                    np.testing.assert_allclose(got, want, atol=1e-4)

    def test_refuses_to_overwrite_unless_asked(self):
        path = write_volume(self.dir / "a.nrrd", unique_voxels(), FLIPS[0])
        before = path.read_bytes()
        with self.assertRaises(OutputError) as ctx:
            write_volume(path, unique_voxels() + 1, FLIPS[0])
        self.assertIn("already exists", str(ctx.exception))
        self.assertEqual(path.read_bytes(), before)
        write_volume(path, unique_voxels() + 1, FLIPS[0], overwrite=True)
        np.testing.assert_array_equal(read_ct(path).voxels, unique_voxels() + 1)
        self.assertEqual([p.name for p in self.dir.iterdir()], ["a.nrrd"])

    def test_bad_output_paths(self):
        with self.assertRaises(OutputError):
            write_volume(self.dir / "missing" / "a.nrrd", unique_voxels(), FLIPS[0])
        with self.assertRaises(ValueError):
            write_volume(self.dir / "a.png", unique_voxels(), FLIPS[0])
        self.assertEqual(list(self.dir.iterdir()), [])


class ReadErrorsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = TemporaryDirectory()
        self.dir = Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def test_missing_file(self):
        with self.assertRaises(InputError) as ctx:
            read_ct(self.dir / "nothing.nii.gz")
        self.assertIn("nothing.nii.gz", str(ctx.exception))
        self.assertIn("does not exist", str(ctx.exception))

    def test_truncated_files(self):
        voxels = np.random.default_rng(1).integers(-1000, 1000, (20, 30, 30)).astype(np.int16)
        for ext in (".nii.gz", ".nrrd", ".nii", ".mha"):
            with self.subTest(ext=ext):
                path = write_volume(self.dir / f"t{ext}", voxels, FLIPS[0])
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
                with self.assertRaises(InputError) as ctx:
                    read_ct(path)
                self.assertIn(path.name, str(ctx.exception))

    def test_not_an_image_and_unsupported_type(self):
        (self.dir / "x.nii.gz").write_bytes(gzip.compress(b"hello"))
        with self.assertRaises(InputError):
            read_ct(self.dir / "x.nii.gz")
        (self.dir / "x.png").write_bytes(b"\x89PNG")
        with self.assertRaises(InputError) as ctx:
            read_ct(self.dir / "x.png")
        self.assertIn("unsupported", str(ctx.exception))

    def test_vector_image_is_refused(self):
        rgb = sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True)
        sitk.WriteImage(rgb, str(self.dir / "rgb.mha"))
        with self.assertRaises(InputError) as ctx:
            read_ct(self.dir / "rgb.mha")
        self.assertIn("3 values per voxel", str(ctx.exception))

    def test_2d_image_becomes_one_slice(self):
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 5), np.int16)), str(self.dir / "flat.nrrd"))
        ct = read_ct(self.dir / "flat.nrrd")
        self.assertEqual(ct.voxels.shape, (1, 4, 5))


def write_ct_series(folder, hu, row, col, first_position, pixel_spacing, slice_step, slope, intercept,
                    description, series_uid=None):
    """A CT series written with pydicom, one file per slice, stored = (HU - intercept) / slope (uint16)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    normal = np.cross(row, col)
    for k in range(hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{description}_{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Test^Phantom", "P1"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = description, 1, k + 1
        ds.ImageOrientationPatient = [float(v) for v in list(row) + list(col)]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(first_position) + k * slice_step * normal]
        ds.PixelSpacing = [float(pixel_spacing[1]), float(pixel_spacing[0])]  # row spacing (j), column spacing (i)
        ds.SliceThickness = float(slice_step)
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
        stored = np.round((hu[k] - intercept) / slope).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        ds.save_as(str(folder / f"{description}_{k:03d}.dcm"), enforce_file_format=True)
    return series_uid


class DicomSeriesTest(unittest.TestCase):
    ROW = np.array([math.cos(0.3), math.sin(0.3), 0.0])
    COL = np.array([-math.sin(0.3) * math.cos(0.2), math.cos(0.3) * math.cos(0.2), math.sin(0.2)])

    def setUp(self):
        self.tmp = TemporaryDirectory()
        self.dir = Path(self.tmp.name)
        self.hu = (np.arange(4 * 5 * 6).reshape(4, 5, 6) * 6 - 1000).astype(np.int16)  # distinct, even

    def tearDown(self):
        self.tmp.cleanup()

    def expected_positions(self, first=(-120.0, 80.0, 300.0), spacing=(0.8, 0.6), step=2.5):
        k, j, i = np.indices(self.hu.shape).reshape(3, -1)
        normal = np.cross(self.ROW, self.COL)
        lps = (np.asarray(first)[:, None] + np.outer(self.ROW, i * spacing[0]) + np.outer(self.COL, j * spacing[1])
               + np.outer(normal, k * step))
        ras = lps.T * [-1, -1, 1]
        order = np.argsort(self.hu.ravel(), kind="stable")
        return self.hu.ravel()[order], ras[order]

    def test_series_reads_with_hu_and_geometry(self):
        folder = self.dir / "Abdomen CT"
        write_ct_series(folder, self.hu, self.ROW, self.COL, (-120.0, 80.0, 300.0), (0.8, 0.6), 2.5,
                        slope=2.0, intercept=-1024.0, description="venous")
        ct = read_ct(folder)
        self.assertEqual(ct.name, "Abdomen CT")
        self.assertEqual(ct.voxels.shape, self.hu.shape)
        values, ras = positions_by_value(np.round(ct.voxels).astype(np.int64), ct.ijk_to_ras)
        want_values, want_ras = self.expected_positions()
        np.testing.assert_array_equal(values, want_values)
        np.testing.assert_allclose(ras, want_ras, atol=1e-3)

    def test_two_series_in_one_folder(self):
        folder = self.dir / "mixed"
        uid_a = write_ct_series(folder, self.hu, self.ROW, self.COL, (-120.0, 80.0, 300.0), (0.8, 0.6), 2.5,
                                1.0, -1024.0, "arterial")
        uid_b = write_ct_series(folder, self.hu[:3] + 10, self.ROW, self.COL, (-120.0, 80.0, 300.0), (0.8, 0.6), 2.5,
                                1.0, -1024.0, "venous")
        with self.assertRaises(InputError) as ctx:
            read_ct(folder)
        message = str(ctx.exception)
        for text in (uid_a, uid_b, "arterial", "venous", "4 slices", "3 slices"):
            self.assertIn(text, message)
        ct_b = read_ct(folder, series_uid=uid_b)
        self.assertEqual(ct_b.voxels.shape, (3, 5, 6))
        np.testing.assert_array_equal(ct_b.voxels, self.hu[:3] + 10)
        with self.assertRaises(InputError):
            read_ct(folder, series_uid="1.2.3.4")

    def test_folder_without_dicom(self):
        (self.dir / "empty").mkdir()
        with self.assertRaises(InputError) as ctx:
            read_ct(self.dir / "empty")
        self.assertIn("no readable DICOM", str(ctx.exception))


@unittest.skipUnless((DATA / "case_01/image.nii.gz").exists(), "shared 3D-IRCADb case not present")
class RealCaseTest(unittest.TestCase):
    def test_ircadb_case_01(self):
        ct = read_ct(DATA / "case_01/image.nii.gz")
        self.assertEqual(ct.name, "image")
        self.assertEqual(ct.voxels.shape, (129, 512, 512))
        self.assertEqual(ct.voxels.dtype, np.int16)
        self.assertEqual((int(ct.voxels.min()), int(ct.voxels.max())), (-1024, 1023))
        np.testing.assert_allclose(ct.ijk_to_ras, np.diag([-0.57, -0.57, 1.6, 1.0]), atol=1e-6)


if __name__ == "__main__":
    unittest.main()
