"""Evaluation metrics on constructed cases with known answers."""

import json
import unittest

import numpy as np

from liverlesionai.evaluation import aggregate, dice, evaluate_case, lesion_conspicuity, match_lesions

SHAPE = (40, 64, 64)  # [k, j, i], 1 mm voxels
GEOMETRY = np.eye(4)


def ball(centre_kji, diameter_mm):
    k, j, i = np.indices(SHAPE)
    c = np.asarray(centre_kji)
    return (k - c[0]) ** 2 + (j - c[1]) ** 2 + (i - c[2]) ** 2 <= (diameter_mm / 2) ** 2


# Reference lesions: id -> (centre, diameter, type); one per size bin.
GT_LESIONS = {
    1: ((20, 20, 20), 24.0, "metastasis"),  # > 20 mm
    2: ((20, 45, 45), 14.0, "hemangioma"),  # 10-20 mm
    3: ((20, 20, 50), 6.0, "cyst"),  # < 10 mm
}


def make_case(lesions: dict) -> dict:
    liver = np.zeros(SHAPE, dtype=np.uint8)
    liver[5:35, 5:60, 5:60] = 1
    instances = np.zeros(SHAPE, dtype=np.uint16)
    types = {}
    for lid, (centre, d, t) in lesions.items():
        instances[ball(centre, d)] = lid
        types[lid] = t
    liver[instances != 0] = 0  # parenchyma excludes lesions, as the engine returns it
    return {"liver_mask": liver, "lesion_instances": instances, "lesion_types": types}


class DiceTest(unittest.TestCase):
    def test_values(self):
        a = np.zeros((4, 4, 4), bool)
        b = np.zeros((4, 4, 4), bool)
        self.assertEqual(dice(a, b), 1.0)
        a[0, 0, :2] = True
        self.assertEqual(dice(a, b), 0.0)
        b[0, 0, 1:4] = True
        self.assertAlmostEqual(dice(a, b), 2 * 1 / (2 + 3))
        with self.assertRaisesRegex(ValueError, "different sizes"):
            dice(a, np.zeros((4, 4, 5), bool))


class MatchLesionsTest(unittest.TestCase):
    def test_greedy_one_to_one_and_small_lesion_coverage(self):
        gt = np.zeros(SHAPE, np.uint16)
        gt[ball((20, 20, 20), 12)] = 1
        gt[ball((20, 20, 34), 12)] = 2
        gt[ball((20, 50, 50), 4)] = 3  # small, inside a much larger prediction
        pred = np.zeros(SHAPE, np.uint16)
        pred[15:26, 14:27, 14:38] = 7  # covers GT 1 and most of GT 2
        pred[ball((20, 50, 50), 16)] = 8  # IoU with GT 3 well below 0.1, but covers all of it
        result = match_lesions(pred, gt, small_gt_ids=[3])
        pairs = {(m["pred_id"], m["gt_id"]) for m in result["matches"]}
        self.assertEqual(len(pairs), 2)
        self.assertIn((8, 3), pairs)
        self.assertEqual(len({p for p, _ in pairs}), 2)  # prediction 7 matched only once
        self.assertEqual(len(result["unmatched_gt"]), 1)
        # Without the small-lesion rule the over-segmented small lesion is not detected.
        strict = match_lesions(pred, gt)
        self.assertNotIn((8, 3), {(m["pred_id"], m["gt_id"]) for m in strict["matches"]})
        self.assertIn(8, strict["unmatched_pred"])

    def test_empty_maps(self):
        empty = np.zeros(SHAPE, np.uint16)
        self.assertEqual(match_lesions(empty, empty),
                         {"matches": [], "unmatched_pred": [], "unmatched_gt": []})


class EvaluateCaseTest(unittest.TestCase):
    def test_perfect_prediction(self):
        gt = make_case(GT_LESIONS)
        res = evaluate_case(make_case(GT_LESIONS), gt, GEOMETRY, case_id="perfect")
        self.assertEqual(res["liver_dice"], 1.0)
        self.assertEqual(res["lesion_dice"], 1.0)
        self.assertEqual(res["detection"], {"tp": 3, "fp": 0, "fn": 0})
        for size_bin in ("<10mm", "10-20mm", ">20mm"):
            self.assertEqual(res["detection_by_size"][size_bin], {"tp": 1, "fp": 0, "fn": 0})
        self.assertEqual(res["type_confusion"], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
        summary = aggregate([res])
        self.assertEqual(summary["detection"]["recall"], 1.0)
        self.assertEqual(summary["detection"]["f1"], 1.0)
        self.assertEqual(summary["type_accuracy"], 1.0)
        self.assertEqual(summary["global_lesion_dice"], 1.0)
        json.dumps(summary)

    def test_missed_small_lesion_wrong_type_and_false_positive(self):
        pred_lesions = {1: GT_LESIONS[1][:2] + ("cyst",), 2: GT_LESIONS[2], 5: ((8, 50, 12), 12.0, "cyst")}
        pred = make_case(pred_lesions)
        gt = make_case(GT_LESIONS)
        res = evaluate_case(pred, gt, (1.0, 1.0, 1.0))  # geometry given as spacing
        self.assertEqual(res["detection"], {"tp": 2, "fp": 1, "fn": 1})
        self.assertEqual(res["detection_by_size"]["<10mm"], {"tp": 0, "fp": 0, "fn": 1})
        self.assertEqual(res["detection_by_size"]["10-20mm"], {"tp": 1, "fp": 1, "fn": 0})
        self.assertEqual(res["detection_by_size"][">20mm"], {"tp": 1, "fp": 0, "fn": 0})
        self.assertEqual(res["missed_gt_ids"], [3])
        self.assertEqual(res["false_positive_ids"], [5])
        # GT metastasis predicted as cyst: row metastasis, column cyst.
        self.assertEqual(res["type_confusion"], [[0, 0, 0], [0, 1, 0], [1, 0, 0]])
        self.assertLess(res["lesion_dice"], 1.0)
        self.assertGreater(res["liver_dice"], 0.99)  # organ incl. lesions is almost unchanged

        summary = aggregate([res, evaluate_case(gt, gt, GEOMETRY)])
        self.assertAlmostEqual(summary["detection"]["recall"], 5 / 6)
        self.assertAlmostEqual(summary["detection_by_size"]["<10mm"]["recall"], 0.5)
        self.assertEqual(summary["detection_by_size"][">20mm"]["recall"], 1.0)
        self.assertAlmostEqual(summary["detection"]["precision"], 5 / 6)
        self.assertAlmostEqual(summary["type_accuracy"], 4 / 5)
        self.assertEqual(summary["type_confusion"]["matrix"][2][0], 1)
        self.assertEqual(summary["type_confusion"]["labels"], ["cyst", "hemangioma", "metastasis"])
        inter = sum(c["lesion_intersection_voxels"] for c in summary["cases"])
        total = sum(c["lesion_voxel_sum"] for c in summary["cases"])
        self.assertAlmostEqual(summary["global_lesion_dice"], 2 * inter / total)
        json.loads(json.dumps(summary))

    def test_unknown_gt_types_are_left_out_of_the_confusion_matrix(self):
        gt = make_case({1: ((20, 20, 20), 24.0, "tumor")})
        res = evaluate_case(make_case({1: ((20, 20, 20), 24.0, "metastasis")}), gt, GEOMETRY)
        self.assertEqual(res["detection"]["tp"], 1)
        self.assertEqual(sum(map(sum, res["type_confusion"])), 0)
        self.assertIsNone(aggregate([res])["type_accuracy"])

    def test_empty_cases(self):
        empty = make_case({})
        res = evaluate_case(empty, empty, GEOMETRY)
        self.assertEqual((res["lesion_dice"], res["liver_dice"]), (1.0, 1.0))
        self.assertEqual(res["detection"], {"tp": 0, "fp": 0, "fn": 0})
        summary = aggregate([res])
        self.assertIsNone(summary["detection"]["recall"])
        self.assertIsNone(summary["detection"]["precision"])
        self.assertEqual(summary["global_lesion_dice"], 1.0)
        # Lesions predicted where none exist: lesion Dice 0, all false positives.
        res = evaluate_case(make_case(GT_LESIONS), empty, GEOMETRY)
        self.assertEqual(res["lesion_dice"], 0.0)
        self.assertEqual(res["detection"], {"tp": 0, "fp": 3, "fn": 0})
        self.assertEqual(aggregate([res])["detection"]["precision"], 0.0)
        none = aggregate([])
        self.assertEqual(none["n_cases"], 0)
        self.assertIsNone(none["mean_liver_dice"])
        json.dumps(none)

    def test_bad_input(self):
        gt = make_case(GT_LESIONS)
        with self.assertRaisesRegex(ValueError, "missing lesion_instances"):
            evaluate_case({"liver_mask": gt["liver_mask"]}, gt, GEOMETRY)
        small = {k: (v[:, :10] if isinstance(v, np.ndarray) else v) for k, v in gt.items()}
        with self.assertRaisesRegex(ValueError, "differ in size"):
            evaluate_case(small, gt, GEOMETRY)
        with self.assertRaisesRegex(ValueError, "4x4"):
            evaluate_case(gt, gt, np.eye(3))


class LesionConspicuityTest(unittest.TestCase):
    """Contrast to the surrounding liver in units of its noise, on lesions of known HU."""

    def setUp(self):
        case = make_case({1: ((20, 20, 20), 16.0, "cyst"), 2: ((20, 45, 45), 16.0, "hemangioma"),
                          3: ((20, 20, 48), 10.0, "metastasis")})
        self.liver = (case["liver_mask"] | (case["lesion_instances"] > 0)).astype(np.uint8)
        self.instances = case["lesion_instances"]
        noise = np.random.default_rng(3).normal(0.0, 10.0, SHAPE)
        self.hu = np.where(self.liver > 0, 100.0, -100.0) + noise
        self.hu[self.instances == 1] -= 30.0  # homogeneous, 30 HU darker
        k, j, i = np.indices(SHAPE)
        r = np.sqrt((k - 20) ** 2 + (j - 45) ** 2 + (i - 45) ** 2)
        bright_rim = (self.instances == 2) & (r > 8 * 0.79)  # half the ball's volume
        self.hu[self.instances == 2] -= 40.0
        self.hu[bright_rim] += 80.0  # +40 rim, -40 core: the mean is the liver's
        # lesion 3 is as dense as the liver: invisible

    def test_known_contrasts(self):
        result = lesion_conspicuity(self.hu, self.liver, self.instances, GEOMETRY)
        self.assertEqual(sorted(result), [1, 2, 3])
        for record in result.values():
            self.assertAlmostEqual(record["noise_hu"], 10.0, delta=0.6)
        self.assertAlmostEqual(result[1]["contrast_hu"], -30.0, delta=1.5)
        self.assertAlmostEqual(result[1]["cnr"], 3.0, delta=0.3)
        self.assertLess(abs(result[2]["contrast_hu"]), 5.0)
        self.assertAlmostEqual(result[2]["contrast_energy_hu"], 40.0, delta=3.0)
        self.assertLess(result[3]["cnr"], 0.5)

    def test_geometry_and_missing_liver(self):
        flipped = np.diag([-1.0, 1.0, 1.0, 1.0])  # left-handed: the same voxels, the same figures
        self.assertEqual(lesion_conspicuity(self.hu, self.liver, self.instances, flipped),
                         lesion_conspicuity(self.hu, self.liver, self.instances, (1.0, 1.0, 1.0)))
        no_liver = self.instances > 0
        result = lesion_conspicuity(self.hu, no_liver, self.instances, GEOMETRY)
        self.assertEqual({r["cnr"] for r in result.values()}, {None})
        with self.assertRaisesRegex(ValueError, "differ in size"):
            lesion_conspicuity(self.hu[:, :10], self.liver, self.instances, GEOMETRY)
