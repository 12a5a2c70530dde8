"""segfile + terminology: .seg.nrrd written without Slicer, checked with Slicer's own MRML (slicer-core).

Voxels are compared as sets of RAS positions per segment (Slicer's reader may reverse slice order for
left-handed geometry), never by raw index order.
"""

import json
import math
import unittest
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from liverlesionai import terminology
from liverlesionai.errors import InputError, OutputError
from liverlesionai.records import LESION_TYPE_COLORS, LIVER_COLOR, LesionRecord, SegmentationResult
from liverlesionai.segfile import read_seg_nrrd, write_seg_nrrd


def rotation(axis, degrees):
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [n for n in range(3) if n != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def geometry(axes, origin=(-30.0, 12.5, 250.75)):
    m = np.eye(4)
    m[:3, :3] = axes
    m[:3, 3] = origin
    return m


SPACING = np.diag([0.8, 0.75, 2.0])
GEOMETRIES = {
    "ras-like": geometry(np.diag([-1.0, -1.0, 1.0]) @ SPACING),
    "left-handed": geometry(np.diag([1.0, -1.0, 1.0]) @ SPACING),
    "permuted": geometry(np.array([[0, 0, 1.0], [-1.0, 0, 0], [0, -1.0, 0]]) @ SPACING),
    "oblique left-handed": geometry(rotation(1, 23) @ rotation(2, 40) @ np.diag([1, 1, -1]) @ SPACING),
}


def to_matrix(vtk_matrix):
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ras_points(mask, ijk_to_ras, ijk_start=(0, 0, 0)):
    """Sorted RAS positions of the voxels of a [k, j, i] mask."""
    k, j, i = np.nonzero(mask)
    ijk = np.stack([i + ijk_start[0], j + ijk_start[1], k + ijk_start[2], np.ones_like(i)]).astype(float)
    points = np.round((ijk_to_ras @ ijk)[:3].T, 4)
    return points[np.lexsort(points.T[::-1])]


def lesion(lesion_id, lesion_type, probabilities, review="unreviewed"):
    return LesionRecord(lesion_id=lesion_id, lesion_type=lesion_type, probabilities=probabilities, voxel_count=0,
                        volume_ml=0.0, long_axis_mm=12.25, short_axis_mm=7.5, centroid_ras=(0.0, 0.0, 0.0),
                        mean_hu=43.5, std_hu=11.25, slice_range=(0, 0), review_status=review)


def make_result(ijk_to_ras, shape=(9, 11, 13)):
    liver = np.zeros(shape, np.uint8)
    liver[1:8, 2:10, 1:12] = 1
    instances = np.zeros(shape, np.uint16)
    instances[2:4, 3:6, 2:5] = 3
    instances[5:7, 7:9, 8:11] = 12
    instances[8, 10, 12] = 4  # one voxel, outside the liver's bounding box
    liver[instances > 0] = 0
    lesions = [
        lesion(3, "metastasis", {"cyst": 0.05, "hemangioma": 0.08, "metastasis": 0.87}),
        lesion(12, "cyst", {"cyst": 0.9, "hemangioma": 0.06, "metastasis": 0.04}, review="confirmed"),
        lesion(4, "hemangioma", {"cyst": 0.1, "hemangioma": 0.7, "metastasis": 0.2}, review="rejected"),
    ]
    voxel_ml = abs(np.linalg.det(ijk_to_ras[:3, :3])) / 1000
    for rec in lesions:
        mask = instances == rec.lesion_id
        k, j, i = np.nonzero(mask)
        rec.voxel_count = int(mask.sum())
        rec.volume_ml = rec.voxel_count * voxel_ml
        rec.centroid_ras = tuple((ijk_to_ras @ [i.mean(), j.mean(), k.mean(), 1])[:3])
        rec.slice_range = (int(k.min()), int(k.max()))
    return SegmentationResult(liver_mask=liver, lesion_instances=instances, lesions=lesions, ijk_to_ras=ijk_to_ras,
                              liver_volume_ml=float(((liver > 0) | (instances > 0)).sum()) * voxel_ml,
                              messages=[], model_version="liverlesionai-test 1.0")


def slicer_read(path):
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    return scene, node


def slicer_segment_points(node, segment_id):
    image = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation(segment_id, image)
    ext = image.GetExtent()
    if ext[1] < ext[0]:
        return np.zeros((0, 3))
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    array = array.reshape(ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return ras_points(array > 0, to_matrix(matrix), (ext[0], ext[2], ext[4]))


class TerminologyTest(unittest.TestCase):
    def test_entry_strings(self):
        self.assertEqual(
            terminology.terminology_entry_string("cyst"),
            "Segmentation category and type - LiverLesionAI~SCT^49755003^Morphologically Altered Structure"
            "~SCT^367643001^Cyst~^^~Anatomic codes - DICOM master list~SCT^10200004^Liver~^^")
        self.assertEqual(
            terminology.terminology_entry_string("liver"),
            "Segmentation category and type - LiverLesionAI~SCT^123037004^Anatomical Structure"
            "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")
        self.assertIn("SCT^14799000^Neoplasm, Secondary", terminology.terminology_entry_string("metastasis"))
        with self.assertRaises(ValueError):
            terminology.terminology_entry_string("tumour")
        for kind in terminology.KINDS:
            self.assertEqual(terminology.kind_from_terminology_string(terminology.terminology_entry_string(kind)), kind)

    def test_context_file_is_up_to_date(self):
        on_disk = json.loads(terminology.TERMINOLOGY_FILE.read_text(encoding="utf-8"))
        self.assertEqual(on_disk, terminology.build_terminology_context())

    def test_slicer_loads_context_and_finds_every_type(self):
        logic = slicer.vtkSlicerTerminologiesModuleLogic()
        name = logic.LoadTerminologyFromFile(str(terminology.TERMINOLOGY_FILE))
        self.assertEqual(name, terminology.CONTEXT_NAME)
        found = {}
        category = slicer.vtkSlicerTerminologyCategory()
        seg_type = slicer.vtkSlicerTerminologyType()
        for c in range(logic.GetNumberOfCategoriesInTerminology(name)):
            self.assertTrue(logic.GetNthCategoryInTerminology(name, c, category))
            for t in range(logic.GetNumberOfTypesInTerminologyCategory(name, category)):
                self.assertTrue(logic.GetNthTypeInTerminologyCategory(name, category, t, seg_type))
                found[(seg_type.GetCodingSchemeDesignator(), seg_type.GetCodeValue())] = (
                    category.GetCodeValue(), tuple(seg_type.GetRecommendedDisplayRGBValue()))
        palette = {"liver": LIVER_COLOR, **LESION_TYPE_COLORS}
        for kind, color in palette.items():
            code = terminology.type_code(kind)
            self.assertIn((code.scheme, code.value), found, kind)
            category_value, rgb = found[(code.scheme, code.value)]
            self.assertEqual(category_value, terminology.category_code(kind).value)
            self.assertEqual(rgb, tuple(int(round(v * 255)) for v in color))
        for kind in terminology.KINDS:  # Slicer parses and re-serializes our strings unchanged
            entry = slicer.vtkSlicerTerminologyEntry()
            serialized = terminology.terminology_entry_string(kind)
            self.assertTrue(logic.DeserializeTerminologyEntry(serialized, entry))
            self.assertEqual(entry.GetTypeObject().GetCodeValue(), terminology.type_code(kind).value)
            self.assertEqual(logic.SerializeTerminologyEntry(entry), serialized)


class WriteSegNrrdTest(unittest.TestCase):
    def setUp(self):
        self.tmp = TemporaryDirectory()
        self.dir = Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def test_slicer_reads_what_we_write(self):
        for label, m in GEOMETRIES.items():
            with self.subTest(geometry=label):
                result = make_result(m)
                path = write_seg_nrrd(self.dir / f"{label}.seg.nrrd", result)
                scene, node = slicer_read(path)
                segmentation = node.GetSegmentation()
                ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
                self.assertEqual(ids, ["liver", "lesion_3", "lesion_12", "lesion_4"])

                liver = segmentation.GetSegment("liver")
                self.assertEqual(liver.GetName(), "Liver")
                np.testing.assert_allclose(liver.GetColor(), LIVER_COLOR, atol=1e-9)
                self.assertEqual(liver.GetTerminology(), terminology.terminology_entry_string("liver"))
                np.testing.assert_array_equal(slicer_segment_points(node, "liver"),
                                              ras_points(result.liver_mask > 0, m))

                for rec in result.lesions:
                    segment = segmentation.GetSegment(f"lesion_{rec.lesion_id}")
                    self.assertEqual(segment.GetName(), rec.display_name)
                    self.assertFalse(segment.GetNameAutoGenerated())
                    self.assertFalse(segment.GetColorAutoGenerated())
                    np.testing.assert_allclose(segment.GetColor(), LESION_TYPE_COLORS[rec.lesion_type], atol=1e-9)
                    self.assertEqual(segment.GetTerminology(), terminology.terminology_entry_string(rec.lesion_type))
                    self.assertEqual(self.tag(segment, "Type"), rec.lesion_type)
                    self.assertEqual(self.tag(segment, "LesionId"), str(rec.lesion_id))
                    self.assertEqual(self.tag(segment, "ReviewStatus"), rec.review_status)
                    self.assertEqual(self.tag(segment, "ModelVersion"), "liverlesionai-test 1.0")
                    self.assertEqual(float(self.tag(segment, "LongAxisMm")), 12.25)
                    self.assertEqual(float(self.tag(segment, "MeanHU")), 43.5)
                    self.assertAlmostEqual(float(self.tag(segment, "VolumeMl")), rec.volume_ml, places=5)
                    probabilities = dict(p.split("=") for p in self.tag(segment, "Probabilities").split(","))
                    self.assertEqual({k: float(v) for k, v in probabilities.items()}, rec.probabilities)
                    np.testing.assert_array_equal(slicer_segment_points(node, f"lesion_{rec.lesion_id}"),
                                                  ras_points(result.lesion_instances == rec.lesion_id, m))
                self.assertEqual(self.tag(segmentation.GetSegment("lesion_3"), "Probabilities"),
                                 "cyst=0.05,hemangioma=0.08,metastasis=0.87")

                # The reference geometry Slicer recovers is the input volume's.
                logic = slicer.vtkSlicerSegmentationsModuleLogic()
                logic.SetMRMLScene(scene)
                labelmap = slicer.vtkMRMLLabelMapVolumeNode()
                scene.AddNode(labelmap)
                self.assertTrue(logic.ExportAllSegmentsToLabelmapNode(node, labelmap, 0))
                matrix = vtk.vtkMatrix4x4()
                labelmap.GetIJKToRASMatrix(matrix)
                exported = numpy_support.vtk_to_numpy(labelmap.GetImageData().GetPointData().GetScalars())
                exported = exported.reshape(labelmap.GetImageData().GetDimensions()[::-1])
                ext = labelmap.GetImageData().GetExtent()
                np.testing.assert_array_equal(ras_points(exported > 0, to_matrix(matrix), ext[0::2]),
                                              ras_points((result.liver_mask > 0) | (result.lesion_instances > 0), m))

    @staticmethod
    def tag(segment, key):
        value = vtk.reference("")
        return str(value) if segment.GetTag(f"LiverLesionAI.{key}", value) else None

    def test_lesions_without_liver_and_empty_result(self):
        m = GEOMETRIES["left-handed"]
        result = make_result(m)
        result.liver_mask[:] = 0  # no liver found: lesions must still be in the file
        path = write_seg_nrrd(self.dir / "noliver.seg.nrrd", result)
        _, node = slicer_read(path)
        np.testing.assert_array_equal(slicer_segment_points(node, "lesion_12"),
                                      ras_points(result.lesion_instances == 12, m))
        back = read_seg_nrrd(path)
        np.testing.assert_array_equal(back.lesion_instances, result.lesion_instances)
        self.assertEqual(back.liver_volume_ml, 0.0)

        empty = SegmentationResult(liver_mask=np.zeros((3, 4, 5), np.uint8),
                                   lesion_instances=np.zeros((3, 4, 5), np.uint16), lesions=[], ijk_to_ras=m)
        path = write_seg_nrrd(self.dir / "empty.seg.nrrd", empty)
        _, node = slicer_read(path)
        self.assertEqual(node.GetSegmentation().GetNumberOfSegments(), 1)
        back = read_seg_nrrd(path)
        self.assertEqual((back.lesions, int(back.liver_mask.sum())), ([], 0))
        np.testing.assert_allclose(back.ijk_to_ras, m)

    def test_round_trip_through_our_reader(self):
        for label, m in GEOMETRIES.items():
            with self.subTest(geometry=label):
                result = make_result(m)
                back = read_seg_nrrd(write_seg_nrrd(self.dir / f"{label}.seg.nrrd", result))
                self.assertEqual(back.messages, [])
                self.assertEqual(back.model_version, result.model_version)
                np.testing.assert_allclose(back.ijk_to_ras, m, atol=1e-12)
                np.testing.assert_array_equal(back.liver_mask, result.liver_mask)
                np.testing.assert_array_equal(back.lesion_instances, result.lesion_instances)
                self.assertAlmostEqual(back.liver_volume_ml, result.liver_volume_ml, places=9)
                self.assertEqual(len(back.lesions), 3)
                for got, want in zip(back.lesions, sorted(result.lesions, key=lambda r: r.lesion_id)):
                    self.assertEqual(got.lesion_id, want.lesion_id)
                    self.assertEqual(got.lesion_type, want.lesion_type)
                    self.assertEqual(got.probabilities, want.probabilities)
                    self.assertEqual(got.review_status, want.review_status)
                    self.assertEqual(got.voxel_count, want.voxel_count)
                    self.assertEqual(got.slice_range, want.slice_range)
                    self.assertEqual((got.long_axis_mm, got.short_axis_mm, got.mean_hu, got.std_hu),
                                     (want.long_axis_mm, want.short_axis_mm, want.mean_hu, want.std_hu))
                    self.assertAlmostEqual(got.volume_ml, want.volume_ml, places=9)
                    np.testing.assert_allclose(got.centroid_ras, want.centroid_ras, atol=1e-9)

    def test_overwrite_and_bad_input(self):
        result = make_result(GEOMETRIES["ras-like"])
        path = write_seg_nrrd(self.dir / "a.seg.nrrd", result)
        before = path.read_bytes()
        with self.assertRaises(OutputError):
            write_seg_nrrd(path, result)
        self.assertEqual(path.read_bytes(), before)
        write_seg_nrrd(path, result, overwrite=True)
        self.assertEqual([p.name for p in self.dir.iterdir()], ["a.seg.nrrd"])

        orphan = make_result(GEOMETRIES["ras-like"])
        orphan.lesions = orphan.lesions[:2]  # lesion 4 has voxels but no record
        with self.assertRaises(ValueError):
            write_seg_nrrd(self.dir / "b.seg.nrrd", orphan)
        self.assertFalse((self.dir / "b.seg.nrrd").exists())

        data = path.read_bytes()
        (self.dir / "cut.seg.nrrd").write_bytes(data[: len(data) - 40])
        with self.assertRaises(InputError) as ctx:
            read_seg_nrrd(self.dir / "cut.seg.nrrd")
        self.assertIn("cut.seg.nrrd", str(ctx.exception))
        with self.assertRaises(InputError):
            read_seg_nrrd(self.dir / "missing.seg.nrrd")


class ReadSlicerWrittenTest(unittest.TestCase):
    """Files saved by Slicer itself (after a user's edits) are read back correctly."""

    def setUp(self):
        self.tmp = TemporaryDirectory()
        self.dir = Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def write_with_slicer(self, labels, ijk_to_ras, segments, crop=False, overlap=None):
        """labels: [k, j, i] int array; segments: [(label value, name, tags)]."""
        scene = slicer.vtkMRMLScene()
        labelmap = slicer.vtkMRMLLabelMapVolumeNode()
        scene.AddNode(labelmap)
        image = vtk.vtkImageData()
        image.SetDimensions(*labels.shape[::-1])
        image.AllocateScalars(vtk.VTK_SHORT, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = labels.ravel()
        labelmap.SetAndObserveImageData(image)
        matrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, ijk_to_ras[r, c])
        labelmap.SetIJKToRASMatrix(matrix)
        node = slicer.vtkMRMLSegmentationNode()
        scene.AddNode(node)
        node.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLScene(scene)
        self.assertTrue(logic.ImportLabelmapToSegmentationNode(labelmap, node, ""))
        segmentation = node.GetSegmentation()
        by_label = {}
        for n in range(segmentation.GetNumberOfSegments()):
            sid = segmentation.GetNthSegmentID(n)
            by_label[segmentation.GetSegment(sid).GetLabelValue()] = sid
        for value, name, tags in segments:
            segment = segmentation.GetSegment(by_label[value])
            segment.SetName(name)
            for key, tag_value in tags.items():
                segment.SetTag(key, tag_value)
        if overlap is not None:  # paint a segment that overlaps another: Slicer then writes two layers
            sid = segmentation.AddEmptySegment("extra", "Lesion 40")
            mask = overlap.astype(np.uint8)
            oriented = slicer.vtkOrientedImageData()
            oriented.SetDimensions(*mask.shape[::-1])
            oriented.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars())[:] = mask.ravel()
            oriented.SetImageToWorldMatrix(matrix)
            self.assertTrue(slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                oriented, node, sid, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE))
        storage = slicer.vtkMRMLSegmentationStorageNode()
        scene.AddNode(storage)
        storage.SetCropToMinimumExtent(crop)
        path = self.dir / f"slicer-{len(list(self.dir.iterdir()))}.seg.nrrd"
        storage.SetFileName(str(path))
        self.assertTrue(storage.WriteData(node))
        return path, node

    def test_edited_file_with_and_without_our_tags(self):
        for label, m in GEOMETRIES.items():
            for crop in (False, True):
                with self.subTest(geometry=label, crop=crop):
                    labels = np.zeros((8, 10, 12), np.int16)
                    labels[1:7, 1:9, 1:11] = 1
                    labels[2:4, 2:5, 2:6] = 2
                    labels[5, 6:8, 7:9] = 3
                    labels[6, 1:3, 1:3] = 4
                    tags = {"LiverLesionAI.Type": "cyst", "LiverLesionAI.LesionId": "7",
                            "LiverLesionAI.Probabilities": "cyst=0.6,hemangioma=0.3,metastasis=0.1",
                            "LiverLesionAI.ReviewStatus": "confirmed", "LiverLesionAI.MeanHU": "5",
                            "LiverLesionAI.ModelVersion": "v9"}
                    path, _ = self.write_with_slicer(labels, m, [
                        (1, "Liver", {}),
                        (2, "Lesion 7 – cyst (0.60)", tags),
                        (3, "Lesion 5 \u2013 hemangioma (0.70)", {}),  # a user's segment, no tags
                        (4, "Portal vein", {}),
                    ], crop=crop)
                    result = read_seg_nrrd(path)
                    self.assertEqual(result.liver_mask.shape, labels.shape)
                    np.testing.assert_allclose(result.ijk_to_ras, m, atol=1e-6)
                    np.testing.assert_array_equal(ras_points(result.liver_mask > 0, result.ijk_to_ras),
                                                  ras_points(labels == 1, m))
                    np.testing.assert_array_equal(ras_points(result.lesion_instances == 7, result.ijk_to_ras),
                                                  ras_points(labels == 2, m))
                    np.testing.assert_array_equal(ras_points(result.lesion_instances == 5, result.ijk_to_ras),
                                                  ras_points(labels == 3, m))
                    self.assertEqual(set(np.unique(result.lesion_instances)), {0, 5, 7})
                    by_id = {rec.lesion_id: rec for rec in result.lesions}
                    self.assertEqual(by_id[7].lesion_type, "cyst")
                    self.assertEqual(by_id[7].probabilities, {"cyst": 0.6, "hemangioma": 0.3, "metastasis": 0.1})
                    self.assertEqual(by_id[7].review_status, "confirmed")
                    self.assertEqual(by_id[7].mean_hu, 5.0)
                    self.assertTrue(math.isnan(by_id[7].long_axis_mm))
                    self.assertEqual(by_id[7].voxel_count, int((labels == 2).sum()))
                    self.assertEqual(by_id[5].lesion_type, "hemangioma")
                    self.assertEqual(by_id[5].probabilities, {"hemangioma": 0.7})
                    self.assertEqual(result.model_version, "v9")
                    self.assertTrue(any("Portal vein" in msg for msg in result.messages))
                    self.assertTrue(any("no LiverLesionAI tags" in msg for msg in result.messages))

    def test_multi_layer_file(self):
        m = GEOMETRIES["oblique left-handed"]
        labels = np.zeros((6, 7, 8), np.int16)
        labels[1:5, 1:6, 1:7] = 1
        labels[2:4, 2:4, 2:4] = 2
        overlap = np.zeros(labels.shape, bool)
        overlap[1:3, 3:5, 5:7] = True  # over liver (and nothing else)
        path, _ = self.write_with_slicer(labels, m, [(1, "Liver", {}), (2, "Lesion 2", {})],
                                         overlap=overlap)
        header = path.read_bytes().split(b"\n\n", 1)[0].decode()
        self.assertIn("dimension: 4", header)  # Slicer really wrote two layers
        result = read_seg_nrrd(path)
        np.testing.assert_array_equal(ras_points(result.lesion_instances == 40, result.ijk_to_ras),
                                      ras_points(overlap, m))
        np.testing.assert_array_equal(ras_points(result.lesion_instances == 2, result.ijk_to_ras),
                                      ras_points(labels == 2, m))
        # Liver holds parenchyma only: the overlapping lesion is taken out of it.
        np.testing.assert_array_equal(ras_points(result.liver_mask > 0, result.ijk_to_ras),
                                      ras_points((labels == 1) & ~overlap, m))
        by_id = {rec.lesion_id: rec for rec in result.lesions}
        self.assertEqual((by_id[2].lesion_type, by_id[2].probabilities), ("", {}))


if __name__ == "__main__":
    unittest.main()
