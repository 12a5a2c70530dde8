"""Training from scratch on phantoms: samplers, weighted loss, resumable stages, model assembly."""

import json

import numpy as np
import pytest
import torch

from liverlesionai import training as T
from liverlesionai.engine import LiverLesionEngine
from liverlesionai.model_io import load_model, read_model_card
from liverlesionai.networks import EVIDENCE_KEYS, FILTER_OFF, STAGE2_FIRST_LESION, STAGE2_LIVER, CascadeConfig
from liverlesionai.phantom import generate_phantom_ct


def test_samplers_shapes_and_targets():
    cfg = CascadeConfig()
    rng = np.random.default_rng(0)
    source = T.PhantomSource(T.TRAIN_SEED_BASE, reuse=4)
    x, y, w = T.stage1_batch(source, cfg, rng, batch=4)
    assert x.shape == (4, 5, 96, 96) and y.shape == (4, 96, 96) and w.shape == y.shape
    assert x.min() >= -1 and x.max() <= 1 and set(np.unique(y.numpy())) <= {0, 1}
    assert w.min() >= 1 and (w[y == 0] == 1).all()  # only lesions (liver in stage 1's target) weigh more
    x2, y2, w2 = T.stage2_batch(source, cfg, rng, batch=4)
    assert x2.shape == (4, 4, 96, 96) and y2.max() <= 4 and w2.min() >= 1


def test_inverse_lesion_size_weights():
    inst = np.zeros((64, 64), np.uint16)
    inst[2:4, 2:4] = 1  # 4 px lesion
    inst[20:50, 20:50] = 2  # 900 px lesion
    w = T.lesion_pixel_weights(inst, target_area=150, max_weight=25)
    small_total, large_total = w[inst == 1].sum(), w[inst == 2].sum()
    assert w[inst == 0].max() == 1 and w[inst == 1].min() == 25
    assert small_total / 4 > large_total / 900  # a small lesion's pixels weigh more


def test_stage1_lesion_weights_cover_large_lesions():
    inst = np.zeros((64, 64), np.uint16)
    inst[2:4, 2:4] = 1  # 4 px at 3 mm: a 6 mm lesion
    inst[10:50, 10:50] = 2  # 1600 px: a lesion of 12 cm
    w = T.lesion_pixel_weights(inst, **T.STAGE1_LESION_WEIGHTS)
    assert w[inst == 0].max() == 1
    assert w[inst == 1].min() == pytest.approx(T.STAGE1_LESION_WEIGHTS["target_area"] / 4)  # inverse size
    # the large lesion is not down-weighted to the liver's 1: carving it out of the liver must cost
    assert w[inst == 2].min() == T.STAGE1_LESION_WEIGHTS["min_weight"] > 1


def test_loss_prefers_correct_prediction():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:5, 2:5] = 2
    good = torch.nn.functional.one_hot(target, 5).permute(0, 3, 1, 2).float() * 10
    bad = torch.zeros_like(good)
    assert T.dice_ce_loss(good, target) < T.dice_ce_loss(bad, target)


def test_stage2_priors_carry_stage1_like_errors():
    # stage 2 trained on near-perfect priors copied stage 1's errors on real CT; its training priors
    # must leak into touching soft tissue, wander, and sometimes leave lesions out
    from liverlesionai import phantom as ph

    spacing = 1.25
    k, j, i = np.mgrid[:12, :64, :64]
    tissue = np.full((12, 64, 64), ph.VISCERAL_FAT, np.uint8)
    tissue[:, :, :32] = ph.LIVER
    tissue[:, :, 32:40] = ph.MUSCLE  # 10 mm of wall muscle against the liver, fat beyond
    tissue[:, 20:30, 20:30] = ph.LESION
    liver = np.isin(tissue, T.LIVER_TISSUES)
    far_fat = i >= 52  # >= 25 mm from the liver
    leaked, lesion_left_out, wandered = 0, 0, 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        clean = T._liver_prior(liver, np.random.default_rng(seed), spacing) > 0.5
        assert not clean[:, :, 36:].any() and clean[:, :, :28].all()  # blurred and shifted, no errors
        prior = T._liver_prior(liver, rng, spacing, tissue) > 0.5
        assert not prior[far_fat].any()
        leaked += prior[:, :, 34:38].mean() > 0.2
        lesion_left_out += not prior[:, 22:28, 22:28].any()
        wandered += prior[:, :, 26:30].mean() < 0.9
    assert 5 <= leaked <= 35 and 3 <= lesion_left_out <= 20 and wandered >= 3


def test_a_training_batch_is_a_function_of_its_step_and_workers_render_the_same_batches(tmp_path):
    """A step's batch depends on the step alone (a resumed run draws what an uninterrupted one would); rendered ahead
    in two worker processes the stream is the in-process stream, batch for batch; a stage trained with workers
    resumes and finishes like one trained without."""
    import functools

    make_batch = functools.partial(T.training_batch, "stage2", T.STAGE_SEED_BASES["stage2"], 2, 4, None)
    again = T.training_batch("stage2", T.STAGE_SEED_BASES["stage2"], 2, 4, None, 5)
    assert all(torch.equal(a, b) for a, b in zip(make_batch(5), again))
    assert not torch.equal(make_batch(5)[0], make_batch(6)[0])
    in_process = list(T.BatchStream(make_batch, range(4, 7)))
    stream = T.BatchStream(make_batch, range(4, 7), workers=2)
    try:
        ahead = list(stream)
    finally:
        stream.close()
    assert len(ahead) == len(in_process) == 3
    assert all(torch.equal(a, b) for batch, other in zip(ahead, in_process) for a, b in zip(batch, other))
    assert [tuple(t.shape) for t in ahead[0]] == [(4, 4, 96, 96), (4, 96, 96), (4, 96, 96)]
    for workers in (0, 2):
        run = tmp_path / f"run{workers}"
        torch.manual_seed(0)  # the same initial weights
        T.train_stage("stage1", run, 2, device="cpu", batch=4, log=lambda m: None, workers=workers)
        T.train_stage("stage1", run, 3, device="cpu", batch=4, log=lambda m: None, workers=workers)
    weights = [torch.load(tmp_path / f"run{w}" / "stage1.ckpt", weights_only=True)["model"] for w in (0, 2)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_stage2_batches_of_thick_slices_are_functions_of_their_step_and_bad_fractions_are_named():
    """thick_fraction renders stage 2's blocks as resampled thick-slice CTs (phantom.render_thick_slices): still a
    function of the step, with the same slab layout; a share outside 0..1, or one asked of stage 1, is refused."""
    thick = T.training_batch("stage2", T.STAGE_SEED_BASES["stage2"], 2, 4, None, 5, thick_fraction=1.0)
    again = T.training_batch("stage2", T.STAGE_SEED_BASES["stage2"], 2, 4, None, 5, thick_fraction=1.0)
    fine = T.training_batch("stage2", T.STAGE_SEED_BASES["stage2"], 2, 4, None, 5)
    assert all(torch.equal(a, b) for a, b in zip(thick, again))
    assert [t.shape for t in thick] == [t.shape for t in fine] and not torch.equal(thick[0], fine[0])
    assert (thick[1] >= STAGE2_FIRST_LESION).any() or (thick[1] == STAGE2_LIVER).any()
    with pytest.raises(ValueError, match="a share of the blocks"):
        T.training_batch("stage2", T.STAGE_SEED_BASES["stage2"], 2, 4, None, 5, thick_fraction=1.5)
    with pytest.raises(ValueError, match="stage 2's"):
        T.training_batch("stage1", T.STAGE_SEED_BASES["stage1"], 4, 4, None, 5, thick_fraction=0.5)


def test_stage2_vessel_weight_weighs_only_the_intrahepatic_vessels_and_bad_factors_are_named(tmp_path):
    """vessel_weight multiplies the loss weight of the intrahepatic vessels' pixels and nothing else: the slabs,
    targets and every other weight are the unweighted batch's. A factor that is no factor, or one asked of stage 1,
    is refused, and a bank rendered with it is another bank."""
    plain = T.training_batch("stage2", T.STAGE_SEED_BASES["stage2"], 2, 4, None, 1)
    vessels = T.training_batch("stage2", T.STAGE_SEED_BASES["stage2"], 2, 4, None, 1, vessel_weight=2.5)
    assert torch.equal(plain[0], vessels[0]) and torch.equal(plain[1], vessels[1])
    changed = plain[2] != vessels[2]
    assert changed.sum() > 100  # this step's blocks cut through vessels
    assert torch.allclose(vessels[2][changed], 2.5 * plain[2][changed])
    assert (plain[1][changed] == STAGE2_LIVER).all()  # the target still calls them liver
    assert changed.sum() < (plain[1] == STAGE2_LIVER).sum() / 10  # the vessels, not the whole liver
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="vessel_weight"):
            T.training_batch("stage2", T.STAGE_SEED_BASES["stage2"], 2, 4, None, 1, vessel_weight=bad)
        with pytest.raises(ValueError, match="vessel_weight"):
            T.render_bank(tmp_path / "bad_bank", 1, 1, CascadeConfig(), batch=4, log=lambda m: None,
                          vessel_weight=bad)
    assert not (tmp_path / "bad_bank").exists()
    with pytest.raises(ValueError, match="stage 2's"):
        T.training_batch("stage1", T.STAGE_SEED_BASES["stage1"], 4, 4, None, 1, vessel_weight=2.0)
    T.render_bank(tmp_path / "bank", 1, 0, CascadeConfig(), batch=4, log=lambda m: None)
    with pytest.raises(ValueError, match="holds another bank"):
        T.render_bank(tmp_path / "bank", 1, 0, CascadeConfig(), batch=4, log=lambda m: None, vessel_weight=2.0)


def test_a_cycle_keeps_the_weights_of_every_nth_step_for_a_learning_curve(tmp_path):
    """With ``keep_every`` the loop keeps the weights of those steps beside its one resumable checkpoint: each is
    the weights the run had then (the last equals the final checkpoint's, earlier ones differ), a resumed run keeps
    on adding them, and a ``keep_every`` the checkpoints cannot give is refused before anything is written."""
    from liverlesionai.networks import UNet2p5D, UNetConfig

    def make_batch(step):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(2, 2, 16, 16, generator=generator)
        return x, (x[:, 0] > 0).long(), torch.ones(2, 16, 16)

    torch.manual_seed(0)
    net = UNet2p5D(UNetConfig(in_channels=2, num_classes=2, features=(4, 8)))
    run, cpu = tmp_path / "run", torch.device("cpu")
    T.train_network(net, make_batch, 4, run, "cycle", cpu, log=lambda m: None, checkpoint_every=1, keep_every=2)
    T.train_network(net, make_batch, 6, run, "cycle", cpu, log=lambda m: None, checkpoint_every=1, keep_every=2)
    kept = {path.name: torch.load(path, weights_only=True) for path in run.glob("cycle.step*.ckpt")}
    assert sorted(kept) == ["cycle.step2.ckpt", "cycle.step4.ckpt", "cycle.step6.ckpt"]
    assert [kept[f"cycle.step{n}.ckpt"]["step"] for n in (2, 4, 6)] == [2, 4, 6]
    final = torch.load(run / "cycle.ckpt", weights_only=True)["model"]
    assert all(torch.equal(final[k], kept["cycle.step6.ckpt"]["model"][k]) for k in final)
    first_conv = "encoder.stages.0.0.0.weight"
    assert not torch.equal(kept["cycle.step2.ckpt"]["model"][first_conv], final[first_conv])
    with pytest.raises(ValueError, match="multiple of checkpoint_every"):
        T.train_network(net, make_batch, 4, tmp_path / "refused", "cycle", cpu, checkpoint_every=50, keep_every=75)
    assert not (tmp_path / "refused").exists()


def test_a_wider_stage2_slab_starts_where_its_parent_is_and_trains_on_wider_batches():
    """networks.with_wider_slab: the widened network gives the parent's output on any input (the added outer slices
    weigh 0 until trained), keeps the prior last, and is refused an even or narrower slab; training_batch renders
    slabs of the width its config says, the same batch for the same step."""
    import functools

    from liverlesionai.networks import UNet2p5D, with_wider_slab

    torch.manual_seed(0)
    parent = UNet2p5D(CascadeConfig().stage2)
    with torch.no_grad():  # BatchNorm statistics other than the identity, as a trained network has
        for module in parent.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    parent.eval()
    wide = with_wider_slab(parent, 7).eval()
    assert wide.config.in_channels == 8 and parent.config.in_channels == 4
    x = torch.randn(2, 8, 32, 32)
    with torch.no_grad():
        assert torch.allclose(wide(x), parent(torch.cat([x[:, 2:5], x[:, 7:]], 1)), atol=1e-5)
        shifted = x.clone()
        shifted[:, 1] += 5.0  # an added slice changes nothing until trained
        assert torch.allclose(wide(shifted), wide(x), atol=1e-5)
        shifted[:, 3] += 5.0  # the parent's centre slice does
        assert not torch.allclose(wide(shifted), wide(x), atol=1e-3)
    for slices in (2, 6, 1):
        with pytest.raises(ValueError, match="odd number of slices of at least 3"):
            with_wider_slab(parent, slices)
    config = CascadeConfig()
    config.stage2 = wide.config
    make_batch = functools.partial(T.training_batch, "stage2", T.STAGE_SEED_BASES["stage2"], 2, 4, None, config=config)
    x, target, weights = make_batch(3)
    assert tuple(x.shape) == (4, 8, 96, 96) and tuple(target.shape) == (4, 96, 96)
    assert 0.0 <= x[:, -1].min() and x[:, -1].max() <= 1.0  # the prior, last
    assert not torch.equal(x[:, 0], x[:, 3])  # seven different slices
    assert torch.equal(make_batch(3)[0], x)


def test_train_resume_assemble_and_run(tmp_path):
    run = tmp_path / "run"
    logs = []
    T.train_stage("stage1", run, 2, device="cpu", batch=4, log=logs.append)
    T.train_stage("stage1", run, 3, device="cpu", batch=4, log=logs.append)  # resumes, one more step
    assert any("resumed at step 2" in line for line in logs)
    assert torch.load(run / "stage1.ckpt", weights_only=True)["step"] == 3
    # a finished stage is not resumed: its checkpoint may hold the weights alone (as rebuilt from a shipped model)
    finished = torch.load(run / "stage1.ckpt", weights_only=True)
    T._save_checkpoint(run / "stage1.ckpt", {"model": finished["model"], "step": 3})
    T.train_stage("stage1", run, 3, device="cpu", batch=4, log=logs.append)
    assert set(torch.load(run / "stage1.ckpt", weights_only=True)) == {"model", "step"}
    T.train_stage("stage2", run, 2, device="cpu", batch=4, log=logs.append)
    T.train_stage("classifier", run, 0, device="cpu", classifier_lesions=6, log=logs.append)
    card = T.assemble_model(run, tmp_path / "model", {"version": "t"})
    assert card["training_steps"] == {"stage1": 3, "stage2": 2, "classifier": 0}
    assert card["architecture"] == json.loads((run / "config.json").read_text())
    state, card2 = load_model(tmp_path / "model")
    assert any(k.startswith("classifier.") for k in state) and card2["weights_sha256"] == card["weights_sha256"]
    ct, _ = generate_phantom_ct(5, max_in_plane=96)
    result = LiverLesionEngine(tmp_path / "model", device="cpu").segment(ct)
    assert result.liver_mask.shape == ct.voxels.shape
    with pytest.raises(FileExistsError):
        T.build_model(run, tmp_path / "model")
    # a head from elsewhere (the one fitted on engine lesions) replaces the run's own classifier
    other = {k: v + 1.0 if v.is_floating_point() else v for k, v in finished_head(run).items()}
    T._save_checkpoint(run / "classifier_engine.ckpt", {"model": other, "info": "{}"})
    T.assemble_model(run, tmp_path / "model_head", {"version": "t"}, classifier_ckpt=run / "classifier_engine.ckpt")
    state_head, _ = load_model(tmp_path / "model_head")
    for name, value in other.items():
        torch.testing.assert_close(state_head[f"classifier.{name}"], value)
    assert all(torch.equal(state_head[k], state[k]) for k in state if not k.startswith("classifier."))


def test_a_built_model_carries_the_tuned_rule_and_the_shipped_main_body_radius(shipped_model_dir):
    """build_model's card: the rule tune_candidate_filter chose, and lesions cut down to their main body with the
    shipped model's radius (v5.12's 2.5 mm), which an engine loading the card applies."""
    tuning = {"lesion_threshold": 0.2, "fill_liver_holes": True, "min_lesion_confidence": 0.45,
              "max_surface_fraction": 0.3, "validation_f1": 0.5}
    rule = T.shipped_lesion_rule(tuning)
    assert rule == {"lesion_threshold": 0.2, "fill_liver_holes": True, "min_lesion_confidence": 0.45,
                    "max_surface_fraction": 0.3, "lesion_appendage_radius_mm": T.LESION_APPENDAGE_RADIUS_MM}
    shipped = read_model_card(shipped_model_dir)["architecture"]
    assert T.LESION_APPENDAGE_RADIUS_MM == shipped["lesion_appendage_radius_mm"] == 2.5
    config = CascadeConfig.from_dict({**CascadeConfig().to_dict(), **rule})
    assert config.lesion_appendage_radius_mm == 2.5 and config.candidate_filter == {
        "min_lesion_confidence": 0.45, "max_surface_fraction": 0.3}


def finished_head(run):
    return torch.load(run / "classifier.ckpt", weights_only=True)["model"]


def test_warm_restarts_continue_the_first_cycles_and_refit_the_classifier_only_for_stage2(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="train stage2 before its restart"):
        T.train_stage("stage2_restart", run, 1, device="cpu", batch=4, log=lambda m: None)
    T.train_stage("stage1", run, 1, device="cpu", batch=4, log=lambda m: None)
    T.train_stage("stage2", run, 2, device="cpu", batch=4, log=lambda m: None)
    T.train_stage("classifier", run, 0, device="cpu", classifier_lesions=6, log=lambda m: None)
    assert T.classifier_is_current(run)

    key = "encoder.stages.0.0.0.weight"
    for part in ("stage1", "stage2"):
        T.train_stage(f"{part}_restart", run, 2, device="cpu", batch=4, log=lambda m: None)
        first = torch.load(run / f"{part}.ckpt", weights_only=True)["model"]
        restart = torch.load(run / f"{part}_restart.ckpt", weights_only=True)["model"]
        fresh = T.UNet2p5D(getattr(CascadeConfig(), part)).state_dict()
        # two warm-up steps move the weights a little from the first cycle's, nowhere near a new initialisation
        assert 0 < (restart[key] - first[key]).norm() < 0.1 * (fresh[key] - first[key]).norm()
        assert T.final_checkpoint(run, part).name == f"{part}_restart.ckpt"
        # the classifier reads stage-2 features only: a new stage 1 keeps it, a new stage 2 does not
        assert T.classifier_is_current(run) == (part == "stage1")

    T.train_stage("classifier", run, 0, device="cpu", classifier_lesions=6, log=lambda m: None)
    assert T.classifier_is_current(run)
    # a classifier on pooled encoder features (models up to v4) is refitted on descriptors
    payload = torch.load(run / "classifier.ckpt", weights_only=True)
    T._save_checkpoint(run / "classifier.ckpt", {**payload, "info": json.dumps(
        {k: v for k, v in json.loads(payload["info"]).items() if k != "features"})})
    assert not T.classifier_is_current(run)
    T._save_checkpoint(run / "classifier.ckpt", payload)
    card = T.assemble_model(run, tmp_path / "model", {"version": "t"})
    assert card["training_steps"] == {"stage1": 1, "stage1_restart": 2, "stage2": 2, "stage2_restart": 2,
                                      "classifier": 0}
    state, _ = load_model(tmp_path / "model")
    for part in ("stage1", "stage2"):
        restart = torch.load(run / f"{part}_restart.ckpt", weights_only=True)["model"]
        assert torch.equal(state[f"{part}.{key}"], restart[key])


def test_a_bank_cycle_continues_stage2s_last_cycle_from_slabs_rendered_once(tmp_path):
    run, quiet = tmp_path / "run", (lambda m: None)
    with pytest.raises(FileNotFoundError, match="train stage2 before its bank cycle"):
        T.train_stage("stage2_bank", run, 1, device="cpu", batch=4, bank_batches=3, log=quiet)
    T.train_stage("stage1", run, 1, device="cpu", batch=4, log=quiet)
    T.train_stage("stage2", run, 2, device="cpu", batch=4, log=quiet)
    T.train_stage("classifier", run, 0, device="cpu", classifier_lesions=6, log=quiet)
    T.train_stage("stage2_bank", run, 2, device="cpu", batch=4, bank_batches=3, log=quiet, workers=1)

    bank_dir = run / "stage2_bank_slabs"
    assert sorted(f.name for f in bank_dir.iterdir()) == ["bank.json", "batch00000.npz", "batch00001.npz",
                                                          "batch00002.npz"]
    # a bank batch (rendered in a worker process) is the training batch of its index, within float16
    x, target, weights = T.training_batch("stage2", T.STAGE2_BANK_SEED_BASE, 2, 4, None, 1)
    stored = np.load(bank_dir / "batch00001.npz")
    stored_last_target = np.load(bank_dir / "batch00002.npz")["target"]
    np.testing.assert_allclose(stored["x"].astype(np.float32), x.numpy(), atol=1e-3)
    assert np.array_equal(stored["target"], target.numpy())
    np.testing.assert_allclose(stored["weights"].astype(np.float32), weights.numpy(), rtol=1e-3)
    # each step's draw is a function of the step, of the bank's slabs, some mirrored
    bank = T.SlabBank(bank_dir, 3)
    assert len(bank) == 12
    drawn = bank.batch(7, size=4)
    assert all(torch.equal(a, b) for a, b in zip(drawn, bank.batch(7, size=4)))
    assert not torch.equal(drawn[0], bank.batch(8, size=4)[0])
    slabs = [np.stack([s, s[..., ::-1, :], s[..., ::-1], s[..., ::-1, ::-1]]) for s in bank.x.astype(np.float32)]
    for slab in drawn[0].numpy():
        assert any((np.abs(views - slab).reshape(4, -1).max(1) == 0).any() for views in slabs)

    # the cycle starts from stage 2's weights and is the one the model takes; the classifier must follow it
    key = "encoder.stages.0.0.0.weight"
    first = torch.load(run / "stage2.ckpt", weights_only=True)["model"]
    cycled = torch.load(run / "stage2_bank.ckpt", weights_only=True)["model"]
    fresh = T.UNet2p5D(CascadeConfig().stage2).state_dict()
    assert 0 < (cycled[key] - first[key]).norm() < 0.1 * (fresh[key] - first[key]).norm()
    assert T.final_checkpoint(run, "stage2").name == "stage2_bank.ckpt"
    assert T.final_checkpoint(run, "stage2", before="_bank").name == "stage2.ckpt"
    assert not T.classifier_is_current(run)

    # resumed without rendering again; a finished cycle does not read its bank at all
    logs, stamps = [], {f: f.stat().st_mtime_ns for f in bank_dir.iterdir()}
    T.train_stage("stage2_bank", run, 3, device="cpu", batch=4, bank_batches=3, log=logs.append)
    assert any("resumed at step 2" in line for line in logs) and not any("bank:" in line for line in logs)
    assert {f: f.stat().st_mtime_ns for f in bank_dir.iterdir()} == stamps
    (bank_dir / "batch00002.npz").unlink()
    T.train_stage("stage2_bank", run, 3, device="cpu", batch=4, bank_batches=3, log=logs.append)
    assert not (bank_dir / "batch00002.npz").exists()
    # a render killed while writing leaves a partial file, which the next render removes before filling the gap
    (bank_dir / "batch00002.partial.npz").write_bytes(b"cut short")
    T.render_bank(bank_dir, 3, 0, CascadeConfig(), batch=4, log=quiet)
    assert sorted(f.name for f in bank_dir.iterdir())[-1] == "batch00002.npz"
    assert np.array_equal(np.load(bank_dir / "batch00002.npz")["target"], stored_last_target)
    # a folder holding another bank is refused, not mixed into this one
    with pytest.raises(ValueError, match="holds another bank"):
        T.render_bank(bank_dir, 3, 0, CascadeConfig(), seed_base=T.STAGE2_BANK_SEED_BASE + 1, batch=4, log=quiet)
    with pytest.raises(ValueError, match="holds another bank"):  # one of thick slices too
        T.render_bank(bank_dir, 3, 0, CascadeConfig(), batch=4, log=quiet, thick_fraction=0.5)
    # a share that is no share is named before anything is written, and before any stage is trained
    with pytest.raises(ValueError, match="a share of the blocks"):
        T.render_bank(tmp_path / "bad_bank", 1, 1, CascadeConfig(), batch=4, log=quiet, thick_fraction=1.5)
    with pytest.raises(ValueError, match="a share of the blocks"):
        T.build_model(tmp_path / "bad_run", tmp_path / "bad_model", steps2_bank=1, bank_thick_fraction=-0.5, log=quiet)
    assert not (tmp_path / "bad_bank").exists() and not (tmp_path / "bad_run").exists()
    (tmp_path / "stray").mkdir()
    np.savez(tmp_path / "stray" / "batch00000.npz", x=np.zeros(1))
    with pytest.raises(ValueError, match="without a bank.json"):
        T.render_bank(tmp_path / "stray", 1, 0, CascadeConfig(), batch=4, log=quiet)

    T.train_stage("classifier", run, 0, device="cpu", classifier_lesions=6, log=quiet)
    card = T.assemble_model(run, tmp_path / "model", {"version": "t"})
    assert card["training_steps"] == {"stage1": 1, "stage2": 2, "stage2_bank": 3, "classifier": 0}
    state, _ = load_model(tmp_path / "model")
    assert torch.equal(state[f"stage2.{key}"], torch.load(run / "stage2_bank.ckpt", weights_only=True)["model"][key])


def test_lesion_core_is_an_inner_part_of_the_lesion_on_all_three_centre_planes():
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:32, :32, :32]
    ball = (zz - 16) ** 2 + (yy - 16) ** 2 + (xx - 16) ** 2 <= 10 ** 2
    fractions = []
    for _ in range(20):
        core = T.lesion_core(ball, rng)
        assert not (core & ~ball).any() and core[16].any() and core[:, 16].any() and core[:, :, 16].any()
        fractions.append(core.sum() / ball.sum())
    assert min(fractions) < 0.3 and max(fractions) > 0.8  # depth fractions up to a half: down to ~1/8 of the volume
    # a one-voxel-thick lesion has no core: it is kept whole
    sheet = np.zeros((32, 32, 32), bool)
    sheet[16, 10:22, 10:22] = True
    sheet[10:22, 16, 16] = True
    assert np.array_equal(T.lesion_core(sheet, rng), sheet)


def test_temperature_fit_recovers_a_known_temperature_beyond_the_old_grid():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 3, generator=generator) * 12
    for true_temperature in (1.5, 6.0):  # 6: past the 3.0 where v1-v5's grid ended
        labels = torch.multinomial((logits / true_temperature).softmax(1), 1, generator=generator)[:, 0]
        assert T.fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.1)


def test_expected_calibration_error_on_known_cases():
    labels = torch.tensor([0, 1] * 500)
    certain_of_class_0 = torch.tensor([[1.0, 0.0, 0.0]]).repeat(1000, 1)  # says 1.00, right half the time
    assert T.expected_calibration_error(certain_of_class_0, labels) == pytest.approx(0.5)
    honest = torch.tensor([[0.5, 0.3, 0.2]]).repeat(1000, 1)  # says 0.50, right half the time
    assert T.expected_calibration_error(honest, labels) == pytest.approx(0.0, abs=1e-6)


def test_tuning_chooses_the_lesion_rule_with_the_filter(tmp_path, shipped_model_dir):
    """build_model's tuning tries every lesion rule (threshold, holes filled or not) with its best candidate
    filter and keeps the one of highest validation F1; on a tie, holes unfilled and the stricter threshold."""
    from liverlesionai.datasets import write_phantom_case
    from liverlesionai.model_io import save_model

    for seed in (500_003, 500_019):  # validation seeds with lesions of all sizes
        write_phantom_case(tmp_path / "val" / f"phantom_{seed}", seed, max_in_plane=160)
    untuned = tmp_path / "untuned"
    state, card = load_model(shipped_model_dir)
    architecture = {**card["architecture"], **FILTER_OFF}
    save_model(untuned, state, {"name": "untuned", "architecture": architecture})

    logs = []
    tuning = T.tune_candidate_filter(untuned, tmp_path / "val", device="cpu", log=logs.append, precision="fp32",
                                     lesion_thresholds=(None, 0.2))
    by_rule = tuning["validation_f1_by_lesion_rule"]
    assert list(by_rule) == ["argmax", "0.2", "argmax, holes filled", "0.2, holes filled"]
    best = max(by_rule.values())
    first_best = next(k for k, v in by_rule.items() if round(v, 4) == round(best, 4))
    assert tuning["validation_f1"] == best
    assert (tuning["lesion_threshold"], tuning["fill_liver_holes"]) == {
        "argmax": (None, False), "0.2": (0.2, False), "argmax, holes filled": (None, True),
        "0.2, holes filled": (0.2, True)}[first_best]
    assert sum("lesion rule" in line for line in logs) == 4
    alone = T.tune_candidate_filter(untuned, tmp_path / "val", device="cpu", log=logs.append, precision="fp32",
                                    lesion_thresholds=(0.2,), fill_liver_holes=(False,))
    assert alone["lesion_threshold"] == 0.2 and alone["validation_f1"] == by_rule["0.2"]


def test_lesion_thresholds_sharing_one_network_pass_see_what_separate_runs_see(shipped_model_dir):
    engine = LiverLesionEngine(shipped_model_dir, device="cpu", precision="fp32")
    shipped = (engine.config.lesion_threshold, engine.config.candidate_filter)
    assert shipped[1] != FILTER_OFF  # the shipped filter is on: the evidence must still hold every candidate
    ct, truth = generate_phantom_ct(500_003, max_in_plane=160)
    cases = [("phantom_500003", ct, {"liver_mask": truth.liver_mask, "lesion_instances": truth.lesion_instances,
                                     "lesion_types": truth.lesion_types})]
    shared = T.candidate_evidence_by_threshold(engine, cases, (None, 0.2))
    assert (engine.config.lesion_threshold, engine.config.candidate_filter) == shipped  # left as they were
    for threshold in (None, 0.2):
        engine.config.lesion_threshold = threshold
        alone = T.candidate_evidence(engine, cases)
        assert set(shared[threshold][0]) == set(alone[0]) == set(EVIDENCE_KEYS)
        for key in EVIDENCE_KEYS:
            np.testing.assert_array_equal(shared[threshold][0][key], alone[0][key])
        np.testing.assert_array_equal(shared[threshold][1], alone[1])
        assert shared[threshold][2] == alone[2]
    # the two rules do differ on this phantom, so sharing the pass could not hide a mix-up
    assert len(shared[None][1]) != len(shared[0.2][1]) or shared[None][2] != shared[0.2][2]
    # every candidate: as many as an engine without a filter reports, more than the shipped filter keeps
    engine.config.lesion_threshold = 0.2
    engine.config.set_candidate_filter(FILTER_OFF)
    assert len(shared[0.2][1]) == len(engine.segment(ct).lesions)
    engine.config.set_candidate_filter(shipped[1])
    assert len(shared[0.2][1]) > len(engine.segment(ct).lesions)
    # segment is exactly the network pass followed by the lesion rule
    result = engine.segment(ct)
    split = engine.lesions_from(engine.run_networks(ct))
    assert np.array_equal(result.lesion_instances, split.lesion_instances)
    assert np.array_equal(result.liver_mask, split.liver_mask)
    assert [r.probabilities for r in result.lesions] == [r.probabilities for r in split.lesions]
    untyped = engine.lesions_from(engine.run_networks(ct), classify=False)  # what the tuning sees
    assert np.array_equal(result.lesion_instances, untyped.lesion_instances) and result.lesions
    assert all(r.probabilities == pytest.approx(dict.fromkeys(("cyst", "hemangioma", "metastasis"), 1 / 3))
               for r in untyped.lesions)


def test_engine_lesion_samples_are_the_inputs_that_typed_the_engines_matched_lesions(shipped_model_dir):
    from liverlesionai.records import LESION_TYPES

    engine = LiverLesionEngine(shipped_model_dir, device="cpu", precision="fp32")
    engine.config.set_candidate_filter(FILTER_OFF)  # every candidate
    ct, truth = generate_phantom_ct(500_003, max_in_plane=160)
    reference = {"liver_mask": truth.liver_mask, "lesion_instances": truth.lesion_instances,
                 "lesion_types": truth.lesion_types}
    features, labels, lesions, metrics = T.engine_lesion_samples(engine, [("p", ct, reference)], log=lambda m: None)

    assert not engine.segment(ct).lesion_features  # kept only when asked
    result = engine.lesions_from(engine.run_networks(ct), keep_features=True)
    assert set(result.lesion_features) == {r.lesion_id for r in result.lesions}
    for record in result.lesions:  # the kept inputs are the ones that typed each lesion
        again = engine._type_probabilities({record.lesion_id: result.lesion_features[record.lesion_id]},
                                           engine.experts[result.expert])
        assert again[record.lesion_id] == pytest.approx(record.probabilities, abs=1e-4)
    matches = [m for m in metrics[0]["matches"] if m["gt_type"] in LESION_TYPES]
    assert 0 < len(matches) < len(result.lesions)  # unmatched candidates give no sample
    assert [LESION_TYPES[i] for i in labels] == [truth.lesion_types[m["gt_id"]] for m in matches]
    assert [s["pred_type"] for s in lesions] == [m["pred_type"] for m in matches]
    for vector, match in zip(features, matches):
        torch.testing.assert_close(vector, result.lesion_features[match["pred_id"]])
    assert features.shape == (len(matches), 3 * (26 + 3))

    # with the false lesions: the same matched samples first, then each unmatched reported lesion as NOT_A_LESION
    all_features, all_labels, all_lesions, _ = T.engine_lesion_samples(engine, [("p", ct, reference)], log=lambda m: None,
                                                                       include_false=True)
    false_ids = metrics[0]["false_positive_ids"]
    assert false_ids and len(all_labels) == len(matches) + len(false_ids)
    assert all_labels[:len(matches)].tolist() == labels.tolist()
    assert (all_labels[len(matches):] == T.NOT_A_LESION).all()
    for vector, lesion_id, sample in zip(all_features[len(matches):], false_ids, all_lesions[len(matches):]):
        torch.testing.assert_close(vector, result.lesion_features[lesion_id])
        assert sample["overlaps_reference"] == bool(
            truth.lesion_instances[result.lesion_instances == lesion_id].any())


def test_engine_lesion_heads_learn_their_samples_from_the_parent_or_from_scratch():
    from liverlesionai.networks import LesionClassifierHead

    cfg = CascadeConfig()
    torch.manual_seed(1)
    parent = LesionClassifierHead(cfg).eval()
    parent.temperature.fill_(2.5)
    labels = torch.arange(240) % 3
    features = torch.randn(240, 3 * LesionClassifierHead.view_size(cfg)) + 3.0 * torch.nn.functional.one_hot(
        labels, 3).float().repeat(1, 29)  # separable: every third feature marks the type
    accuracy = {}
    for recipe in ("refit_60", "refit_60_blend_0.5", "scratch"):
        head = T.engine_lesion_head(recipe, parent, cfg, features, labels)
        with torch.no_grad():
            accuracy[recipe] = float((head.eval().logits(features).argmax(1) == labels).float().mean())
        assert float(head.temperature) == 2.5  # fitted afterwards, on other lesions
    with torch.no_grad():
        accuracy["parent"] = float((parent.logits(features).argmax(1) == labels).float().mean())
    assert accuracy["refit_60"] > 0.95 and accuracy["scratch"] > 0.95 and accuracy["parent"] < 0.6
    scratch = T.engine_lesion_head("scratch", parent, cfg, features, labels)
    torch.testing.assert_close(scratch.feature_mean, features.mean(0))  # its own standardisation
    refit = T.engine_lesion_head("refit_60", parent, cfg, features, labels)
    blend = T.engine_lesion_head("refit_60_blend_0.5", parent, cfg, features, labels)
    for name, value in blend.state_dict().items():  # halfway between the parent and the re-fit, same seed
        if value.is_floating_point():
            torch.testing.assert_close(value, (parent.state_dict()[name] + refit.state_dict()[name]) / 2)
    with pytest.raises(ValueError, match="unknown head recipe"):
        T.engine_lesion_head("refit_60_blend_0.3", parent, cfg, features, labels)


def test_head_fitted_on_engine_lesions_of_fresh_phantoms(tmp_path, shipped_model_dir):
    from liverlesionai.datasets import write_phantom_case
    from liverlesionai.networks import LesionClassifierHead

    write_phantom_case(tmp_path / "cal" / "phantom_500003", 500_003, max_in_plane=160)
    engine = LiverLesionEngine(shipped_model_dir, device="cpu", precision="fp32")
    own_filter = engine.config.candidate_filter
    logs = []
    state, info = T.fit_head_on_engine_lesions(shipped_model_dir, "refit_20", 2, tmp_path / "cal", device="cpu",
                                               log=logs.append, max_in_plane=160)
    assert info["phantoms"] == 2 and info["lesions"] > 0 and info["calibration_lesions"] > 0
    assert any("phantom_1800001" in line for line in logs)  # the training range, never a validation seed
    head = LesionClassifierHead(engine.config)
    head.load_state_dict(state)
    assert float(head.temperature) == info["temperature"]
    assert not torch.equal(head.mlp[0].weight, engine.classifier.mlp[0].weight)  # re-fitted
    assert set(info["calibration_accuracy"]) == {"parent_head", "head"}
    again = LiverLesionEngine(shipped_model_dir, device="cpu", precision="fp32")  # the model folder is untouched
    assert again.config.candidate_filter == own_filter
    torch.testing.assert_close(again.classifier.mlp[0].weight, engine.classifier.mlp[0].weight)


def test_great_vessel_rule_choice_on_known_liver_dice():
    """The rule of highest mean liver Dice; on a tie off wins, then the larger radius, the higher HU, no rim."""
    rules = T.GREAT_VESSEL_RULES
    means = {T.great_vessel_rule_name(r): {"mean_liver_dice": 0.94} for r in (None, *rules)}
    assert T.choose_great_vessel_rule(means) is None
    best = {"great_vessel_radius_mm": 5.0, "great_vessel_min_hu_above_liver": 20.0, "great_vessel_rim": False}
    assert T.choose_great_vessel_rule(means, include_off=False) == best
    means["r3_hu15_rim"] = {"mean_liver_dice": 0.945}
    assert T.choose_great_vessel_rule(means) == rules[1] and T.great_vessel_rule_name(rules[1]) == "r3_hu15_rim"
    assert T.great_vessel_rule_name({"great_vessel_radius_mm": None}) == "off"


def test_great_vessel_rules_share_one_network_pass_and_never_touch_lesions(tmp_path, shipped_model_dir):
    """liver_dice_by_great_vessel_rule on a validation phantom whose IVC stage 2 takes into the liver: off and each
    rule measured on one network pass, each as a separate engine run measures it, with the same lesions; the
    engine's own rule is left as it was."""
    from liverlesionai.evaluation import dice

    ct, truth = generate_phantom_ct(500_024, max_in_plane=160)
    truth = {"liver_mask": truth.liver_mask, "lesion_instances": truth.lesion_instances,
             "lesion_types": truth.lesion_types}
    rules = (T.GREAT_VESSEL_RULES[0], T.GREAT_VESSEL_RULES[-1])
    engine = LiverLesionEngine(shipped_model_dir, device="cpu", precision="fp32")
    row = T.liver_dice_by_great_vessel_rule(engine, ct, truth, [None, *rules])
    assert list(row) == ["off", "r3_hu15", "r5_hu20_rim"] and engine.config.great_vessel_radius_mm is None
    assert all(v["lesions_unchanged"] for v in row.values())
    assert len({round(v["liver_dice"], 6) for v in row.values()}) > 1  # the rules do change this liver
    for k, v in rules[-1].items():
        setattr(engine.config, k, v)
    alone = engine.segment(ct)
    assert row["r5_hu20_rim"]["liver_dice"] == dice((alone.liver_mask > 0) | (alone.lesion_instances > 0),
                                                    (truth["liver_mask"] > 0) | (truth["lesion_instances"] > 0))
