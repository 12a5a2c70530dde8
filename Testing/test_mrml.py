"""The Slicer module's MRML glue on real slicer-core and the real CT (3D-IRCADb-01 case 1).

Volume node -> result -> segmentation node -> edit voxels and type -> records -> seg.nrrd and scene
saved and reloaded identical. The review steps are the ones Slicer's self-test runs
(liverlesionai.selftest.run_review_scenario): one function, two harnesses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import vtk

slicer = pytest.importorskip("slicer")  # slicer-core wheel: part of the test requirements

from liverlesionai import mrml, segfile, selftest, slicer_worker  # noqa: E402
from liverlesionai.errors import InputError, OutputError  # noqa: E402
from liverlesionai.lesions import build_lesion_records  # noqa: E402
from liverlesionai.records import LESION_TYPE_COLORS, SegmentationResult  # noqa: E402
from liverlesionai.terminology import kind_from_terminology_string  # noqa: E402
from liverlesionai.volume_io import read_ct  # noqa: E402

CASE = Path(__file__).resolve().parents[1].parent / "shared/data/ircadb-01/case_01"

pytestmark = pytest.mark.skipif(not CASE.is_dir(), reason=f"real CT not found at {CASE}")


def _nifti_array(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def case():
    """Scene, CT volume node and a result built from the expert masks (made-up type probabilities)."""
    scene = mrml.create_standalone_scene()
    ct = read_ct(CASE / "image.nii.gz")
    volume = mrml.volume_node_from_ct(scene, ct, "ircadb01")
    label = _nifti_array(CASE / "label.nii.gz")
    instances = _nifti_array(CASE / "lesion_instances.nii.gz").astype(np.uint16)
    lesions = json.loads((CASE / "lesions.json").read_text())["lesions"]
    kinds = {entry["id"]: entry["type_from_folder_name"] for entry in lesions}
    probabilities = {
        lid: ({"cyst": 0.8, "hemangioma": 0.1, "metastasis": 0.1} if kinds.get(lid) == "cyst"
              else {"cyst": 0.1, "hemangioma": 0.25, "metastasis": 0.65})
        for lid in np.unique(instances[instances > 0]).tolist()
    }
    records = build_lesion_records(ct.voxels, instances, ct.ijk_to_ras, probabilities)
    result = SegmentationResult((label == 1).astype(np.uint8), instances, records, ct.ijk_to_ras,
                                liver_volume_ml=1489.0, model_version="ground-truth")
    return scene, ct, volume, result


def test_volume_node_round_trips_voxels_and_geometry_exactly(case):
    scene, ct, volume, _ = case
    back = mrml.ct_from_volume_node(volume)
    assert back.voxels.dtype == ct.voxels.dtype
    assert np.array_equal(back.voxels, ct.voxels)
    assert np.array_equal(back.ijk_to_ras, ct.ijk_to_ras)


def test_geometry_matches_slicers_own_reader(case):
    """The volume node we build equals the one Slicer's reader makes from the same file."""
    scene, ct, volume, _ = case
    logic = scene._liverlesionai_logics[1]["volumes"]  # noqa: SLF001
    loaded = logic.AddArchetypeVolume(str(CASE / "image.nii.gz"), "from_slicer", 4, vtk.vtkStringArray())
    try:
        theirs = mrml.ct_from_volume_node(loaded)
        assert np.allclose(theirs.ijk_to_ras, ct.ijk_to_ras, atol=1e-5)
        assert np.array_equal(theirs.voxels, ct.voxels)
    finally:
        scene.RemoveNode(loaded)


def test_review_scenario_on_real_ct(case, tmp_path):
    scene, _, volume, result = case
    checks = selftest.run_review_scenario(scene, volume, result, tmp_path)
    assert selftest.failed_checks(checks) == [], checks["_details"]
    # Every check the self-test reports ran here (the engine-only one aside).
    assert {"segments_match_result", "type_change_applied", "edit_updates_measurements",
            "reject_removes_from_export", "undo_reject_restores", "painted_segment_is_unclassified",
            "seg_nrrd_round_trip", "scene_round_trip"} <= set(checks)
    scene.RemoveNode(checks["_segmentation_node"])


def test_segments_carry_names_colours_terminology_and_tags(case):
    scene, _, volume, result = case
    seg = mrml.add_result_to_scene(scene, volume, result)
    try:
        record = max(result.lesions, key=lambda r: r.volume_ml)
        segment = seg.GetSegmentation().GetSegment(f"lesion_{record.lesion_id}")
        assert segment.GetName() == record.display_name
        assert np.allclose(segment.GetColor(), LESION_TYPE_COLORS[record.lesion_type])
        assert kind_from_terminology_string(segment.GetTerminology()) == record.lesion_type
        tags = mrml._segment_tag_dict(segment)  # noqa: SLF001
        assert tags[segfile.TAG_PREFIX + "Type"] == record.lesion_type
        assert tags[segfile.TAG_PREFIX + "ReviewStatus"] == "unreviewed"
        # Records read back from the node: measured from its voxels, typed from its tags.
        back = {r.lesion_id: r for r in mrml.lesion_records_from_segmentation(seg, volume)}
        assert back[record.lesion_id].voxel_count == record.voxel_count
        assert back[record.lesion_id].long_axis_mm == pytest.approx(record.long_axis_mm)
        assert back[record.lesion_id].probabilities == pytest.approx(record.probabilities)
    finally:
        scene.RemoveNode(seg)


def test_cli_seg_nrrd_reads_into_the_scene_like_the_panels_own(case, tmp_path):
    """segfile.py (command line) and mrml.py (panel) write the same names, colours, terminology, tags."""
    scene, _, volume, result = case
    ours = mrml.add_result_to_scene(scene, volume, result)
    path = segfile.write_seg_nrrd(tmp_path / "cli.seg.nrrd", result)
    theirs = slicer_worker.load_worker_result(scene, volume, tmp_path)
    try:
        assert theirs.GetStorageNode() is None  # does not point into the worker's temporary folder
        same, why = selftest.snapshots_equal(selftest.segmentation_snapshot(ours, volume),
                                             selftest.segmentation_snapshot(theirs, volume))
        assert same, why
        assert path.exists()
    finally:
        scene.RemoveNode(ours)
        scene.RemoveNode(theirs)


def test_bad_inputs_raise_clear_errors(case, tmp_path):
    scene, ct, volume, result = case
    with pytest.raises(InputError, match="No CT volume"):
        mrml.ct_from_volume_node(None)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "a labelmap")
    with pytest.raises(InputError, match="not a scalar"):
        mrml.ct_from_volume_node(labelmap)
    scene.RemoveNode(labelmap)
    small = SegmentationResult(result.liver_mask[:10], result.lesion_instances[:10], [], ct.ijk_to_ras)
    with pytest.raises(InputError, match="must match"):
        mrml.add_result_to_scene(scene, volume, small)
    seg = mrml.add_result_to_scene(scene, volume, result)
    try:
        sid = f"lesion_{result.lesions[0].lesion_id}"
        with pytest.raises(InputError, match="Unknown lesion type"):
            mrml.set_lesion_type(seg, sid, "tumour")
        with pytest.raises(InputError, match="no segment"):
            mrml.set_review_status(seg, "lesion_999", "confirmed")
        existing = tmp_path / "mine.seg.nrrd"
        existing.write_bytes(b"user file")
        with pytest.raises(OutputError, match="already exists"):
            mrml.save_segmentation(seg, existing)
        assert existing.read_bytes() == b"user file"
        assert [p.name for p in tmp_path.iterdir()] == ["mine.seg.nrrd"]  # nothing partial left behind
        with pytest.raises(InputError, match="does not exist"):
            mrml.load_segmentation(scene, tmp_path / "missing.seg.nrrd")
    finally:
        scene.RemoveNode(seg)


def test_worker_protocol_helpers(tmp_path):
    assert slicer_worker.parse_progress_line('{"progress": 0.4, "message": "Liver"}') == (0.4, "Liver")
    assert slicer_worker.parse_progress_line('{"progress": 7}') == (1.0, "")
    assert slicer_worker.parse_progress_line("Traceback (most recent call last):") is None
    assert slicer_worker.parse_progress_line('{"other": 1}') is None
    args = slicer_worker.segment_command(tmp_path / "ct.nrrd", tmp_path / "out", "/m", "cpu")
    assert args[1] == str(slicer_worker.WORKER_SCRIPT) and args[2] == "segment" and "--progress-json" in args
    assert args[args.index("--model") + 1] == "/m" and args[args.index("--device") + 1] == "cpu"
    assert "--liver-mask" not in args
    args = slicer_worker.segment_command(tmp_path / "ct.nrrd", tmp_path / "out", liver_mask=tmp_path / "liver.nrrd")
    assert args[args.index("--liver-mask") + 1] == str(tmp_path / "liver.nrrd")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nnumpy>=1.0\nnumpy>=999\nno-such-package-liverlesionai>=1\n")
    assert slicer_worker.missing_requirements(requirements) == ["numpy>=999", "no-such-package-liverlesionai>=1"]


def test_review_scenario_with_the_engine(case, tmp_path):
    """The self-test's path with the real engine: segment, then classify a painted lesion on demand."""
    engine_module = pytest.importorskip("liverlesionai.engine", reason="engine not available yet")
    from liverlesionai.records import CTVolume
    from liverlesionai.registry import find_shipped_model

    if find_shipped_model() is None:
        pytest.skip("no shipped model in LiverLesionAI/Resources/Models")
    import torch

    torch.set_num_threads(1)
    _, ct, _, result = case
    # The liver's bounding box (in memory only), so the engine runs in seconds on a shared CPU.
    k, j, i = np.nonzero(result.liver_mask)
    box = tuple(slice(max(a.min() - 4, 0), a.max() + 5) for a in (k, j, i))
    offset = np.eye(4)
    offset[:3, 3] = [box[2].start, box[1].start, box[0].start]
    crop = CTVolume(np.ascontiguousarray(ct.voxels[box]), ct.ijk_to_ras @ offset, "ircadb01_liver_box")
    scene = mrml.create_standalone_scene()
    volume = mrml.volume_node_from_ct(scene, crop)
    engine = engine_module.LiverLesionEngine(model=None, device="cpu", threads=1)
    checks = selftest.run_review_scenario(scene, volume, engine, tmp_path)
    assert selftest.failed_checks(checks) == [], checks["_details"]
    assert "classify_on_demand" in checks  # the engine found a liver to paint a lesion in


def test_lesions_searched_again_inside_the_reviewed_liver(case, tmp_path, tiny_model_dir):
    """The panel's "Find lesions in this liver": the reviewed liver (Liver segment + lesions not rejected,
    holes filled) goes to the worker on the CT's grid, and the worker's command line accepts it."""
    from scipy import ndimage

    from liverlesionai.cli import main, read_mask_on_ct_grid

    scene, ct, volume, result = case
    seg = mrml.add_result_to_scene(scene, volume, result)
    try:
        lesion_ids = mrml.lesion_ids_by_segment(seg)
        rejected_segment, rejected_id = max(lesion_ids.items(), key=lambda kv: (result.lesion_instances == kv[1]).sum())
        mrml.set_review_status(seg, rejected_segment, "rejected")
        ct_path = slicer_worker.write_volume_for_worker(volume, tmp_path)
        mask_path = slicer_worker.write_liver_mask_for_worker(seg, volume, tmp_path)
        mask = read_mask_on_ct_grid(mask_path, read_ct(ct_path))  # on the CT's grid, or this raises
        kept = (result.liver_mask > 0) | ((result.lesion_instances > 0) & (result.lesion_instances != rejected_id))
        assert np.array_equal(mask, ndimage.binary_fill_holes(kept))
        rejected = result.lesion_instances == rejected_id
        assert mask[rejected].sum() < rejected.sum()  # the rejected (largest) tumour reaches the surface: left out
        assert main(["segment", str(ct_path), "-o", str(tmp_path / "out"), "--model", str(tiny_model_dir),
                     "--liver-mask", str(mask_path)]) == 0
        seg.GetSegmentation().RemoveSegment(mrml.LIVER_SEGMENT_ID)
        with pytest.raises(InputError, match="no Liver segment"):
            slicer_worker.write_liver_mask_for_worker(seg, volume, tmp_path / "again")
    finally:
        scene.RemoveNode(seg)
