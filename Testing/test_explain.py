"""Integrated-Gradients explanations of lesion types (liverlesionai.explain), on the real CT with the shipped model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from liverlesionai.geometry import canonicalize, resample_separable

REAL_IMAGE = Path(__file__).resolve().parents[1].parent / "shared/data/ircadb-01/case_01/image.nii.gz"
LESION = 2  # a 3 mL metastasis-typed lesion of the real case under the shipped model: a few seconds to explain


@pytest.fixture(scope="module")
def real_run(shipped_model_dir):
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.volume_io import read_ct

    if not REAL_IMAGE.is_file():
        pytest.skip(f"real case not present at {REAL_IMAGE}")
    engine = LiverLesionEngine(shipped_model_dir, device="cpu")
    ct = read_ct(REAL_IMAGE)
    outputs = engine.run_networks(ct)
    result = engine.lesions_from(outputs)
    assert LESION in {r.lesion_id for r in result.lesions}
    return engine, ct, outputs, result


def _lesion_on_stage2_grid(ct, outputs, result, lesion_id):
    canonical = canonicalize(result.lesion_instances, ct.ijk_to_ras).array
    return resample_separable(canonical, outputs.canon.grid, outputs.grid2, 0, dtype=np.uint16) == lesion_id


def test_attributions_add_up_are_faithful_and_sit_on_the_lesion(real_run):
    from liverlesionai.explain import ScoreFunction, integrated_gradients

    engine, ct, outputs, result = real_run
    record = next(r for r in result.lesions if r.lesion_id == LESION)
    mask2 = _lesion_on_stage2_grid(ct, outputs, result, LESION)
    stage2 = engine.experts[outputs.expert].stage2
    views = engine.config.stage2_views
    explanation = integrated_gradients(stage2, outputs.hu2, outputs.prior2, mask2, outputs.grid2, record.lesion_type,
                                       views, engine.device, lesion_id=LESION)

    # what is explained is the engine's own number: the crop gives stage 2 enough context
    on_whole_grid = ScoreFunction(stage2, outputs.prior2, mask2, record.lesion_type, views, engine.device)
    assert explanation.score == pytest.approx(on_whole_grid(torch.from_numpy(outputs.hu2)), abs=0.01)
    assert explanation.score - explanation.baseline_score > 0.2  # stage 2 sees a metastasis there, not without it

    # completeness: the attributions add up to the score's change
    total = float(explanation.attribution.sum())
    assert explanation.completeness_gap == pytest.approx(total - (explanation.score - explanation.baseline_score))
    assert explanation.relative_gap <= 0.05
    changed = explanation.image != explanation.baseline
    assert not explanation.attribution[~changed].any()  # only the replaced lesion and band can carry attribution

    # faithfulness: putting the baseline back where the map is most positive undoes most of the score, far more
    # than at as many random or least-attributed voxels
    score = ScoreFunction(stage2, explanation.liver_prior, explanation.lesion_mask, record.lesion_type, views,
                          engine.device)
    assert score(torch.from_numpy(explanation.image)) == pytest.approx(explanation.score, abs=1e-5)
    candidates = np.flatnonzero(changed.ravel())
    ranked = candidates[np.argsort(-explanation.attribution.ravel()[candidates])]
    n = len(candidates) // 5

    def drop(voxels):
        volume = explanation.image.copy().ravel()
        volume[voxels] = explanation.baseline.ravel()[voxels]
        return explanation.score - score(torch.from_numpy(volume.reshape(explanation.image.shape)))

    explained = explanation.score - explanation.baseline_score
    top, bottom = drop(ranked[:n]), drop(ranked[-n:])
    random = drop(np.random.default_rng(0).choice(candidates, n, replace=False))
    assert top >= 0.75 * explained and top > random + 0.05 * explained and bottom < 0.1 * explained

    # geometry: the positive attribution lies on the lesion the record describes, in RAS
    positive = np.clip(explanation.attribution, 0, None)
    kji = np.array(np.nonzero(positive)).T
    centre_ijk = (kji[:, ::-1] * positive[positive > 0][:, None]).sum(0) / positive.sum()
    centre_ras = (explanation.ijk_to_ras @ np.r_[centre_ijk, 1.0])[:3]
    assert np.linalg.norm(centre_ras - np.asarray(record.centroid_ras)) < 5.0
    assert explanation.inside_share > 0.8


def test_a_drawn_lesion_is_explained_for_the_type_asked(real_run):
    from liverlesionai.explain import explain_lesion

    engine, ct, _outputs, result = real_run
    mask = result.lesion_instances == LESION
    as_typed = explain_lesion(engine, ct, mask, "metastasis", LESION)
    as_cyst = explain_lesion(engine, ct, mask, "cyst", LESION)
    assert as_typed.lesion_type == "metastasis" and as_cyst.lesion_type == "cyst"
    assert as_typed.score > 0.3 > as_cyst.score  # stage 2 types its pixels metastasis, not cyst
    assert as_typed.relative_gap <= 0.05
    with pytest.raises(ValueError, match="unknown lesion type"):
        explain_lesion(engine, ct, mask, "lipoma", LESION)
    with pytest.raises(ValueError, match="empty"):
        explain_lesion(engine, ct, np.zeros_like(mask), "cyst", LESION)


def test_explain_command_writes_one_folder_and_never_overwrites(shipped_model_dir, tmp_path, capsys):
    from liverlesionai.cli import main
    from liverlesionai.volume_io import read_ct

    if not REAL_IMAGE.is_file():
        pytest.skip(f"real case not present at {REAL_IMAGE}")
    out = tmp_path / "out"
    args = ["explain", str(REAL_IMAGE), "-o", str(out), "--model", str(shipped_model_dir), "--device", "cpu"]
    assert main(args + ["--lesion", "99"]) == 2
    assert "No lesion 99" in capsys.readouterr().err
    assert not list(out.iterdir())  # nothing written, no staging folder left

    assert main(args + ["--lesion", "4"]) == 0
    folder = out / "case_01.explanations"
    assert sorted(p.name for p in out.iterdir()) == [folder.name]
    summary = json.loads((folder / "explanations.json").read_text())
    assert summary["model_version"] and summary["method"]["name"] == "Integrated Gradients"
    [lesion] = summary["lesions"]
    assert lesion["lesion_id"] == 4 and lesion["lesion_type"] in ("cyst", "hemangioma", "metastasis")
    attribution = read_ct(folder / lesion["attribution"])
    assert float(attribution.voxels.sum()) == pytest.approx(lesion["attribution_sum"], abs=1e-3)
    with Image.open(folder / lesion["image"]) as image:
        assert image.size == (768, 312)
    assert (folder / "segmentation.seg.nrrd").is_file()

    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert main(args + ["--lesion", "4"]) == 3  # the folder exists: refused, nothing replaced
    assert "never overwrites" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == [folder.name]


def test_worker_explains_a_reviewed_segment_into_the_scene(real_run, shipped_model_dir, tmp_path):
    """The panel's path without Qt: the reviewed segment and its corrected type go to the worker process, whose
    attribution map comes back as a blue-red volume node on the map's own grid."""
    from liverlesionai import mrml, slicer_worker
    from liverlesionai.errors import InputError
    from liverlesionai.volume_io import read_ct

    _engine, ct, _outputs, result = real_run
    scene = mrml.create_standalone_scene()
    volume = mrml.volume_node_from_ct(scene, ct, "case_01")
    seg = mrml.add_result_to_scene(scene, volume, result)
    segment_id = mrml.segment_id_for_lesion(seg, LESION)
    mrml.set_lesion_type(seg, segment_id, "hemangioma")  # the reviewer's type is the one explained
    assert mrml.explanation_target(seg, segment_id) == (LESION, "hemangioma")
    with pytest.raises(InputError, match="not a lesion"):
        mrml.explanation_target(seg, mrml.LIVER_SEGMENT_ID)

    ct_path = slicer_worker.write_volume_for_worker(volume, tmp_path)
    mask_path = slicer_worker.write_segment_mask_for_worker(seg, segment_id, volume, tmp_path)
    assert np.array_equal(read_ct(mask_path).voxels > 0, result.lesion_instances == LESION)
    command = slicer_worker.explain_command(ct_path, mask_path, LESION, "hemangioma", tmp_path / "out",
                                            shipped_model_dir, "cpu")
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert any(slicer_worker.parse_progress_line(line) for line in run.stdout.splitlines())
    summary = json.loads((tmp_path / "out/input_ct.explanations/explanations.json").read_text())
    assert [(x["lesion_id"], x["lesion_type"]) for x in summary["lesions"]] == [(LESION, "hemangioma")]

    node = slicer_worker.load_worker_explanation(scene, tmp_path / "out", "lesion 2 attribution")
    written = read_ct(next((tmp_path / "out").glob("*.explanations/lesion_2.attribution.nrrd")))
    assert np.allclose(mrml.world_ijk_to_ras(node), written.ijk_to_ras, atol=1e-4)
    assert node.GetStorageNode() is None  # the worker's folder is temporary
    display = node.GetDisplayNode()
    assert display.GetColorNode().GetName() == mrml.ATTRIBUTION_COLOR_NODE_NAME
    assert display.GetLevel() == 0.0 and display.GetWindow() > 0
    colors = display.GetColorNode()
    assert colors.GetNumberOfColors() == 256
    rgba_low, rgba_mid, rgba_high = ([0.0] * 4 for _ in range(3))
    colors.GetColor(0, rgba_low), colors.GetColor(128, rgba_mid), colors.GetColor(255, rgba_high)
    assert rgba_low[2] > rgba_low[0] and rgba_high[0] > rgba_high[2]  # blue against, red for
    assert rgba_mid[3] < 0.01 < rgba_low[3]  # no attribution: transparent over the CT
    again = mrml.load_attribution_volume(scene, next((tmp_path / "out").glob("*.explanations/*.nrrd")), "again")
    assert again.GetDisplayNode().GetColorNodeID() == display.GetColorNodeID()  # one colour table per scene
