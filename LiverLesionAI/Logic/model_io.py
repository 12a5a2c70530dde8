"""Model files: a model is a folder holding ``weights.safetensors`` and ``model_card.json``.

Weights are safetensors only, so loading a model never runs pickled code. The card records the
sha256 of the weights file, which is verified before any tensor is used. Saving builds the whole
folder under a temporary sibling name, fsyncs it and renames it into place, so a process killed
mid-save leaves either no model or a complete one, never a half-written one.

Single files are written with ``volume_io.write_file_atomically``; the folder-level pieces the
registry and the dataset export share (``rename_folder_no_replace``, ``write_json_atomic``,
``remove_stale_temps``, the test-only ``crash_point``) live here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from . import __version__
from .errors import InputError, ModelFileError, OutputError
from .volume_io import write_file_atomically

WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "model_card.json"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
TEMP_MARKER = ".tmp-"  # temp siblings are named ".<name>.tmp-<pid>-<random>"

# Card fields a model card may carry (the engine fills most; save_model fills the last three).
CARD_FIELDS = (
    "name", "version", "created", "architecture", "generator_version", "seeds", "training_steps",
    "hyperparameters", "metrics", "parent_version", "dataset_manifest_sha256", "validation",
    "weights_sha256", "format_version", "liverlesionai_version",
)


class OutputExistsError(OutputError, FileExistsError):
    """The target already exists: models and exports are never overwritten."""


# --- atomic file primitives (shared by registry and export) -------------------------------------


def crash_point(step: str) -> None:
    """Test-only hook so crash-safety tests can SIGKILL a real process between two write steps.

    LIVERLESIONAI_TEST_PAUSE_AT=<step> (or "*"): on reaching that step, append the step name to the
    file named by LIVERLESIONAI_TEST_PAUSE_MARKER and sleep (LIVERLESIONAI_TEST_PAUSE_S, default 60).
    LIVERLESIONAI_TEST_STEP_DELAY=<seconds>: sleep that long at every step (random-time kills).
    Unset in normal use: then this is a no-op.
    """
    delay = os.environ.get("LIVERLESIONAI_TEST_STEP_DELAY")
    if delay:
        time.sleep(float(delay))
    at = os.environ.get("LIVERLESIONAI_TEST_PAUSE_AT")
    if at and at in (step, "*"):
        marker = os.environ.get("LIVERLESIONAI_TEST_PAUSE_MARKER")
        if marker:
            # appended through a renamed copy: a test polling for the file never reads it empty
            lines = Path(marker).read_text(encoding="utf-8") if os.path.exists(marker) else ""
            tmp = f"{marker}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(lines + step + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, marker)
        time.sleep(float(os.environ.get("LIVERLESIONAI_TEST_PAUSE_S", "60")))


def fsync_dir(path: Path) -> None:
    """Make a rename/creation inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_sibling(path: Path) -> Path:
    """A unique hidden name next to ``path``, recognisable as ours (pid lets cleanup spot dead writers)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_stale_temp(path: Path, max_age_s: float = 24 * 3600) -> bool:
    """True for a temp sibling whose writer is gone: its pid (when the name has one) is dead, or it is old.

    Names from ``temp_sibling`` carry the writer's pid; volume_io's temp files do not, so for those
    only age tells (pass a small ``max_age_s`` where only small, fast writes happen).
    """
    name = Path(path).name
    if not (name.startswith(".") and TEMP_MARKER in name):
        return False
    m = re.match(r"(\d+)-[0-9a-f]+$", name.rsplit(TEMP_MARKER, 1)[1])
    if m and os.name == "posix" and int(m.group(1)) != os.getpid():
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    try:
        return time.time() - Path(path).lstat().st_mtime > max_age_s
    except FileNotFoundError:
        return False


def remove_stale_temps(folder: Path, max_age_s: float = 24 * 3600) -> list[Path]:
    """Delete temp files/folders left in ``folder`` by killed writers; returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if is_stale_temp(p, max_age_s):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _write_and_sync(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:  # "x": a temp name is never reused, so never overwrite
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj, overwrite: bool = False) -> Path:
    """Write JSON via volume_io.write_file_atomically (temp sibling + rename), fsynced.

    overwrite=True only for small state files we own (manifest, active.json) where replacing is the
    point; user files are never overwritten.
    """
    data = json_bytes(obj)  # serialise first: an unserialisable object writes nothing

    def write(temp: str) -> None:
        _write_and_sync(Path(temp), data)
        crash_point(f"write:{Path(path).name}")

    out = write_file_atomically(path, write, overwrite=overwrite)
    fsync_dir(Path(path).parent)
    return out


def rename_folder_no_replace(src: Path, dst: Path) -> None:
    """Move a finished temp folder into place; refuse if ``dst`` exists (never merge or replace)."""
    if dst.exists():
        raise OutputExistsError(f"{dst} already exists; it was not overwritten.")
    try:
        os.rename(src, dst)  # POSIX fails on a non-empty dst, Windows on any dst
    except OSError as e:
        if dst.exists():
            raise OutputExistsError(f"{dst} already exists; it was not overwritten.") from None
        raise OutputError(f"Cannot move {src.name} into place as {dst}: {e}") from e
    fsync_dir(dst.parent)


def json_bytes(obj) -> bytes:
    """Stable, human-readable JSON; numpy scalars/arrays and paths are converted."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=_json_default, allow_nan=True) + "\n").encode("utf-8")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# --- models --------------------------------------------------------------------------------------


def save_model(model_dir, state_dict: dict, card: dict) -> dict:
    """Write a new model folder atomically; refuse if ``model_dir`` already exists.

    Returns the card as written (with weights_sha256, format_version, liverlesionai_version and,
    when missing, created filled in).
    """
    model_dir = Path(model_dir)
    if model_dir.exists():
        raise OutputExistsError(f"Refusing to overwrite existing model folder: {model_dir}")
    if not isinstance(card, dict):
        raise InputError(f"Model card must be a dict, got {type(card).__name__}")
    tensors = _checked_tensors(state_dict)
    weights = _st_save(tensors, metadata={"format": "pt"})
    card = dict(card)
    card["weights_sha256"] = sha256_bytes(weights)
    card["format_version"] = FORMAT_VERSION
    card["liverlesionai_version"] = __version__
    card.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    card_data = json_bytes(card)  # serialise before touching the disk: a bad card writes nothing

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(model_dir)
    tmp.mkdir()
    try:
        _write_and_sync(tmp / WEIGHTS_FILE, weights)
        crash_point("save_model:weights")
        _write_and_sync(tmp / CARD_FILE, card_data)
        fsync_dir(tmp)
        crash_point("save_model:before_rename")
        rename_folder_no_replace(tmp, model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    crash_point("save_model:done")
    return card


def _checked_tensors(state_dict) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, dict) or not state_dict:
        raise InputError("Model weights must be a non-empty dict of name -> torch.Tensor")
    out = {}
    for name, t in state_dict.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise InputError(f"Model weights entry {name!r} is not a str -> torch.Tensor pair")
        # clone: safetensors refuses tensors that share storage (e.g. tied weights)
        out[name] = t.detach().to("cpu").contiguous().clone()
    return out


def read_model_card(model_dir) -> dict:
    """Read and check the card of a model folder; ModelFileError names the file on any problem."""
    model_dir = Path(model_dir)
    card_path = model_dir / CARD_FILE
    if not model_dir.is_dir():
        raise ModelFileError(f"Model folder not found: {model_dir}")
    if not card_path.is_file():
        raise ModelFileError(f"Model card missing: {card_path} (this folder is not a LiverLesionAI model)")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"Model card is damaged (not valid JSON): {card_path}: {e}") from None
    if not isinstance(card, dict):
        raise ModelFileError(f"Model card is damaged (not a JSON object): {card_path}")
    fv = card.get("format_version")
    if fv not in SUPPORTED_FORMAT_VERSIONS:
        made_by = card.get("liverlesionai_version", "an unknown version")
        raise ModelFileError(
            f"Model {model_dir.name!r} has model format version {fv!r}, made by LiverLesionAI {made_by}; "
            f"this LiverLesionAI {__version__} reads format {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}. "
            f"Update LiverLesionAI or choose another model. ({card_path})")
    sha = card.get("weights_sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise ModelFileError(f"Model card has no valid weights checksum (weights_sha256): {card_path}")
    return card


def _verified_weight_bytes(model_dir: Path, card: dict) -> bytes:
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelFileError(f"Model weights missing: {weights_path}")
    data = weights_path.read_bytes()
    if sha256_bytes(data) != card["weights_sha256"]:
        raise ModelFileError(
            f"Model weights do not match their checksum (file damaged or replaced); refusing to use: "
            f"{weights_path}")
    return data


def verify_model(model_dir) -> dict:
    """Check card and weights checksum without building tensors; returns the card."""
    model_dir = Path(model_dir)
    card = read_model_card(model_dir)
    _verified_weight_bytes(model_dir, card)
    return card


def load_model(model_dir, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Return (state_dict, card). Checksum is verified on the exact bytes that are then parsed."""
    model_dir = Path(model_dir)
    card = read_model_card(model_dir)
    data = _verified_weight_bytes(model_dir, card)
    try:
        tensors = _st_load(data)
    except (SafetensorError, ValueError) as e:
        raise ModelFileError(f"Model weights are not a valid safetensors file: {model_dir / WEIGHTS_FILE}: {e}") from None
    if map_location not in (None, "cpu", torch.device("cpu")):
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return tensors, card
