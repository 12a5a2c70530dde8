"""Model registry: versions, explicit activation, rollback, compare, read-only shipped model, crash safety."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from liverlesionai.errors import InputError, ModelFileError
from liverlesionai.model_io import WEIGHTS_FILE, load_model, save_model
from liverlesionai.registry import SHIPPED_VERSION, ModelRegistry, lower_is_better, user_data_dir

torch.set_num_threads(1)


def state(v):
    return {"w": torch.full((8,), float(v))}


def tree_snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def shipped(tmp_path):
    d = tmp_path / "Resources" / "Models" / "liverlesion"
    save_model(d, state(0), {"name": "liverlesion", "version": "1.0.0",
                             "metrics": {"liver_dice": 0.95, "lesion_dice": 0.70, "hd95_mm": 6.0}})
    os.chmod(d / WEIGHTS_FILE, 0o444)
    return d


@pytest.fixture
def reg(tmp_path, shipped):
    return ModelRegistry(root=tmp_path / "home" / "models", shipped_dir=shipped)


def card_with_validation(parent_m, new_m):
    return {"hyperparameters": {"lr": 1e-4}, "dataset_manifest_sha256": "ab" * 32,
            "validation": {"cases": ["c1", "c2"], "parent": parent_m, "new": new_m}}


def test_default_root_from_env(monkeypatch, tmp_path, shipped):
    monkeypatch.setenv("LIVERLESIONAI_HOME", str(tmp_path / "h"))
    assert user_data_dir() == tmp_path / "h"
    assert ModelRegistry(shipped_dir=shipped).root == tmp_path / "h" / "models"
    monkeypatch.delenv("LIVERLESIONAI_HOME")
    assert "liverlesionai" in str(user_data_dir()).lower()


def test_fresh_registry_uses_shipped(reg, shipped):
    assert reg.active_version() == SHIPPED_VERSION
    assert reg.active_model_dir() == shipped
    vs = reg.list_versions()
    assert [v.version for v in vs] == [SHIPPED_VERSION] and vs[0].shipped and vs[0].active
    assert vs[0].card["version"] == "1.0.0"


def test_add_never_activates_then_activate_and_rollback(reg, shipped):
    shipped_before = tree_snapshot(shipped.parent)
    v1 = reg.add_version(state(1), card_with_validation({"lesion_dice": 0.70}, {"lesion_dice": 0.74}), SHIPPED_VERSION)
    v2 = reg.add_version(state(2), card_with_validation({"lesion_dice": 0.74}, {"lesion_dice": 0.76}), v1)
    assert (v1, v2) == ("v0001", "v0002")
    assert reg.active_version() == SHIPPED_VERSION  # adding is not choosing
    reg.activate(v1)
    reg.activate(v2)
    assert reg.active_version() == v2
    assert torch.equal(load_model(reg.active_model_dir())[0]["w"], state(2)["w"])
    card2 = load_model(reg.model_dir(v2))[1]
    assert card2["parent_version"] == v1 and card2["version"] == v2 and card2["name"] == "liverlesion"
    assert reg.rollback() == v1 and reg.active_version() == v1  # None = previously active
    assert reg.rollback(SHIPPED_VERSION) == SHIPPED_VERSION and reg.active_model_dir() == shipped
    reg.activate(v2)
    assert [(v.version, v.active) for v in reg.list_versions()] == [
        (SHIPPED_VERSION, False), (v1, False), (v2, True)]
    assert tree_snapshot(shipped.parent) == shipped_before  # shipped model never written
    # a new registry object (e.g. after restart) sees the same state
    assert ModelRegistry(root=reg.root, shipped_dir=shipped).active_version() == v2


def test_unknown_or_damaged_versions_refused(reg):
    with pytest.raises(InputError):
        reg.activate("../../etc")
    with pytest.raises(ModelFileError, match="not found"):
        reg.activate("v0042")
    with pytest.raises(ModelFileError):
        reg.add_version(state(1), {}, "v0042")
    v1 = reg.add_version(state(1), {}, SHIPPED_VERSION)
    w = reg.model_dir(v1) / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:-4] + b"XXXX")
    with pytest.raises(ModelFileError, match="checksum"):
        reg.activate(v1)
    assert reg.active_version() == SHIPPED_VERSION
    assert next(v for v in reg.list_versions() if v.version == v1).card is not None  # card still readable


def test_damaged_active_record_is_reported_and_repairable(reg):
    (reg.root / "active.json").write_text("{garbage")
    with pytest.raises(ModelFileError, match="damaged"):
        reg.active_version()
    assert all(not v.active for v in reg.list_versions())
    reg.activate(SHIPPED_VERSION)
    assert reg.active_version() == SHIPPED_VERSION


def test_compare_flags_worse(reg):
    better = reg.add_version(state(1), card_with_validation(
        {"lesion_dice": 0.70, "hd95_mm": 6.0}, {"lesion_dice": 0.75, "hd95_mm": 5.0}), SHIPPED_VERSION)
    worse = reg.add_version(state(2), card_with_validation(
        {"lesion_dice": 0.70, "hd95_mm": 6.0}, {"lesion_dice": 0.71, "hd95_mm": 9.0}), SHIPPED_VERSION)
    c = reg.compare(better)
    assert not c.worse and c.same_cases and c.parent_version == SHIPPED_VERSION
    assert c.deltas == pytest.approx({"lesion_dice": 0.05, "hd95_mm": -1.0})
    c = reg.compare(worse)
    assert c.worse and c.worse_metrics == ["hd95_mm"]
    # no validation block: falls back to parent's card metrics, flagged as not the same cases
    nov = reg.add_version(state(3), {"metrics": {"lesion_dice": 0.5}}, SHIPPED_VERSION)
    c = reg.compare(nov)
    assert c.worse and c.worse_metrics == ["lesion_dice"] and not c.same_cases
    empty = reg.add_version(state(4), {}, SHIPPED_VERSION)
    assert not reg.compare(empty).comparable and reg.compare(empty).worse
    assert lower_is_better("hd95_mm") and lower_is_better("fp_per_case") and not lower_is_better("lesion_dice")


def test_stale_temp_from_killed_save_is_ignored_and_cleaned(reg, shipped):
    stale = reg.versions_dir / ".v0001.tmp-999999999-deadbeef"  # pid that cannot exist
    stale.mkdir()
    (stale / WEIGHTS_FILE).write_bytes(b"partial")
    assert [v.version for v in reg.list_versions()] == [SHIPPED_VERSION]
    reg2 = ModelRegistry(root=reg.root, shipped_dir=shipped)
    assert not stale.exists()
    assert reg2.add_version(state(1), {}, SHIPPED_VERSION) == "v0001"


CHILD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from pathlib import Path
    from liverlesionai.registry import ModelRegistry
    reg = ModelRegistry(root=sys.argv[1], shipped_dir=sys.argv[2])
    Path(sys.argv[3]).write_text("ready")
    v = reg.add_version({"w": torch.arange(200000, dtype=torch.float32)}, {}, "shipped")
    reg.activate(v)
""")


def run_and_kill(args, env_extra, marker: Path, kill_when, timeout=60):
    """Start CHILD, wait until ``kill_when(marker)`` then SIGKILL it. Returns the exit code."""
    env = dict(os.environ, **env_extra)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env)
    try:
        deadline = time.time() + timeout
        while not kill_when() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        return proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()


def assert_consistent(reg_root, shipped, allowed_active):
    for p in Path(reg_root).iterdir():  # age any active.json temp left by the kill past the stale limit
        if p.name.startswith("."):
            os.utime(p, (time.time() - 3600, time.time() - 3600))
    reg = ModelRegistry(root=reg_root, shipped_dir=shipped)  # reopening cleans temp leftovers
    assert not [p for p in reg.versions_dir.iterdir() if p.name.startswith(".")]
    assert not [p for p in reg.root.iterdir() if p.name.startswith(".")]
    for v in reg.list_versions():
        assert v.problem == "", v.problem
        load_model(v.model_dir)  # every listed version is complete and verifies
    assert reg.active_version() in allowed_active
    return reg


@pytest.mark.parametrize("step", ["save_model:weights", "save_model:before_rename", "registry:activate",
                                  "write:active.json"])
def test_sigkill_during_save_or_activate(tmp_path, shipped, step):
    root, marker = tmp_path / "models", tmp_path / "marker"
    ModelRegistry(root=root, shipped_dir=shipped)
    rc = run_and_kill([str(root), str(shipped), str(tmp_path / "ready")],
                      {"LIVERLESIONAI_TEST_PAUSE_AT": step, "LIVERLESIONAI_TEST_PAUSE_MARKER": str(marker)},
                      marker, kill_when=marker.exists)
    assert rc == -signal.SIGKILL and marker.read_text().strip() == step
    reg = assert_consistent(root, shipped, allowed_active={SHIPPED_VERSION})
    saved = step in ("registry:activate", "write:active.json")
    assert [v.version for v in reg.list_versions()] == [SHIPPED_VERSION] + (["v0001"] if saved else [])
    v = reg.add_version(state(5), {}, SHIPPED_VERSION)  # rerun works
    reg.activate(v)
    assert reg.active_version() == v


def test_sigkill_at_random_times(tmp_path, shipped):
    root = tmp_path / "models"
    rng = random.Random(1234)
    ModelRegistry(root=root, shipped_dir=shipped)
    active_choices = {SHIPPED_VERSION}
    for i in range(4):
        ready = tmp_path / f"ready{i}"
        t_kill = []

        def kill_when():
            if not ready.exists():
                return False
            if not t_kill:
                t_kill.append(time.time() + rng.uniform(0.0, 0.25))
            return time.time() >= t_kill[0]

        run_and_kill([str(root), str(shipped), str(ready)], {"LIVERLESIONAI_TEST_STEP_DELAY": "0.05"},
                     ready, kill_when=kill_when)
        versions = {v.version for v in ModelRegistry(root=root, shipped_dir=shipped).list_versions()}
        active_choices |= versions  # the child activates only the version it just saved
        assert_consistent(root, shipped, allowed_active=active_choices)
