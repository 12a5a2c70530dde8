"""Model files: safetensors round trip, checksum/format refusal, no pickle, atomic save under SIGKILL."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from liverlesionai import __version__
from liverlesionai.errors import InputError, ModelFileError, OutputError
from liverlesionai.model_io import (
    CARD_FILE, WEIGHTS_FILE, load_model, read_model_card, remove_stale_temps, save_model, verify_model,
)

torch.set_num_threads(1)


def tiny_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 1, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g),
            "bn.num_batches_tracked": torch.tensor(7)}


def test_round_trip_fills_card(tmp_path):
    state = tiny_state()
    card = save_model(tmp_path / "m", state, {"name": "tiny", "version": "v1", "metrics": {"dice": 0.9}})
    loaded, card2 = load_model(tmp_path / "m")
    assert set(loaded) == set(state)
    for k in state:
        assert torch.equal(loaded[k], state[k]) and loaded[k].dtype == state[k].dtype
    assert card2 == card == read_model_card(tmp_path / "m")
    assert card["format_version"] == 1 and card["liverlesionai_version"] == __version__
    assert len(card["weights_sha256"]) == 64 and card["created"].endswith("+00:00")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp leftovers
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted([WEIGHTS_FILE, CARD_FILE])


def test_tied_weights_and_noncontiguous_are_saved(tmp_path):
    w = torch.randn(3, 5)
    save_model(tmp_path / "m", {"a": w, "b": w, "c": w.t()}, {})
    loaded, _ = load_model(tmp_path / "m")
    assert torch.equal(loaded["b"], w) and torch.equal(loaded["c"], w.t())


def test_refuses_to_overwrite(tmp_path):
    save_model(tmp_path / "m", tiny_state(0), {"version": "a"})
    before = (tmp_path / "m" / WEIGHTS_FILE).read_bytes()
    with pytest.raises(OutputError, match="overwrite"):
        save_model(tmp_path / "m", tiny_state(1), {"version": "b"})
    assert (tmp_path / "m" / WEIGHTS_FILE).read_bytes() == before


def test_bad_inputs_write_nothing(tmp_path):
    with pytest.raises(InputError):
        save_model(tmp_path / "m", {"x": [1, 2]}, {})
    with pytest.raises(InputError):
        save_model(tmp_path / "m", {}, {})
    with pytest.raises(TypeError):
        save_model(tmp_path / "m", tiny_state(), {"obj": object()})
    assert list(tmp_path.iterdir()) == []


def test_corrupted_weights_refused(tmp_path):
    save_model(tmp_path / "m", tiny_state(), {})
    p = tmp_path / "m" / WEIGHTS_FILE
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum") as e:
        load_model(tmp_path / "m")
    assert str(p) in str(e.value)
    with pytest.raises(ModelFileError, match="checksum"):
        verify_model(tmp_path / "m")


def test_incompatible_or_garbled_card_refused(tmp_path):
    save_model(tmp_path / "m", tiny_state(), {})
    card_path = tmp_path / "m" / CARD_FILE
    card = json.loads(card_path.read_text())
    card["format_version"] = 99
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelFileError, match="format version 99") as e:
        load_model(tmp_path / "m")
    assert str(card_path) in str(e.value)
    card_path.write_text('{"format_version": 1, "weights_sha')
    with pytest.raises(ModelFileError, match="damaged") as e:
        load_model(tmp_path / "m")
    assert str(card_path) in str(e.value)
    card_path.unlink()
    with pytest.raises(ModelFileError, match="card missing"):
        load_model(tmp_path / "m")
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nowhere")


def test_pickle_is_never_executed(tmp_path):
    """A torch.save/pickle file dropped in as weights (with a matching checksum) must not run."""
    save_model(tmp_path / "m", tiny_state(), {})
    flag = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    payload = pickle.dumps({"w": Evil()})
    (tmp_path / "m" / WEIGHTS_FILE).write_bytes(payload)
    card_path = tmp_path / "m" / CARD_FILE
    card = json.loads(card_path.read_text())
    import hashlib
    card["weights_sha256"] = hashlib.sha256(payload).hexdigest()
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelFileError, match="safetensors"):
        load_model(tmp_path / "m")
    assert not flag.exists()


CHILD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from liverlesionai.model_io import save_model
    save_model(sys.argv[1], {"w": torch.arange(100000, dtype=torch.float32)}, {"name": "x"})
""")


@pytest.mark.parametrize("step", ["save_model:weights", "save_model:before_rename"])
def test_sigkill_mid_save_leaves_no_model_and_rerun_works(tmp_path, step):
    target = tmp_path / "models" / "m"
    marker = tmp_path / "marker"
    env = dict(os.environ, LIVERLESIONAI_TEST_PAUSE_AT=step, LIVERLESIONAI_TEST_PAUSE_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(target)], env=env)
    try:
        deadline = time.time() + 60
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert marker.read_text().strip() == step
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not target.exists()
    leftovers = list(target.parent.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".m.tmp-")
    assert remove_stale_temps(target.parent) == leftovers  # writer pid is dead -> stale
    save_model(target, {"w": torch.ones(3)}, {})
    assert torch.equal(load_model(target)[0]["w"], torch.ones(3))
