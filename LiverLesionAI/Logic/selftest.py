"""The review scenario shared by Slicer's self-test (LiverLesionAITest) and pytest (Testing/test_mrml.py).

One function, two harnesses: inside Slicer it runs on the application's scene, under pytest on a
standalone ``slicer-core`` scene; every step goes through ``mrml`` exactly as the panel's buttons do.
It returns named checks (True = passed) plus the details a failing check needs to be understood.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from . import mrml
from .records import LESION_TYPE_COLORS, LESION_TYPES, SegmentationResult
from .terminology import kind_from_terminology_string


def segmentation_snapshot(seg_node, volume_node) -> dict:
    """Everything a save/reload must keep: per segment name, colour, terminology, tags and voxels."""
    ids = list(seg_node.GetSegmentation().GetSegmentIDs())
    labels = mrml.segment_masks(seg_node, volume_node, ids) if ids else None
    snapshot = {}
    for n, sid in enumerate(ids, start=1):
        segment = seg_node.GetSegmentation().GetSegment(sid)
        snapshot[sid] = {
            "name": segment.GetName(),
            "color": tuple(round(c, 6) for c in segment.GetColor()),
            "terminology": segment.GetTerminology(),
            "tags": mrml._segment_tag_dict(segment),  # noqa: SLF001  (same module family)
            "voxels": np.flatnonzero(labels == n),
        }
    return snapshot


def snapshots_equal(a: dict, b: dict) -> tuple[bool, str]:
    if list(a) != list(b):
        return False, f"segments differ: {list(a)} vs {list(b)}"
    for sid in a:
        for key in ("name", "color", "terminology", "tags"):
            if a[sid][key] != b[sid][key]:
                return False, f"segment {sid}: {key} differs: {a[sid][key]!r} vs {b[sid][key]!r}"
        if not np.array_equal(a[sid]["voxels"], b[sid]["voxels"]):
            return False, f"segment {sid}: voxels differ"
    return True, ""


def _other_type(lesion_type: str) -> str:
    return next(t for t in LESION_TYPES if t != lesion_type)


def run_review_scenario(scene, volume_node, engine_or_result, workdir: str | Path | None = None) -> dict:
    """Segment & Classify, then review as a radiologist would; returns {check name: bool, ...}.

    ``engine_or_result``: a LiverLesionEngine (the real run) or a SegmentationResult already computed.
    ``workdir``: an empty folder for the saved files (a temporary one when None).
    """
    checks: dict = {}
    details: dict = {}
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="liverlesionai_selftest_")
        workdir = tmp.name
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        engine = None if isinstance(engine_or_result, SegmentationResult) else engine_or_result
        result = engine_or_result if engine is None else engine.segment(mrml.ct_from_volume_node(volume_node))
        seg_node = mrml.add_result_to_scene(scene, volume_node, result)

        # Segments, colours, terminology, tags, table.
        expected_ids = ["liver"] + [f"lesion_{r.lesion_id}" for r in sorted(result.lesions, key=lambda r: r.lesion_id)]
        checks["segments_match_result"] = list(seg_node.GetSegmentation().GetSegmentIDs()) == expected_ids
        records = mrml.lesion_records_from_segmentation(seg_node, volume_node)
        by_id = {r.lesion_id: r for r in result.lesions}
        checks["records_match_result"] = sorted(r.lesion_id for r in records) == sorted(by_id) and all(
            r.voxel_count == by_id[r.lesion_id].voxel_count and r.lesion_type == by_id[r.lesion_id].lesion_type
            for r in records
        )
        colors_ok = terms_ok = True
        for r in result.lesions:
            segment = seg_node.GetSegmentation().GetSegment(f"lesion_{r.lesion_id}")
            colors_ok &= np.allclose(segment.GetColor(), LESION_TYPE_COLORS[r.lesion_type], atol=1e-6)
            terms_ok &= kind_from_terminology_string(segment.GetTerminology()) == r.lesion_type
        checks["lesion_colours"] = bool(colors_ok)
        checks["lesion_terminology"] = bool(terms_ok)
        checks["liver_terminology"] = (
            kind_from_terminology_string(seg_node.GetSegmentation().GetSegment("liver").GetTerminology()) == "liver"
        )
        rows = mrml.table_rows(records)
        checks["table_has_one_row_per_lesion"] = len(rows) == len(result.lesions) and all(
            len(row) == len(mrml.TABLE_COLUMNS) for row in rows
        )

        if records:
            first = min(records, key=lambda r: r.lesion_id)
            sid = mrml.segment_id_for_lesion(seg_node, first.lesion_id)
            # The reviewer changes the type: name, colour, terminology and tags follow at once.
            new_type = _other_type(first.lesion_type)
            mrml.set_lesion_type(seg_node, sid, new_type)
            segment = seg_node.GetSegmentation().GetSegment(sid)
            after = {r.lesion_id: r for r in mrml.lesion_records_from_segmentation(seg_node, volume_node)}
            checks["type_change_applied"] = (
                after[first.lesion_id].lesion_type == new_type
                and new_type in segment.GetName()
                and np.allclose(segment.GetColor(), LESION_TYPE_COLORS[new_type], atol=1e-6)
                and kind_from_terminology_string(segment.GetTerminology()) == new_type
            )
            # The reviewer erases part of the lesion: the measurements follow the voxels.
            mask = mrml.segment_masks(seg_node, volume_node, [sid]) > 0
            k_values = np.nonzero(mask)[0]
            kept = mask.copy()
            if first.voxel_count > 1:
                cut = int(np.median(k_values))
                kept[cut + 1:] = False
                if not kept.any() or kept.sum() == mask.sum():  # a single-slice lesion: drop one voxel instead
                    kept = mask.copy()
                    kept[tuple(np.argwhere(mask)[0])] = False
            mrml.set_segment_mask(seg_node, sid, kept, volume_node)
            edited = {r.lesion_id: r for r in mrml.refresh_measurements(seg_node, volume_node)}
            checks["edit_updates_measurements"] = edited[first.lesion_id].voxel_count == int(kept.sum())
            details["edited_voxels"] = (int(mask.sum()), int(kept.sum()))
            # Reject, then undo.
            mrml.set_review_status(seg_node, sid, "rejected")
            exported = mrml.records_for_export(mrml.lesion_records_from_segmentation(seg_node, volume_node))
            hidden = not seg_node.GetDisplayNode().GetSegmentVisibility(sid)
            checks["reject_removes_from_export"] = first.lesion_id not in {r.lesion_id for r in exported} and hidden
            mrml.undo_review_status(seg_node, sid)
            exported = mrml.records_for_export(mrml.lesion_records_from_segmentation(seg_node, volume_node))
            checks["undo_reject_restores"] = first.lesion_id in {r.lesion_id for r in exported} and bool(
                seg_node.GetDisplayNode().GetSegmentVisibility(sid)
            )
            # Re-reject so the saved files carry a rejected lesion too.
            mrml.set_review_status(seg_node, sid, "rejected")

        # The reviewer paints a lesion the engine missed: reported untyped, classified on demand.
        painted = _painted_mask(result)
        if painted is not None:
            new_sid = mrml.add_painted_segment(seg_node, painted, volume_node)
            untyped = [r for r in mrml.lesion_records_from_segmentation(seg_node, volume_node) if not r.lesion_type]
            checks["painted_segment_is_unclassified"] = len(untyped) == 1 and untyped[0].voxel_count == int(painted.sum())
            if engine is not None:
                record = mrml.classify_segment(engine, seg_node, new_sid, volume_node)
                checks["classify_on_demand"] = record.lesion_type in LESION_TYPES and abs(
                    sum(record.probabilities.values()) - 1.0
                ) < 1e-3

        # seg.nrrd round trip.
        before = segmentation_snapshot(seg_node, volume_node)
        path = mrml.save_segmentation(seg_node, workdir / "review.seg.nrrd")
        reloaded = mrml.load_segmentation(scene, path)
        same, why = snapshots_equal(before, segmentation_snapshot(reloaded, volume_node))
        checks["seg_nrrd_round_trip"] = same
        details["seg_nrrd_round_trip"] = why
        checks["seg_nrrd_geometry"] = _same_geometry(seg_node, reloaded)
        scene.RemoveNode(reloaded)

        # Scene round trip (a new scene, so the caller's scene is left alone).
        mrml_path = mrml.save_scene(scene, workdir / "scene")
        scene2 = mrml.load_scene(mrml_path)
        seg2 = scene2.GetNodeByID(seg_node.GetID())
        vol2 = scene2.GetNodeByID(volume_node.GetID())
        if seg2 is None or vol2 is None:
            checks["scene_round_trip"] = False
            details["scene_round_trip"] = "segmentation or CT missing after reload"
        else:
            same, why = snapshots_equal(before, segmentation_snapshot(seg2, vol2))
            ct_same = np.array_equal(mrml.ct_from_volume_node(vol2).voxels, mrml.ct_from_volume_node(volume_node).voxels)
            geometry_same = np.allclose(
                mrml.ct_from_volume_node(vol2).ijk_to_ras, mrml.ct_from_volume_node(volume_node).ijk_to_ras, atol=1e-6
            )
            checks["scene_round_trip"] = same and ct_same and geometry_same
            details["scene_round_trip"] = why or ("" if ct_same and geometry_same else "CT voxels or geometry differ")
        checks["_details"] = details
        checks["_segmentation_node"] = seg_node
        return checks
    finally:
        if tmp is not None:
            tmp.cleanup()


def failed_checks(checks: dict) -> list[str]:
    return [name for name, ok in checks.items() if not name.startswith("_") and ok is not True]


def _same_geometry(a, b) -> bool:
    key = "Reference image geometry"  # vtkSegmentationConverter::GetReferenceImageGeometryParameterName()
    ga = a.GetSegmentation().GetConversionParameter(key)
    gb = b.GetSegmentation().GetConversionParameter(key)
    return bool(ga) and ga == gb


def _painted_mask(result: SegmentationResult) -> np.ndarray | None:
    """A small ball inside the liver, away from every lesion (where a reviewer would paint a new one)."""
    from scipy import ndimage

    liver = result.liver_mask > 0
    box = ndimage.find_objects(liver.astype(np.uint8))
    if not box:
        return None
    box = box[0]  # distances only inside the liver's bounding box: a whole CT would take seconds
    inside = ndimage.distance_transform_edt(liver[box] & (result.lesion_instances[box] == 0))
    local = np.unravel_index(int(np.argmax(inside)), inside.shape)
    if inside[local] < 3:
        return None
    centre = tuple(int(s.start + c) for s, c in zip(box, local))
    kk, jj, ii = np.ogrid[-2:3, -2:3, -2:3]
    mask = np.zeros(liver.shape, dtype=bool)
    mask[tuple(slice(c - 2, c + 3) for c in centre)] = kk**2 + jj**2 + ii**2 <= 4
    return mask
