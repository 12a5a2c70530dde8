"""The command line end to end: real CT in, Slicer-loadable seg.nrrd and lesion tables out."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from liverlesionai.cli import main
from liverlesionai.records import LESION_TYPE_COLORS, LIVER_COLOR

REAL_IMAGE = Path(__file__).resolve().parents[1].parent / "shared/data/ircadb-01/case_01/image.nii.gz"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, shipped_model_dir):
    if not REAL_IMAGE.exists():
        pytest.skip("real case not available")
    out = tmp_path_factory.mktemp("cli")
    proc = subprocess.run([sys.executable, "-m", "liverlesionai.cli", "segment", str(REAL_IMAGE), "-o", str(out),
                           "--progress-json", "--model", str(shipped_model_dir), "--threads", "2"],
                          capture_output=True, text=True, timeout=600)
    return proc, out


def test_segment_real_case_writes_all_outputs(real_run):
    proc, out = real_run
    assert proc.returncode == 0, proc.stderr
    progress = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert progress[-1]["progress"] == 1.0 and all(0 <= p["progress"] <= 1 for p in progress)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["case_01.lesions.csv", "case_01.lesions.json", "case_01.overview.png", "case_01.seg.nrrd"]
    data = json.loads((out / "case_01.lesions.json").read_text())
    assert data["liver_volume_ml"] > 1000 and data["lesions"]
    csv_lines = (out / "case_01.lesions.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(data["lesions"])
    assert "ID" in proc.stderr and "Type" in proc.stderr  # the lesion table is printed


def test_seg_nrrd_loads_in_slicer_core(real_run):
    import slicer  # noqa: F401  (registers the MRML classes)
    import vtk
    from slicer import vtkMRMLScene, vtkMRMLSegmentationNode, vtkMRMLSegmentationStorageNode

    _, out = real_run
    data = json.loads((out / "case_01.lesions.json").read_text())
    scene = vtkMRMLScene()
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(out / "case_01.seg.nrrd"))
    assert storage.ReadData(seg_node)
    segmentation = seg_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1 + len(data["lesions"])
    liver = segmentation.GetSegment("liver")
    assert liver.GetName() == "Liver" and np.allclose(liver.GetColor(), LIVER_COLOR, atol=1e-3)
    for lesion in data["lesions"]:
        segment = segmentation.GetSegment(f"lesion_{lesion['lesion_id']}")
        p = lesion["probabilities"][lesion["lesion_type"]]
        assert segment.GetName() == f"Lesion {lesion['lesion_id']} \u2013 {lesion['lesion_type']} ({p:.2f})"
        assert np.allclose(segment.GetColor(), LESION_TYPE_COLORS[lesion["lesion_type"]], atol=1e-3)
        value = vtk.mutable("")
        assert segment.GetTag("LiverLesionAI.Type", value) and str(value) == lesion["lesion_type"]
        assert segment.GetTag("LiverLesionAI.Probabilities", value) and "metastasis=" in str(value)
    # geometry: the labelmap sits on the CT's grid (same spacing and RAS origin as the NIfTI)
    labelmap = segmentation.GetSegment("liver").GetRepresentation("Binary labelmap")
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    assert np.allclose([matrix.GetElement(r, r) for r in range(3)], [-0.57, -0.57, 1.6], atol=1e-3)


def test_refuses_to_overwrite_and_leaves_files_untouched(real_run, shipped_model_dir, capsys):
    _, out = real_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code = main(["segment", str(REAL_IMAGE), "-o", str(out), "--model", str(shipped_model_dir)])
    assert code == 3
    assert "never overwrites" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_evaluate_predictions_folder(real_run, tmp_path):
    _, out = real_run
    metrics = tmp_path / "m.json"
    assert main(["evaluate", str(out), str(REAL_IMAGE.parent.parent), "--json", str(metrics)]) == 0
    summary = json.loads(metrics.read_text())
    assert summary["n_cases"] == 1 and 0 <= summary["mean_liver_dice"] <= 1


def test_several_inputs_and_phantom_folder(tiny_model_dir, tmp_path):
    assert main(["phantoms", str(tmp_path / "cases"), "--seeds", "3,4", "--max-in-plane", "96"]) == 0
    images = [str(tmp_path / "cases" / f"phantom_0000{s}" / "image.nii.gz") for s in (3, 4)]
    assert main(["segment", *images, "-o", str(tmp_path / "out"), "--model", str(tiny_model_dir)]) == 0
    produced = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(produced) == 8 and "phantom_00003.seg.nrrd" in produced
    assert main(["evaluate", str(tiny_model_dir), str(tmp_path / "cases"), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["n_cases"] == 2


def test_segment_inside_the_reference_liver_of_the_real_case(tmp_path, shipped_model_dir):
    """--liver-mask replaces stage 1: with the expert liver of the real CT, the liver is the expert's and the
    largest tumour is found inside it."""
    if not REAL_IMAGE.exists():
        pytest.skip("real case not available")
    from liverlesionai.datasets import find_cases
    from liverlesionai.evaluation import evaluate_case
    from liverlesionai.segfile import read_seg_nrrd

    label = REAL_IMAGE.parent / "label.nii.gz"
    out = tmp_path / "out"
    assert main(["segment", str(REAL_IMAGE), "-o", str(out), "--model", str(shipped_model_dir), "--threads", "2",
                 "--liver-mask", str(label)]) == 0
    data = json.loads((out / "case_01.lesions.json").read_text())
    assert data["liver_mask"] == "label.nii.gz"
    assert any("given liver mask" in m for m in data["messages"])
    case = next(c for c in find_cases(REAL_IMAGE.parent.parent) if c.case_id == "case_01")
    ct, truth = case.load_image(), case.load_truth()
    seg = read_seg_nrrd(out / "case_01.seg.nrrd")
    prediction = {"liver_mask": seg.liver_mask, "lesion_instances": seg.lesion_instances,
                  "lesion_types": {r.lesion_id: r.lesion_type for r in seg.lesions}}
    metrics = evaluate_case(prediction, truth, ct.ijk_to_ras, "case_01")
    assert metrics["liver_dice"] >= 0.95
    largest = int(np.argmax(np.bincount(truth["lesion_instances"].ravel())[1:]) + 1)
    assert any(m["gt_id"] == largest for m in metrics["matches"])


def test_liver_mask_errors_are_clear_and_write_nothing(tiny_model_dir, tmp_path, capsys):
    assert main(["phantoms", str(tmp_path / "cases"), "--seeds", "3,4", "--max-in-plane", "96"]) == 0
    image3, image4 = (tmp_path / "cases" / f"phantom_0000{s}" / "image.nii.gz" for s in (3, 4))
    label4 = image4.parent / "label.nii.gz"
    out = tmp_path / "out"
    common = ["-o", str(out), "--model", str(tiny_model_dir)]
    assert main(["segment", str(image3), str(image4), *common, "--liver-mask", str(label4)]) == 2
    assert "exactly one input" in capsys.readouterr().err
    assert main(["segment", str(image3), *common, "--liver-mask", str(label4)]) == 2
    assert "label.nii.gz is not on the CT's voxel grid" in capsys.readouterr().err
    empty = tmp_path / "empty.nii.gz"
    from liverlesionai.volume_io import read_ct, write_volume

    label = read_ct(label4)
    write_volume(empty, np.zeros(label.voxels.shape, np.uint8), label.ijk_to_ras)
    assert main(["segment", str(image4), *common, "--liver-mask", str(empty)]) == 2
    assert "empty.nii.gz is empty" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    assert main(["segment", str(image4), *common, "--liver-mask", str(label4)]) == 0
    assert json.loads((out / "phantom_00004.lesions.json").read_text())["liver_mask"] == "label.nii.gz"
