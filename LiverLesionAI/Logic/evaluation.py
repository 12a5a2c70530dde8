"""Segmentation and detection metrics for the ``evaluate`` command: Dice, lesion matching, type confusion.

All outputs are plain dicts/lists of int, float, str or None, so they can be written as JSON as they are.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from scipy import ndimage

from .lesions import lesion_axes_mm
from .errors import InputError
from .records import LESION_TYPES

# Detection rule: IoU >= 0.1, or a prediction covering >= 50% of a small GT lesion (small lesions get
# low IoU from any over-segmentation although they are clearly found).
MIN_MATCH_IOU = 0.1
MIN_SMALL_COVERAGE = 0.5
SIZE_BINS = ("<10mm", "10-20mm", ">20mm")  # by longest axial diameter


class EvaluationInputError(InputError):
    """Prediction and ground truth cannot be compared (missing arrays, different sizes)."""


def size_bin(long_axis_mm: float) -> str:
    if long_axis_mm < 10.0:
        return SIZE_BINS[0]
    if long_axis_mm <= 20.0:
        return SIZE_BINS[1]
    return SIZE_BINS[2]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty (nothing to find, nothing found)."""
    a, b = np.asarray(a) != 0, np.asarray(b) != 0
    if a.shape != b.shape:
        raise EvaluationInputError(f"Cannot compare masks of different sizes {a.shape} and {b.shape}.")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


def _sizes(instances: np.ndarray) -> dict[int, int]:
    counts = np.bincount(instances.ravel().astype(np.int64))
    return {int(i): int(c) for i, c in enumerate(counts) if i > 0 and c > 0}


def match_lesions(
    pred_instances: np.ndarray,
    gt_instances: np.ndarray,
    small_gt_ids: Iterable[int] = (),
) -> dict:
    """One-to-one greedy matching of predicted to GT lesions, largest overlap first.

    A pair can match when IoU >= 0.1, or when the GT id is in ``small_gt_ids`` and the prediction
    covers >= 50% of it. Returns {"matches": [{"pred_id", "gt_id", "iou", "overlap_voxels"}],
    "unmatched_pred": [ids], "unmatched_gt": [ids]}.
    """
    pred = np.asarray(pred_instances)
    gt = np.asarray(gt_instances)
    if pred.shape != gt.shape:
        raise EvaluationInputError(
            f"Predicted ({pred.shape}) and reference ({gt.shape}) lesion maps differ in size."
        )
    pred_sizes, gt_sizes = _sizes(pred), _sizes(gt)
    small = {int(i) for i in small_gt_ids}
    both = (pred != 0) & (gt != 0)
    pairs, overlaps = np.unique(
        np.stack([pred[both].astype(np.int64), gt[both].astype(np.int64)]), axis=1, return_counts=True
    )
    candidates = []
    for (p, g), inter in zip(pairs.T, overlaps):
        p, g, inter = int(p), int(g), int(inter)
        iou = inter / (pred_sizes[p] + gt_sizes[g] - inter)
        if iou >= MIN_MATCH_IOU or (g in small and inter / gt_sizes[g] >= MIN_SMALL_COVERAGE):
            candidates.append((inter, iou, p, g))
    candidates.sort(key=lambda c: (-c[0], -c[1], c[2], c[3]))
    matches, used_pred, used_gt = [], set(), set()
    for inter, iou, p, g in candidates:
        if p in used_pred or g in used_gt:
            continue
        used_pred.add(p)
        used_gt.add(g)
        matches.append({"pred_id": p, "gt_id": g, "iou": float(iou), "overlap_voxels": inter})
    return {
        "matches": matches,
        "unmatched_pred": sorted(set(pred_sizes) - used_pred),
        "unmatched_gt": sorted(set(gt_sizes) - used_gt),
    }


def _geometry(ijk_to_ras) -> np.ndarray:
    g = np.asarray(ijk_to_ras, dtype=np.float64)
    if g.shape == (3,):  # voxel spacing (i, j, k) in mm
        return np.diag([*g, 1.0])
    if g.shape != (4, 4):
        raise EvaluationInputError(
            f"Geometry must be a 4x4 ijk_to_ras matrix or 3 voxel spacings, got shape {g.shape}."
        )
    return g


def _case_arrays(case: dict, what: str) -> tuple[np.ndarray, np.ndarray, dict]:
    missing = [k for k in ("liver_mask", "lesion_instances") if k not in case]
    if missing:
        raise EvaluationInputError(f"The {what} case is missing {', '.join(missing)}.")
    types = {int(k): v for k, v in (case.get("lesion_types") or {}).items()}
    return np.asarray(case["liver_mask"]), np.asarray(case["lesion_instances"]), types


# Conspicuity: the reference liver in a shell around each lesion, clear of its blurred edge.
CONSPICUITY_SHELL_MM = (1.5, 6.0)
MIN_SHELL_VOXELS = 30


def lesion_conspicuity(hu: np.ndarray, liver_mask: np.ndarray, lesion_instances: np.ndarray,
                       ijk_to_ras) -> dict[int, dict]:
    """How far each reference lesion stands out of the liver around it, in units of that liver's noise.

    Per lesion id: ``contrast_hu`` (mean lesion HU minus the median of the surrounding lesion-free liver,
    1.5-6 mm from its edge), ``noise_hu`` (that liver's robust standard deviation, 1.4826 x MAD),
    ``contrast_energy_hu`` (root mean square of lesion HU minus that median, less the noise: counts a bright
    rim around a dark core, which cancel in the mean) and ``cnr`` = contrast energy / noise. ``cnr`` is None
    where fewer than 30 liver voxels surround the lesion. Arrays [k, j, i] in one grid.
    """
    hu = np.asarray(hu, dtype=np.float32)
    liver = np.asarray(liver_mask) != 0
    instances = np.asarray(lesion_instances)
    if not (hu.shape == liver.shape == instances.shape):
        raise EvaluationInputError(
            f"The CT {hu.shape}, liver mask {liver.shape} and lesion map {instances.shape} differ in size.")
    spacing_kji = np.linalg.norm(_geometry(ijk_to_ras)[:3, :3], axis=0)[::-1]
    inner_mm, outer_mm = CONSPICUITY_SHELL_MM
    pad = np.ceil(outer_mm / spacing_kji).astype(int) + 1
    result = {}
    for lesion_id, box in enumerate(ndimage.find_objects(instances.astype(np.int64)), start=1):
        if box is None:
            continue
        box = tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(box, pad, hu.shape))
        lesion = instances[box] == lesion_id
        distance = ndimage.distance_transform_edt(~lesion, sampling=spacing_kji)
        shell = (distance > inner_mm) & (distance <= outer_mm) & liver[box] & (instances[box] == 0)
        lesion_hu = hu[box][lesion]
        record = {"contrast_hu": None, "contrast_energy_hu": None, "noise_hu": None, "cnr": None,
                  "shell_voxels": int(shell.sum())}
        if shell.sum() >= MIN_SHELL_VOXELS:
            liver_hu = hu[box][shell]
            level = float(np.median(liver_hu))
            noise = float(1.4826 * np.median(np.abs(liver_hu - level)))
            energy = float(np.sqrt(max(np.mean((lesion_hu - level) ** 2) - noise ** 2, 0.0)))
            record.update(contrast_hu=round(float(lesion_hu.mean()) - level, 2), noise_hu=round(noise, 2),
                          contrast_energy_hu=round(energy, 2), cnr=round(energy / max(noise, 1e-6), 3))
        result[lesion_id] = record
    return result


def _empty_counts() -> dict:
    return {"tp": 0, "fp": 0, "fn": 0}


def evaluate_case(pred: dict, gt: dict, ijk_to_ras, case_id: str = "") -> dict:
    """Metrics of one case. ``pred`` and ``gt``: {"liver_mask", "lesion_instances", "lesion_types"}.

    GT lesion types outside LESION_TYPES (e.g. "tumor") count as unknown and stay out of the
    confusion matrix. ``ijk_to_ras`` may also be the voxel spacing (i, j, k) in mm.
    """
    geometry = _geometry(ijk_to_ras)
    p_liver, p_inst, p_types = _case_arrays(pred, "predicted")
    g_liver, g_inst, g_types = _case_arrays(gt, "reference")
    shapes = {a.shape for a in (p_liver, p_inst, g_liver, g_inst)}
    if len(shapes) != 1:
        raise EvaluationInputError(f"Prediction and reference arrays differ in size: {sorted(shapes)}.")

    p_lesion, g_lesion = p_inst != 0, g_inst != 0
    liver_dice = dice((p_liver != 0) | p_lesion, (g_liver != 0) | g_lesion)
    intersection = int(np.count_nonzero(p_lesion & g_lesion))
    lesion_sum = int(p_lesion.sum()) + int(g_lesion.sum())

    gt_axes = lesion_axes_mm(g_inst, geometry)
    pred_axes = lesion_axes_mm(p_inst, geometry)
    small = [g for g, (long_mm, _) in gt_axes.items() if long_mm < 10.0]
    matching = match_lesions(p_inst, g_inst, small_gt_ids=small)

    overall = _empty_counts()
    by_size = {b: _empty_counts() for b in SIZE_BINS}
    confusion = [[0] * len(LESION_TYPES) for _ in LESION_TYPES]
    matches = []
    for m in matching["matches"]:
        g_long = gt_axes[m["gt_id"]][0]
        gt_type, pred_type = g_types.get(m["gt_id"]), p_types.get(m["pred_id"])
        overall["tp"] += 1
        by_size[size_bin(g_long)]["tp"] += 1
        if gt_type in LESION_TYPES and pred_type in LESION_TYPES:
            confusion[LESION_TYPES.index(gt_type)][LESION_TYPES.index(pred_type)] += 1
        matches.append({**m, "gt_long_axis_mm": float(g_long), "gt_type": gt_type, "pred_type": pred_type})
    for g in matching["unmatched_gt"]:
        overall["fn"] += 1
        by_size[size_bin(gt_axes[g][0])]["fn"] += 1
    for p in matching["unmatched_pred"]:
        overall["fp"] += 1
        by_size[size_bin(pred_axes[p][0])]["fp"] += 1

    return {
        "case_id": case_id,
        "liver_dice": float(liver_dice),
        "lesion_dice": float(2.0 * intersection / lesion_sum) if lesion_sum else 1.0,
        "lesion_intersection_voxels": intersection,
        "lesion_voxel_sum": lesion_sum,
        "n_gt_lesions": len(gt_axes),
        "n_pred_lesions": len(pred_axes),
        "detection": overall,
        "detection_by_size": by_size,
        "matches": matches,
        "missed_gt_ids": matching["unmatched_gt"],
        "false_positive_ids": matching["unmatched_pred"],
        "type_confusion": confusion,
    }


def _ratio(num: int, den: int) -> float | None:
    return float(num / den) if den else None


def _rates(counts: dict) -> dict:
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    recall, precision = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {**counts, "recall": recall, "precision": precision, "f1": f1}


def aggregate(case_results: list[dict]) -> dict:
    """Summary over cases. Lesion Dice is global (all voxels pooled); rates are None when undefined."""
    overall = _empty_counts()
    by_size = {b: _empty_counts() for b in SIZE_BINS}
    confusion = np.zeros((len(LESION_TYPES),) * 2, dtype=np.int64)
    intersection = lesion_sum = 0
    for case in case_results:
        for key in overall:
            overall[key] += case["detection"][key]
            for b in SIZE_BINS:
                by_size[b][key] += case["detection_by_size"][b][key]
        confusion += np.asarray(case["type_confusion"], dtype=np.int64)
        intersection += case["lesion_intersection_voxels"]
        lesion_sum += case["lesion_voxel_sum"]
    typed = int(confusion.sum())
    return {
        "cases": list(case_results),
        "n_cases": len(case_results),
        "mean_liver_dice": (float(np.mean([c["liver_dice"] for c in case_results]))
                            if case_results else None),
        "global_lesion_dice": float(2.0 * intersection / lesion_sum) if lesion_sum else 1.0,
        "detection": _rates(overall),
        "detection_by_size": {b: _rates(c) for b, c in by_size.items()},
        "type_accuracy": _ratio(int(np.trace(confusion)), typed),
        "type_confusion": {
            "labels": list(LESION_TYPES),
            "rows": "reference type",
            "columns": "predicted type",
            "matrix": confusion.tolist(),
        },
    }
