"""Lesion table, CSV/JSON exports and the overview PNG, written to real files."""

import csv
import json
import os
import tempfile
import unittest
from pathlib import Path

import numpy as np
from PIL import Image

from liverlesionai.lesions import build_lesion_records
from liverlesionai.records import LESION_TYPE_COLORS, LIVER_COLOR, LesionRecord, SegmentationResult
from liverlesionai.report import (
    LEGEND_PX,
    PANEL_PX,
    TITLE_PX,
    ReportWriteError,
    format_lesion_table,
    render_overview_png,
    write_lesions_csv,
    write_lesions_json,
)


def rgb255(color):
    return tuple(int(round(c * 255)) for c in color)


def record(lesion_id, lesion_type="metastasis", p=0.8):
    probs = {"cyst": 0.0, "hemangioma": 0.0, "metastasis": 0.0}
    probs[lesion_type] = p
    other = next(t for t in probs if t != lesion_type)
    probs[other] = 1 - p
    return LesionRecord(lesion_id, lesion_type, probs, voxel_count=1200, volume_ml=1.5,
                        long_axis_mm=18.25, short_axis_mm=11.0, centroid_ras=(1.0, -2.5, 30.0),
                        mean_hu=45.5, std_hu=12.0, slice_range=(10, 22))


# Physical phantom (RAS mm, relative to the liver centre): liver ellipsoid, a 22 mm metastasis on the
# patient's right and an 12 mm cyst on the left and anterior.
LIVER_CENTRE = np.array([5.0, -10.0, 40.0])
METASTASIS = np.array([30.0, 0.0, 0.0])
CYST = np.array([-30.0, 20.0, 8.0])


def phantom(direction, spacing=(1.5, 1.5, 1.5), half=(75.0, 75.0, 60.0)):
    """(hu, liver parenchyma, instances, ijk_to_ras) of the phantom sampled on an oriented grid."""
    direction = np.asarray(direction, dtype=float)
    spacing = np.asarray(spacing, dtype=float)
    # Grid extent along each ijk axis: the half-size of the RAS axis it runs along.
    n = np.ceil(np.asarray(half)[np.argmax(np.abs(direction), axis=0)] / spacing).astype(int)
    m = np.eye(4)
    m[:3, :3] = direction @ np.diag(spacing)
    m[:3, 3] = LIVER_CENTRE - m[:3, :3] @ n
    k, j, i = np.indices(tuple(2 * n[::-1] + 1)).astype(float)
    offset = (m[:3, 3] - LIVER_CENTRE)[:, None, None, None]
    r, a, s = np.tensordot(m[:3, :3], np.stack([i, j, k]), axes=1) + offset
    body = (r / 70) ** 2 + (a / 70) ** 2 <= 1
    liver = (r / 55) ** 2 + (a / 45) ** 2 + (s / 40) ** 2 <= 1
    met = (r - METASTASIS[0]) ** 2 + (a - METASTASIS[1]) ** 2 + (s - METASTASIS[2]) ** 2 <= 11**2
    cyst = (r - CYST[0]) ** 2 + (a - CYST[1]) ** 2 + (s - CYST[2]) ** 2 <= 6**2
    hu = np.where(body, 0, -1000).astype(np.int16)
    hu[liver] = 60
    hu[met] = 30
    hu[cyst] = 5
    instances = np.zeros(hu.shape, np.uint16)
    instances[met & liver] = 1
    instances[cyst & liver] = 2
    parenchyma = (liver & (instances == 0)).astype(np.uint8)
    return hu, parenchyma, instances, m


def result_for(hu, parenchyma, instances, m):
    probs = {1: {"metastasis": 0.9, "cyst": 0.05, "hemangioma": 0.05},
             2: {"cyst": 0.7, "hemangioma": 0.2, "metastasis": 0.1}}
    probs = {k: v for k, v in probs.items() if (instances == k).any()}
    records = build_lesion_records(hu, instances, m, probs)
    return SegmentationResult(parenchyma, instances, records, m, liver_volume_ml=412.0,
                              messages=["ok"], model_version="test-1")


class TableTest(unittest.TestCase):
    def test_table(self):
        text = format_lesion_table([record(1), record(12, "cyst", 0.55)])
        lines = text.splitlines()
        self.assertEqual(len(lines), 4)
        self.assertIn("Vol mL", lines[0])
        self.assertEqual(len({len(line) for line in lines}), 1, "columns must line up")
        self.assertIn("metastasis", lines[2])
        self.assertIn("0.80", lines[2])
        self.assertIn("18.2", lines[2])
        self.assertIn("10-22", lines[2])
        self.assertIn("cyst", lines[3])
        self.assertEqual(format_lesion_table([]), "No liver lesions found.")


class ExportTest(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self._tmp.name)

    def tearDown(self):
        self._tmp.cleanup()

    def test_csv_roundtrip_and_no_overwrite(self):
        path = self.dir / "lesions.csv"
        write_lesions_csv(path, [record(1), record(2, "hemangioma", 0.6)])
        rows = list(csv.DictReader(path.open()))
        self.assertEqual([r["lesion_id"] for r in rows], ["1", "2"])
        self.assertEqual(rows[1]["lesion_type"], "hemangioma")
        self.assertAlmostEqual(float(rows[1]["p_hemangioma"]), 0.6)
        self.assertEqual((rows[0]["first_slice"], rows[0]["last_slice"]), ("10", "22"))
        self.assertAlmostEqual(float(rows[0]["centroid_a"]), -2.5)
        before = path.read_bytes()
        with self.assertRaisesRegex(ReportWriteError, "already exists"):
            write_lesions_csv(path, [])
        self.assertEqual(path.read_bytes(), before)
        write_lesions_csv(path, [], overwrite=True)
        self.assertEqual(len(path.read_text().splitlines()), 1)
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), ["lesions.csv"], "no temp files left")
        umask = os.umask(0)
        os.umask(umask)
        self.assertEqual(path.stat().st_mode & 0o777, 0o666 & ~umask, "the user's usual permissions, not 0600")
        with self.assertRaisesRegex(ReportWriteError, "does not exist"):
            write_lesions_csv(self.dir / "missing" / "x.csv", [])

    def test_json_fields_and_extra(self):
        res = SegmentationResult(np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 2), np.uint16),
                                 [record(1), record(2, "cyst")], np.eye(4), liver_volume_ml=1500.5,
                                 messages=["Low contrast."], model_version="v3")
        path = self.dir / "result.json"
        write_lesions_json(path, res, extra={"case": "patient 7", "input": "/data/ct.nrrd"})
        doc = json.loads(path.read_text())
        self.assertEqual(doc["model_version"], "v3")
        self.assertEqual(doc["liver_volume_ml"], 1500.5)
        self.assertEqual(doc["messages"], ["Low contrast."])
        self.assertEqual(doc["case"], "patient 7")
        self.assertEqual([LesionRecord.from_dict(d) for d in doc["lesions"]], res.lesions)
        with self.assertRaises(ReportWriteError):
            write_lesions_json(path, res)
        with self.assertRaisesRegex(ValueError, "replace standard fields"):
            write_lesions_json(self.dir / "other.json", res, extra={"lesions": []})
        self.assertFalse((self.dir / "other.json").exists())


class OverviewPngTest(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self._tmp.name)

    def tearDown(self):
        self._tmp.cleanup()

    def render(self, direction, name, **phantom_kw):
        hu, parenchyma, instances, m = phantom(direction, **phantom_kw)
        res = result_for(hu, parenchyma, instances, m)
        path = render_overview_png(self.dir / name, hu, m, res, case_name="phantom")
        return np.asarray(Image.open(path).convert("RGB")), res

    @staticmethod
    def colour_pixels(img, colour):
        return np.all(img == np.array(colour, dtype=np.uint8), axis=-1)

    def test_panels_colours_and_radiological_layout(self):
        img, res = self.render(np.eye(3), "axial.png")
        self.assertEqual(len(res.lesions), 2)
        self.assertEqual(img.shape, (TITLE_PX + 2 * PANEL_PX + LEGEND_PX, 2 * PANEL_PX, 3))  # 2 lesions
        met_colour = rgb255(LESION_TYPE_COLORS["metastasis"])
        cyst_colour = rgb255(LESION_TYPE_COLORS["cyst"])
        # Row 1 = largest lesion (the metastasis): its outline in the axial panel lies on the image
        # left (patient right), and in the coronal panel too; the cyst does not cross that plane.
        axial = img[TITLE_PX:TITLE_PX + PANEL_PX, :PANEL_PX]
        coronal = img[TITLE_PX:TITLE_PX + PANEL_PX, PANEL_PX:]
        for panel in (axial, coronal):
            ys, xs = np.nonzero(self.colour_pixels(panel[:PANEL_PX - 24], met_colour))
            self.assertGreater(xs.size, 40)
            self.assertLess(xs.mean(), PANEL_PX / 2 - 10)
            self.assertGreater(self.colour_pixels(panel, rgb255(LIVER_COLOR)).sum(), 200)
            # Outline, not fill: the lesion centre keeps its grey CT value.
            cy, cx = int(np.median(ys)), int(np.median(xs))
            self.assertEqual(len(set(panel[cy, cx].tolist())), 1, "lesion interior must stay grey")
        # Row 2 = the cyst (patient left, anterior): image right, upper half of the axial panel.
        axial2 = img[TITLE_PX + PANEL_PX:TITLE_PX + 2 * PANEL_PX, :PANEL_PX]
        ys, xs = np.nonzero(self.colour_pixels(axial2[:PANEL_PX - 24], cyst_colour))
        self.assertGreater(xs.size, 20)
        self.assertGreater(xs.mean(), PANEL_PX / 2 + 10)
        self.assertLess(ys.mean(), PANEL_PX / 2)
        # Legend swatches.
        legend = img[-LEGEND_PX:]
        for colour in (LIVER_COLOR, *LESION_TYPE_COLORS.values()):
            self.assertGreater(self.colour_pixels(legend, rgb255(colour)).sum(), 100)

    def test_same_picture_for_any_orientation(self):
        reference, _ = self.render(np.eye(3), "ref.png")
        permuted_flipped = np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], dtype=float)  # sagittal, LPS-like
        for name, direction in [("lps", np.diag([-1.0, -1.0, 1.0])), ("sag", permuted_flipped)]:
            with self.subTest(orientation=name):
                img, _ = self.render(direction, f"{name}.png")
                self.assertEqual(img.shape, reference.shape)
                body = slice(TITLE_PX, TITLE_PX + 2 * PANEL_PX)
                diff = np.abs(img[body].astype(int) - reference[body].astype(int)).max(axis=-1)
                self.assertLess((diff > 40).mean(), 0.01, "views must not depend on voxel order")

    def test_no_lesion_single_row_and_no_overwrite(self):
        hu, parenchyma, instances, m = phantom(np.eye(3))
        res = SegmentationResult(parenchyma | (instances > 0), np.zeros_like(instances), [], m,
                                 liver_volume_ml=400.0)
        path = render_overview_png(self.dir / "none.png", hu, m, res)
        img = np.asarray(Image.open(path).convert("RGB"))
        self.assertEqual(img.shape, (TITLE_PX + PANEL_PX + LEGEND_PX, 2 * PANEL_PX, 3))
        self.assertGreater(self.colour_pixels(img[TITLE_PX:-LEGEND_PX], rgb255(LIVER_COLOR)).sum(), 200)
        with self.assertRaisesRegex(ReportWriteError, "already exists"):
            render_overview_png(path, hu, m, res)
        with self.assertRaisesRegex(ValueError, "same size"):
            render_overview_png(self.dir / "bad.png", hu[:-1], m, res)
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), ["none.png"])
