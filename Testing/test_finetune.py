"""Fine-tuning: samples like the engine's, a new registry version with before/after metrics that is never
activated, JSON progress, CLI (finetune / export / models), a SIGKILLed run (mid-training and mid-save)
that leaves the registry consistent, and a 2-process torchrun (DDP, gloo) run. Tiny models, tiny phantoms."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from liverlesionai import cli
from liverlesionai.errors import InputError
from liverlesionai.export import load_dataset, manifest_sha256
from liverlesionai.evaluation import evaluate_case
from liverlesionai.finetune import (
    SAME_LESIONS_TYPE_ACCURACY, FinetuneCancelled, FinetuneSettings, PreparedCase, case_batch, export_phantom_case,
    exported_tissue, finetune, local_cuda_index, metrics_of, prepare_case, same_lesions_type_accuracy, split_cases,
    version_summary,
)
from liverlesionai.model_io import load_model, save_model
from liverlesionai.networks import CascadeConfig, LesionClassifierHead, UNet2p5D, UNetConfig
from liverlesionai.records import LESION_TYPES
from liverlesionai.registry import ModelRegistry

torch.set_num_threads(1)
TINY = (4, 8, 16, 32)
FAST = dict(epochs_frozen=1, epochs_unfrozen=1, steps_per_epoch=2, batch=2, crop=32, replay_fraction=0.0,
            classifier_epochs=2, classifier_engine_passes=1, classifier_replay=False, guard_cases=1,
            guard_max_in_plane=64, classifier_guard_lesions=6)
FAST_CLI = ["--epochs", "2", "--steps-per-epoch", "2", "--batch", "2", "--crop", "32", "--no-replay",
            "--threads", "1", "--guard-cases", "0", "--guard-lesions", "0"]


def _tiny_model(folder: Path) -> Path:
    cfg = CascadeConfig(UNetConfig(5, 2, TINY), UNetConfig(4, 5, TINY), classifier_patch=32)
    torch.manual_seed(0)
    stage1, stage2, head = UNet2p5D(cfg.stage1), UNet2p5D(cfg.stage2), LesionClassifierHead(cfg)
    with torch.no_grad():  # stage 1 says "background" everywhere: validation runs stay fast
        stage1.decoder.head.bias.copy_(torch.tensor([6.0, -6.0]))
    state = {f"{n}.{k}": v for n, net in (("stage1", stage1), ("stage2", stage2), ("classifier", head))
             for k, v in net.state_dict().items()}
    save_model(folder, state, {"name": "tiny", "version": "tiny", "architecture": cfg.to_dict(),
                               "metrics": {"phantom_test": {"global_lesion_dice": 0.1}}})
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    shipped = _tiny_model(root / "shipped_model")
    dataset = root / "dataset"
    for seed in (3, 4, 5):
        export_phantom_case(dataset, seed, max_in_plane=64)
    return {"root": root, "shipped": shipped, "dataset": dataset}


def _registry(world, name):
    return ModelRegistry(world["root"] / name, shipped_dir=world["shipped"])


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("LIVERLESIONAI_TEST_PAUSE_AT", None)
    return env


def _cli_args(world, registry_name, *extra):
    return [sys.executable, "-m", "liverlesionai.cli", "finetune", str(world["dataset"]), "--progress-json",
            "--device", "cpu", "--registry", str(world["root"] / registry_name),
            "--shipped-model", str(world["shipped"]), *FAST_CLI, *extra]


def test_split_is_deterministic_and_needs_two_cases(world):
    cases = load_dataset(world["dataset"])
    train, val = split_cases(cases)
    assert len(val) == 1 and len(train) == 2
    assert [c.case_id for c in split_cases(list(reversed(cases)))[1]] == [val[0].case_id]
    with pytest.raises(ValueError, match="at least 2"):
        split_cases(cases[:1])


def test_training_samples_look_like_the_engines_stage2_input(world):
    cfg = CascadeConfig(UNetConfig(5, 2, TINY), UNetConfig(4, 5, TINY))
    case = prepare_case(load_dataset(world["dataset"])[0], cfg)
    assert case.hu.shape == case.label.shape and set(np.unique(case.label)) <= {0, 1, 2, 3, 4}
    assert case.lesion_types, "phantom seeds 3-5 all have lesions"
    settings = FinetuneSettings(batch=6, crop=32, lesion_crop_fraction=1.0)
    x, y, w = case_batch([case], cfg, np.random.default_rng(0), settings)
    assert x.shape == (6, 4, 32, 32) and y.shape == w.shape == (6, 32, 32)
    assert x[:, :3].min() >= -1 and x[:, :3].max() <= 1 and 0 <= x[:, 3].min() and x[:, 3].max() <= 1
    assert (y >= 2).any(), "lesion-centred crops contain lesion pixels"
    assert (w[y < 2] == 1).all()
    # inverse lesion-size weighting: a 3x3x3 lesion weighs 150/9 per pixel
    hu = np.full((40, 40, 40), 100.0, np.float32)
    label = np.ones((40, 40, 40), np.uint8)
    label[19:22, 19:22, 19:22] = 4
    small = PreparedCase("x", hu, label, (label == 4).astype(np.uint16), np.argwhere(label == 4), {1: "metastasis"})
    x, y, w = case_batch([small], cfg, np.random.default_rng(1), settings)
    assert (y == 4).any() and torch.allclose(w[y == 4], torch.tensor(150 / 9)) and (w[y != 4] == 1).all()


def test_training_priors_have_stage1_like_errors():
    """The liver prior of exported crops is wrong the way stage 1 is (as in the parent's training): it leaks
    into soft tissue touching the liver and sometimes leaves lesions out (not always: some priors are near right)."""
    from liverlesionai import phantom as ph

    hu = np.full((40, 64, 64), -1024.0, np.float32)
    label = np.zeros(hu.shape, np.uint8)
    hu[:, :, 8:56], label[:, :, 8:32] = 50.0, 1  # liver (left) touching muscle (right), air around
    label[16:24, 28:36, 16:24] = 4  # a metastasis in the liver
    tissue = exported_tissue(hu, label)
    assert (tissue[label == 1] == ph.LIVER).all() and (tissue[label == 4] == ph.LESION).all()
    assert (tissue[:, :, 32:56] == ph.MUSCLE).all() and (tissue[:, :, :8] == ph.AIR).all()
    case = PreparedCase("x", hu, label, (label == 4).astype(np.uint16), np.argwhere(label == 4), {1: "metastasis"})
    cfg = CascadeConfig(UNetConfig(5, 2, TINY), UNetConfig(4, 5, TINY))
    settings = FinetuneSettings(batch=2, crop=64, lesion_crop_fraction=1.0)
    rng = np.random.default_rng(0)
    leaks = lesions_left_out = 0
    for _ in range(40):
        x, y, _w = case_batch([case], cfg, rng, settings)
        prior, y = x[:, 3].numpy(), y.numpy()
        soft = (y == 0) & (x[:, 1].numpy() > -0.5)  # outside the liver, not air
        leaks += int(((prior > 0.5) & soft).sum() > 20)
        lesions_left_out += int((prior[y == 4] < 0.5).mean() > 0.5) if (y == 4).any() else 0
    assert 0 < leaks < 80 and 0 < lesions_left_out < 80


def test_type_accuracy_is_also_compared_on_the_lesions_both_models_found():
    """A version that finds fewer lesions can gain type accuracy over its own matches without typing any lesion
    better: the card also compares parent and new on the reference lesions both matched."""
    shape = (24, 48, 48)
    k, j, i = np.indices(shape)
    centres = {1: (12, 12, 12), 2: (12, 12, 36), 3: (12, 36, 12), 4: (12, 36, 36)}

    def case(types):  # lesion id -> type, a 10 mm ball at its centre
        liver = np.zeros(shape, np.uint8)
        liver[2:22, 2:46, 2:46] = 1
        instances = np.zeros(shape, np.uint16)
        for lesion_id in types:
            c = centres[lesion_id]
            instances[(k - c[0]) ** 2 + (j - c[1]) ** 2 + (i - c[2]) ** 2 <= 25] = lesion_id
        liver[instances > 0] = 0
        return {"liver_mask": liver, "lesion_instances": instances, "lesion_types": types}

    truth = case({1: "cyst", 2: "metastasis", 3: "hemangioma", 4: "cyst"})
    parent = [evaluate_case(case({1: "cyst", 2: "metastasis", 3: "metastasis", 4: "metastasis"}), truth, np.eye(4),
                            case_id="a")]
    new = [evaluate_case(case({1: "cyst"}), truth, np.eye(4), case_id="a")]  # finds one lesion, types it right
    own = metrics_of({"": parent})["type_accuracy"], metrics_of({"": new})["type_accuracy"]
    assert own == (0.5, 1.0)
    name = "site_phantom_" + SAME_LESIONS_TYPE_ACCURACY
    assert same_lesions_type_accuracy(parent, new, "site_phantom_") == ({name: 1.0}, {name: 1.0})
    # the same lesion ids in another case are other lesions; nothing shared, nothing compared
    elsewhere = [{**new[0], "case_id": "b"}]
    assert same_lesions_type_accuracy(parent, elsewhere) == ({}, {})
    new_wrong = [evaluate_case(case({1: "metastasis", 2: "cyst"}), truth, np.eye(4), case_id="a")]
    assert same_lesions_type_accuracy(parent, new_wrong) == ({SAME_LESIONS_TYPE_ACCURACY: 1.0},
                                                             {SAME_LESIONS_TYPE_ACCURACY: 0.0})


def test_finetune_adds_an_inactive_version_with_before_after_metrics(world):
    registry = _registry(world, "reg_api")
    seen = []
    version = finetune(world["dataset"], registry, None, FinetuneSettings(**FAST), "cpu", seen.append)
    assert version == "v0001"
    assert registry.active_version() == "shipped"  # never activated by fine-tuning
    card = json.loads((registry.model_dir(version) / "model_card.json").read_text())
    assert card["parent_version"] == "shipped"
    assert card["dataset_manifest_sha256"] == manifest_sha256(world["dataset"])
    assert card["hyperparameters"]["steps_per_epoch"] == 2 and card["hyperparameters"]["world_size"] == 1
    val = card["validation"]
    assert len(val["cases"]) == 1 and val["cases"][0] not in card["training_cases"]
    assert {"lesion_dice", "liver_dice"} <= set(val["parent"]) and set(val["parent"]) == set(val["new"])
    # the original-domain guard is measured for both and compared like the other metrics
    assert {"original_domain_lesion_dice", "original_domain_liver_dice"} <= set(val["new"])
    # the tiny model finds no liver, so no lesion to re-fit or guard the classifier on: the parent's head
    # stays, and the search for guard lesions gives up after 3 empty phantoms (the shipped model's re-fit:
    # test_finetune_refits_the_classifier_on_engine_lesions)
    assert card["classifier_guard"] == {"lesions": 0, "parent_lesions": 0, "phantoms": 3, "masks": "engine",
                                        "refit_weight": 0.0, "kept": "parent"}
    assert "original_domain_classifier_accuracy" not in val["new"]
    # the selection compared every epoch with the parent under a filter re-tuned the same way
    assert set(val["parent_with_retuned_filter"]) == set(val["parent"]) - {"original_domain_classifier_accuracy"} - {
        k for k in val["parent"] if k.endswith(SAME_LESIONS_TYPE_ACCURACY)}
    assert all("candidate_filter" in h for h in card["finetune_history"])
    comparison = registry.compare(version)
    assert comparison.comparable and comparison.same_cases
    stages = {p.stage for p in seen}
    assert {"prepare", "phase A", "phase B", "validate", "save", "done"} <= stages
    assert seen[-1].fraction == 1.0 and all(0 <= p.fraction <= 1 for p in seen)
    assert any(p.loss is not None and p.eta_s is not None for p in seen)
    # cancel: nothing written
    with pytest.raises(FinetuneCancelled):
        finetune(world["dataset"], registry, None, FinetuneSettings(**FAST), "cpu",
                 cancel=lambda: True)
    assert [v.version for v in registry.list_versions()] == ["shipped", "v0001"]


def _wait_for(proc, predicate, timeout=300):  # generous: CI machines can be very loaded
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if predicate(line):
            return lines
    proc.kill()
    raise AssertionError("condition not reached; output:\n" + "".join(lines) + proc.stderr.read())


def test_killed_finetune_leaves_the_registry_consistent_and_rerun_works(world, tmp_path):
    name = "reg_kill"
    registry = _registry(world, name)
    registry.add_version(*_copy_of_shipped(world), "shipped")  # v0001 exists before
    registry.activate("v0001")
    before = ([v.version for v in registry.list_versions()], registry.active_version())

    # 1) SIGKILL in the middle of training
    proc = subprocess.Popen(_cli_args(world, name), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    lines = _wait_for(proc, lambda l: '"stage": "phase A"' in l)
    progress = json.loads(lines[-1])
    assert {"progress", "message", "stage", "epoch", "loss", "val_dice", "eta_s"} <= set(progress)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # 2) SIGKILL while the new version is being saved (weights written, folder not yet renamed)
    marker = tmp_path / "marker"
    env = dict(_env(), LIVERLESIONAI_TEST_PAUSE_AT="save_model:before_rename",
               LIVERLESIONAI_TEST_PAUSE_MARKER=str(marker), LIVERLESIONAI_TEST_PAUSE_S="900")
    proc = subprocess.Popen(_cli_args(world, name), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "save never reached"
    leftovers = [p.name for p in (world["root"] / name / "versions").iterdir() if p.name.startswith(".")]
    assert leftovers, "the half-saved version should exist as a hidden temp folder"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    reopened = _registry(world, name)
    assert ([v.version for v in reopened.list_versions()], reopened.active_version()) == before
    assert not any(p.name.startswith(".") for p in (world["root"] / name / "versions").iterdir())
    assert not any(v.problem for v in reopened.list_versions())

    # 3) a rerun works and starts from the active version
    rc = subprocess.run(_cli_args(world, name), capture_output=True, text=True, env=_env(), timeout=400)
    assert rc.returncode == 0, rc.stderr
    last = json.loads([l for l in rc.stdout.splitlines() if l.startswith("{")][-1])
    assert last["stage"] == "done" and last["progress"] == 1.0
    reopened = _registry(world, name)
    assert [v.version for v in reopened.list_versions()] == ["shipped", "v0001", "v0002"]
    assert reopened.active_version() == "v0001"
    card = json.loads((reopened.model_dir("v0002") / "model_card.json").read_text())
    assert card["parent_version"] == "v0001"


def _copy_of_shipped(world):
    from liverlesionai.model_io import load_model

    state, card = load_model(world["shipped"])
    return state, {k: v for k, v in card.items() if k in ("name", "architecture")}


def test_models_and_export_commands(world, tmp_path, capsys):
    name = "reg_cli"
    registry = _registry(world, name)
    version = registry.add_version(*_copy_of_shipped(world), "shipped")
    base = ["--registry", str(world["root"] / name), "--shipped-model", str(world["shipped"])]
    assert cli.main(["models", "list", *base]) == 0
    assert "* shipped" in capsys.readouterr().out
    assert cli.main(["models", "activate", version, *base]) == 0
    assert registry.active_version() == version
    assert cli.main(["models", "compare", version, *base]) == 0
    assert "parent shipped" in capsys.readouterr().out
    assert cli.main(["models", "rollback", *base]) == 0
    assert registry.active_version() == "shipped"
    assert cli.main(["models", "activate", "v0099", *base]) == cli.EXIT_MODEL  # unknown version: clear error
    # export from files: CT + reviewed seg.nrrd
    from liverlesionai.phantom import generate_phantom_ct
    from liverlesionai.segfile import write_seg_nrrd
    from liverlesionai.volume_io import write_volume
    from liverlesionai.records import SegmentationResult

    ct, truth = generate_phantom_ct(11, max_in_plane=48)
    write_volume(tmp_path / "ct.nii.gz", ct.voxels, ct.ijk_to_ras)
    write_seg_nrrd(tmp_path / "r.seg.nrrd", SegmentationResult(truth.liver_mask, np.zeros_like(truth.lesion_instances),
                                                               [], ct.ijk_to_ras, model_version="shipped"))
    assert cli.main(["export", str(tmp_path / "ds"), "--ct", str(tmp_path / "ct.nii.gz"),
                     "--seg", str(tmp_path / "r.seg.nrrd")]) == 0
    assert len(load_dataset(tmp_path / "ds")) == 1


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_processes_gloo(world):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    name = "reg_ddp"
    args = _cli_args(world, name)[1:]  # drop the python executable
    args = [torchrun, "--standalone", "--nproc_per_node=2", "-m", *args[1:]]
    rc = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=400)
    assert rc.returncode == 0, rc.stderr[-3000:]
    registry = _registry(world, name)
    assert [v.version for v in registry.list_versions()] == ["shipped", "v0001"]  # only rank 0 saved
    card = json.loads((registry.model_dir("v0001") / "model_card.json").read_text())
    assert card["hyperparameters"]["world_size"] == 2


def test_selection_never_prefers_an_epoch_that_forgot_the_original_domain():
    from liverlesionai.finetune import _selection_score

    parent = {"lesion_dice": 0.2, "liver_dice": 0.9, "original_domain_lesion_dice": 0.50}
    forgot = {"lesion_dice": 0.6, "liver_dice": 0.9, "original_domain_lesion_dice": 0.47}  # -3 points
    kept = {"lesion_dice": 0.4, "liver_dice": 0.9, "original_domain_lesion_dice": 0.49}  # -1 point
    score = lambda m: _selection_score(m, parent, max_guard_drop=0.02)  # noqa: E731
    assert score(kept) > _selection_score(parent) > score(forgot)
    no_guard = {"lesion_dice": 0.6, "liver_dice": 0.9}
    assert score(no_guard) > score(kept)  # without guard metrics, plain lesion Dice decides
    # detection F1 on the guard counts too: an epoch that finds fewer original-domain lesions is out
    parent_f1 = {**parent, "original_domain_detection_f1": 0.48}
    fewer_found = {**kept, "original_domain_detection_f1": 0.42}
    assert _selection_score(fewer_found, parent_f1) < _selection_score(parent_f1)
    assert _selection_score({**kept, "original_domain_detection_f1": 0.47}, parent_f1) == score(kept)
    # a held-out gain below min_gain is noise: such an epoch does not beat the parent
    barely = {**kept, "lesion_dice": 0.205}
    assert _selection_score(barely, parent, 0.02, min_gain=0.01) < _selection_score(parent)
    assert _selection_score(kept, parent, 0.02, min_gain=0.01) == score(kept) > _selection_score(parent)
    # behind a gate detection F1 counts beside lesion Dice: more overlap on fewer lesions need not win
    overlap, finds = {**kept, "lesion_dice": 0.45, "detection_f1": 0.15}, {**kept, "detection_f1": 0.30}
    assert score(overlap) > score(finds)
    assert _selection_score(finds, parent, 0.02, detection_weight=1.0) > \
        _selection_score(overlap, parent, 0.02, detection_weight=1.0)


def test_classifier_guard_keeps_the_most_adapted_head_that_remembers():
    from liverlesionai.finetune import choose_head

    by_weight = lambda *acc: dict(zip((1.0, 0.75, 0.5, 0.25, 0.0), acc))  # noqa: E731
    assert choose_head(0.80, by_weight(0.79, 0.80, 0.80, 0.80, 0.80), 0.02) == 1.0  # within 2 points
    assert choose_head(0.80, by_weight(0.70, 0.75, 0.79, 0.80, 0.80), 0.02) == 0.5  # part-way back
    assert choose_head(0.80, by_weight(0.70, 0.70, 0.72, 0.75, 0.80), 0.02) == 0.0  # the parent's head
    # stage 2 changed so that the parent head no longer fits its features: the most accurate one is kept
    assert choose_head(0.80, by_weight(0.70, 0.72, 0.71, 0.60, 0.50), 0.02) == 0.75
    assert choose_head(0.80, by_weight(0.70, 0.70, 0.60, 0.60, 0.50), 0.02) == 1.0  # ties: more adapted


def test_blended_heads_lie_between_parent_and_refit():
    from liverlesionai.finetune import blend_heads

    cfg = CascadeConfig(UNetConfig(5, 2, TINY), UNetConfig(4, 5, TINY), classifier_patch=32)
    torch.manual_seed(0)
    parent, refit = LesionClassifierHead(cfg).eval(), LesionClassifierHead(cfg).eval()
    with torch.no_grad():
        parent.temperature.fill_(1.7)
        refit.temperature.fill_(1.7)
    features = torch.randn(5, 3 * LesionClassifierHead.view_size(cfg))
    with torch.no_grad():
        assert torch.allclose(blend_heads(parent, refit, 1.0).logits(features), refit.logits(features))
        assert torch.allclose(blend_heads(parent, refit, 0.0).logits(features), parent.logits(features))
        half = blend_heads(parent, refit, 0.5)
        w = half.mlp[0].weight
        assert torch.allclose(w, (parent.mlp[0].weight + refit.mlp[0].weight) / 2)
        assert float(half.temperature) == pytest.approx(1.7)
        assert not torch.allclose(half.logits(features), refit.logits(features))


def test_torchrun_with_more_processes_than_gpus_is_a_clear_error():
    assert [local_cuda_index(r, 2) for r in (0, 1)] == [0, 1]
    with pytest.raises(InputError, match=r"more processes on this machine than it has GPUs \(1\).*--nproc_per_node=1"):
        local_cuda_index(1, 1)


def test_stage2_blend_is_the_most_adapted_one_that_passes():
    from liverlesionai.finetune import STAGE2_BLEND_WEIGHTS, blend_states, first_passing_blend

    torch.manual_seed(0)
    parent, top = UNet2p5D(UNetConfig(4, 5, TINY)).state_dict(), UNet2p5D(UNetConfig(4, 5, TINY)).state_dict()
    half = blend_states(parent, top, 0.5)
    name = next(k for k, v in top.items() if v.is_floating_point() and not torch.equal(v, parent[k]))
    assert torch.allclose(half[name], (parent[name] + top[name]) / 2)
    counter = next(k for k in top if k.endswith("num_batches_tracked"))
    assert half[counter].dtype == top[counter].dtype
    net = UNet2p5D(UNetConfig(4, 5, TINY))
    net.load_state_dict(half)  # a blend is a loadable stage 2

    tried = []

    def score_of(passing_from):
        def score(weight, state):
            tried.append(weight)
            return (1.0 if weight <= passing_from else -9.0), f"filter for {weight}"
        return score

    weight, state, score, extra = first_passing_blend(parent, top, score_of(0.5), best_score=0.5)
    assert (weight, score, extra) == (0.5, 1.0, "filter for 0.5") and tried == [0.75, 0.5]  # stops at the first
    assert torch.allclose(state[name], half[name])
    tried.clear()
    assert first_passing_blend(parent, top, score_of(0.0), best_score=0.5) is None  # none passes: parent kept
    assert tried == list(STAGE2_BLEND_WEIGHTS)


def test_classifier_samples_are_the_lesions_the_engine_finds(shipped_model_dir, tmp_path):
    """The head is re-fitted and guarded on the engine's own lesions: the same ones on every call, the
    guard's parent run on exactly the same phantoms, the exported cases' lesions with their reviewed types."""
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.finetune import engine_phantom_lesions, exported_lesion_samples, head_accuracy
    from liverlesionai.training import engine_lesion_samples, fresh_phantom_cases

    engine = LiverLesionEngine(shipped_model_dir, device="cpu", threads=1, precision="fp32")
    calls = []
    variants = (lambda: calls.append("new"), lambda: calls.append("parent"))  # the same networks here
    [(f1, l1), (f2, l2)], used = engine_phantom_lesions(engine, 600_003, 2, 128, variants)
    assert len(l1) == 2 and used == 1  # this phantom has 2 lesions the engine matches (a cyst, a metastasis)
    assert calls == ["new", "parent"]  # one phantom, generated once, segmented once per variant
    assert torch.equal(l1, l2) and torch.allclose(f1, f2)  # same engine: same lesions on every call
    # what the engine itself types them as, through the head it carries
    _, _, lesions, _ = engine_lesion_samples(engine, fresh_phantom_cases(600_003, used, 128), log=lambda m: None)
    engine_right = np.mean([les["pred_type"] == LESION_TYPES[int(t)] for les, t in zip(lesions, l1)])
    assert head_accuracy(engine.classifier.cpu(), f1, l1) == pytest.approx(engine_right)
    assert np.isnan(head_accuracy(engine.classifier, f1[:0], l1[:0]))

    dataset = tmp_path / "dataset"
    export_phantom_case(dataset, 600_003, max_in_plane=128)  # the phantom above, exported as reviewed
    f, labels = exported_lesion_samples(engine, load_dataset(dataset), passes=2, rng=np.random.default_rng(0))
    n = len(l1)  # first pass: the exported CT as it is, so the same lesions; then the one with noise added
    assert torch.equal(labels[:n], l1) and torch.allclose(f[:n], f1, atol=1e-4) and len(labels) > n


def test_finetune_refits_the_classifier_on_engine_lesions(shipped_model_dir, tmp_path):
    """With a model that finds lesions (the shipped one), the head is re-fitted on the lesions the engine
    finds in the exported cases and kept only as the guard on the engine's original-domain lesions allows."""
    dataset = tmp_path / "dataset"
    for seed in (600_003, 600_002):  # 2 and 4 lesions the shipped engine finds at this matrix
        export_phantom_case(dataset, seed, max_in_plane=128)
    registry = ModelRegistry(tmp_path / "registry", shipped_dir=shipped_model_dir)
    settings = FinetuneSettings(epochs_frozen=1, epochs_unfrozen=0, steps_per_epoch=1, batch=2, crop=32,
                                replay_fraction=0.0, classifier_epochs=20, classifier_engine_passes=1,
                                guard_cases=1, guard_max_in_plane=128, classifier_guard_lesions=4,
                                domain_gate=False)  # one domain here: the classifier guard's path
    logged = []
    version = finetune(dataset, registry, None, settings, "cpu", log=logged.append)
    card = json.loads((registry.model_dir(version) / "model_card.json").read_text())
    samples = [int(m.split()[1]) for m in logged if m.startswith("classifier:")]
    assert samples and samples[0] >= 1  # the training case's lesions, as the engine segments them
    guard = card["classifier_guard"]
    assert guard["masks"] == "engine" and guard["lesions"] >= 4 and guard["phantoms"] >= 1
    if card["hyperparameters"]["best_epoch"] == 0:  # stage 2 unchanged: the parent found the same lesions
        assert guard["parent_lesions"] == guard["lesions"] and guard["parent_head"] == guard["parent_model"]
    assert guard["kept_head"] == guard["by_refit_weight"][str(guard["refit_weight"])]
    within = [w for w, a in guard["by_refit_weight"].items() if float(w) > 0 and a >= guard["parent_model"] - 0.02]
    assert guard["refit_weight"] == (max(map(float, within)) if within else guard["refit_weight"])
    assert card["validation"]["new"]["original_domain_classifier_accuracy"] == guard["kept_head"]
    shipped_head = {k: v for k, v in load_model(shipped_model_dir)[0].items() if k.startswith("classifier.")}
    new_head = {k: v for k, v in load_model(registry.model_dir(version))[0].items() if k.startswith("classifier.")}
    changed = any(not torch.equal(shipped_head[k], new_head[k]) for k in shipped_head)
    assert changed == (guard["refit_weight"] > 0)


def test_distillation_pulls_towards_the_teacher():
    from liverlesionai.training import distillation_loss, train_step

    torch.manual_seed(0)
    net = UNet2p5D(UNetConfig(4, 5, TINY))
    teacher = UNet2p5D(UNetConfig(4, 5, TINY)).eval()
    teacher.load_state_dict(net.state_dict())
    net.eval()  # same BatchNorm behaviour as the teacher: identical outputs
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        assert distillation_loss(net(x), teacher(x)).item() == pytest.approx(0.0, abs=1e-6)
        assert distillation_loss(net(x), -teacher(x)).item() > 0.01
    batch = (x, torch.randint(0, 5, (2, 32, 32)), torch.ones(2, 32, 32))
    loss_plain = train_step(net, torch.optim.SGD(net.parameters(), lr=0.0), batch, torch.device("cpu"))
    loss_same = train_step(net, torch.optim.SGD(net.parameters(), lr=0.0), batch, torch.device("cpu"), teacher)
    assert loss_same == pytest.approx(loss_plain, abs=1e-5)  # KL to an identical teacher adds nothing
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.5 * torch.randn_like(p))
    loss_other = train_step(net, torch.optim.SGD(net.parameters(), lr=0.0), batch, torch.device("cpu"), teacher)
    assert loss_other > loss_plain + 1e-3


def test_candidate_filter_choice_on_known_evidence():
    from liverlesionai.training import choose_candidate_filter, filtered_detection

    # true lesions: confident and inside the organ; false ones: unsure, or a confident shell on the surface
    evidence = {"confidence": np.array([0.9, 0.85, 0.8, 0.55, 0.6, 0.9]),
                "surface_fraction": np.array([0.1, 0.2, 0.3, 0.1, 0.0, 0.95])}
    is_tp = np.array([True, True, True, False, False, False])
    tuning = choose_candidate_filter((evidence, is_tp, 1), log=lambda m: None)
    # every threshold between the classes gives the same F1; the most permissive one is chosen
    assert (tuning["min_lesion_confidence"], tuning["max_surface_fraction"]) == (0.65, 0.9)
    assert tuning["validation_f1"] == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))
    assert tuning["validation_f1_unfiltered"] == pytest.approx(2 * 3 / (2 * 3 + 3 + 1))
    # the counts behind the choice: a confidence limit of 0.82 drops one true lesion and the unsure false ones
    counts = filtered_detection((evidence, is_tp, 1), {"min_lesion_confidence": 0.82, "max_surface_fraction": 1.0})
    assert counts == {"tp": 2, "fp": 1, "fn": 2, "f1": pytest.approx(4 / 7)}


def test_retuned_validation_chooses_and_measures_on_one_network_pass(shipped_model_dir):
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.finetune import guard_phantoms, retuned_validation_metrics, validation_metrics
    from liverlesionai.networks import FILTER_OFF
    from liverlesionai.training import candidate_evidence, choose_candidate_filter

    engine = LiverLesionEngine(shipped_model_dir, device="cpu", threads=1, precision="fp32")
    guard = guard_phantoms(3, 160)
    shipped = engine.config.candidate_filter
    metrics, tuning = retuned_validation_metrics(engine, [], guard, log=lambda m: None)
    assert tuning["candidates"] > 0
    assert 0.0 <= tuning["validation_f1_unfiltered"] <= tuning["validation_f1"] <= 1.0
    assert engine.config.candidate_filter == {key: tuning[key] for key in FILTER_OFF}
    assert metrics["original_domain_detection_f1"] == pytest.approx(tuning["validation_f1"])

    # the same choice as tuning on a separate pass made without a filter
    engine.config.set_candidate_filter(FILTER_OFF)
    separate = choose_candidate_filter(candidate_evidence(engine, guard), log=lambda m: None)
    assert {key: separate[key] for key in FILTER_OFF} == {key: tuning[key] for key in FILTER_OFF}
    # and what the engine reports under the chosen filter (up to voxels where a dropped candidate touched
    # a kept one)
    engine.config.set_candidate_filter(tuning)
    engine_metrics = validation_metrics(engine, [], guard)
    assert set(engine_metrics) == set(metrics)
    for key in ("original_domain_detection_f1", "original_domain_type_accuracy"):
        assert engine_metrics[key] == pytest.approx(metrics[key])
    for key in ("original_domain_lesion_dice", "original_domain_liver_dice"):
        assert engine_metrics[key] == pytest.approx(metrics[key], abs=0.002)
    assert tuning["validation_f1"] > tuning["validation_f1_unfiltered"]  # candidates were dropped

    # nothing to tune on (no candidate): the thresholds stay as they were
    engine.config.set_candidate_filter(shipped)
    assert retuned_validation_metrics(engine, [], [], log=lambda m: None)[1] is None
    assert engine.config.candidate_filter == shipped
    # nor with candidates none of which is a true lesion (all thresholds tie at F1 0: the most permissive
    # would win)
    no_lesions = [(case_id, ct, {**truth, "lesion_instances": np.zeros_like(truth["lesion_instances"]),
                                 "lesion_types": {}}) for case_id, ct, truth in guard]
    assert retuned_validation_metrics(engine, [], no_lesions, log=lambda m: None)[1] is None
    assert engine.config.candidate_filter == shipped


def test_finetune_behind_a_domain_gate_keeps_the_parent_for_its_own_domain(shipped_model_dir, tmp_path):
    """Exported cases of another acquisition (liver 60-80 HU, noisier): the fine-tuned networks become a site
    expert behind a gate; the parent's networks stay as they were and still run on original-domain CTs, so
    those give exactly the parent's result. A gated version fine-tuned again stays gated on the same parent."""
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.phantom import generate_phantom_ct

    shift = {"liver_hu": [60, 80], "noise_hu": [25, 35], "lesion_contrast_scale": 0.5}
    dataset = tmp_path / "dataset"
    for seed in (600_003, 600_002):
        export_phantom_case(dataset, seed, domain=shift, max_in_plane=128)
    registry = ModelRegistry(tmp_path / "registry", shipped_dir=shipped_model_dir)
    settings = FinetuneSettings(epochs_frozen=1, epochs_unfrozen=0, steps_per_epoch=1, batch=2, crop=32,
                                replay_fraction=0.0, classifier_epochs=5, classifier_engine_passes=1,
                                guard_cases=2, guard_max_in_plane=128, min_heldout_gain=-1.0,
                                site_validation_phantoms=1, site_head_phantoms=1)
    version = finetune(dataset, registry, None, settings, "cpu")
    card = json.loads((registry.model_dir(version) / "model_card.json").read_text())
    site_phantoms = card["site_phantom_domain"]  # read from the one training case: 60-80 HU, noise 25-35
    assert 50 <= site_phantoms["liver_hu"][0] < site_phantoms["liver_hu"][1] <= 90
    assert site_phantoms["noise_hu"][0] > 15  # the default domain's noise is 6-22 HU
    # the site-matched validation phantom is measured for both versions, beside the held-out case
    assert {"site_phantom_lesion_dice", "site_phantom_detection_f1"} <= set(card["validation"]["parent"]) & \
        set(card["validation"]["new"])
    gate = card["architecture"]["domain_gate"]
    assert gate["routed_to_site"] == {"exported_training": "1/1", "exported_held_out": "1/1",
                                      "original_domain_guard": "0/2"}
    assert gate["site"]["mean"][0] < 85 < gate["parent"]["mean"][0]  # liver median HU
    assert set(card["architecture"]["site_candidate_filter"]) == {"min_lesion_confidence", "max_surface_fraction"}
    assert card["hyperparameters"]["stage2"] == "site expert behind a domain gate"
    assert card["classifier_guard"] == {"kept": "parent", "reason": "domain gate; the site expert keeps its head"}
    summary = version_summary(version, registry)[0]  # what the panel and the CLI show
    assert "Domain gate:" in summary and "phantoms of the exported cases' acquisition" in summary
    shipped_state, new_state = load_model(shipped_model_dir)[0], load_model(registry.model_dir(version))[0]
    assert all(torch.equal(v, new_state[k]) for k, v in shipped_state.items())  # the parent expert, untouched
    assert {k[len("site."):] for k in new_state if k.startswith("site.")} == \
        {k for k in shipped_state if k.startswith(("stage2.", "classifier."))}
    assert all(torch.equal(v, new_state["site." + k]) for k, v in shipped_state.items() if k.startswith("classifier."))
    val = card["validation"]  # the guard phantoms ran the parent expert: nothing lost there
    assert all(val["new"][k] == val["parent"][k] for k in val["parent"] if k.startswith("original_domain_"))
    # so every lesion typed there was found by both, and typed alike
    same_lesions = "original_domain_" + SAME_LESIONS_TYPE_ACCURACY
    assert val["new"][same_lesions] == val["parent"][same_lesions] == val["parent"]["original_domain_type_accuracy"]

    parent_engine = LiverLesionEngine(shipped_model_dir, device="cpu", precision="fp32")
    gated_engine = LiverLesionEngine(registry.model_dir(version), device="cpu", precision="fp32")
    original_ct, _ = generate_phantom_ct(600_021, max_in_plane=128)
    shifted_ct, _ = generate_phantom_ct(600_021, max_in_plane=128, domain=shift)
    by_parent, by_gated = parent_engine.segment(original_ct), gated_engine.segment(original_ct)
    assert by_gated.expert == "parent" and np.array_equal(by_gated.lesion_instances, by_parent.lesion_instances)
    assert [r.probabilities for r in by_gated.lesions] == [r.probabilities for r in by_parent.lesions]
    by_site = gated_engine.segment(shifted_ct)
    assert by_site.expert == "site" and any(m.startswith("Fine-tuned networks used") for m in by_site.messages)

    # no training steps: what is checked is that the gated parent stays gated on the same parent expert
    # (and, with site_head_refit, re-fits the site head on the site expert's lesions)
    again = finetune(dataset, registry, version, replace(settings, domain_gate=False, epochs_frozen=0,
                                                         site_head_refit=True), "cpu")
    again_card = json.loads((registry.model_dir(again) / "model_card.json").read_text())
    assert again_card["classifier_guard"] == {"kept": "refit", "masks": "engine", "reason": "domain gate"}
    assert again_card["architecture"]["domain_gate"]["routed_to_site"]["original_domain_guard"] == "0/2"
    again_state = load_model(registry.model_dir(again))[0]
    assert all(torch.equal(v, again_state[k]) for k, v in shipped_state.items())
