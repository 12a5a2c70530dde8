"""Versioned model registry in the user's data folder (survives extension updates).

Layout under ``root`` (default ``$LIVERLESIONAI_HOME/models``, else a per-user data folder):

    versions/<version>/weights.safetensors + model_card.json   one folder per fine-tuned version
    active.json                                                which version is in use + history

The shipped model (inside the extension) is version ``"shipped"``; it is only ever read.
Adding a version never activates it: only ``activate``/``rollback`` (an explicit user choice)
rewrite ``active.json``, atomically. A killed save leaves only a hidden temp folder, which is
ignored and removed the next time a registry is opened.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .errors import InputError, ModelFileError
from .model_io import (
    OutputExistsError, crash_point, read_model_card, remove_stale_temps, save_model,
    verify_model, write_json_atomic,
)

SHIPPED_VERSION = "shipped"
ACTIVE_FILE = "active.json"
VERSIONS_DIR = "versions"
SHIPPED_MODELS_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"
# active.json temp files hold no writer pid; its writes take milliseconds, so a minute-old one is dead.
STALE_STATE_TEMP_S = 60
_VERSION_RE = re.compile(r"^v(\d{4,})$")

# Metric names (substrings, lower case) where a smaller value is better; all others: larger is better.
LOWER_IS_BETTER = ("hausdorff", "hd95", "hd", "assd", "asd", "error", "loss", "ece", "brier",
                   "false_pos", "false_neg", "fp_per", "fp", "fn", "time", "seconds")


def user_data_dir() -> Path:
    """LiverLesionAI's per-user folder: $LIVERLESIONAI_HOME, else the platform's user data folder."""
    env = os.environ.get("LIVERLESIONAI_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.environ.get("APPDATA")
        if base:
            return Path(base) / "LiverLesionAI"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "LiverLesionAI"
    return Path.home() / ".liverlesionai"


def find_shipped_model(models_dir: Path = SHIPPED_MODELS_DIR) -> Path | None:
    """The model folder shipped with the extension (first by name that has a card), or None."""
    if not models_dir.is_dir():
        return None
    candidates = sorted(p for p in models_dir.iterdir() if (p / "model_card.json").is_file())
    return candidates[0] if candidates else None


@dataclass
class VersionInfo:
    version: str
    model_dir: Path
    card: dict | None  # None when the card cannot be read (then ``problem`` says why)
    shipped: bool = False
    active: bool = False
    problem: str = ""


@dataclass
class Comparison:
    """Validation metrics of a version and of its parent, measured on the same validation cases."""

    version: str
    parent_version: str | None
    parent_metrics: dict[str, float]
    new_metrics: dict[str, float]
    deltas: dict[str, float]  # new - parent, for metrics both have
    worse_metrics: list[str] = field(default_factory=list)
    comparable: bool = True  # False when the card has no parent/new metrics to compare
    same_cases: bool = True

    @property
    def worse(self) -> bool:
        """True when any shared metric got worse (or nothing can be compared: warn, do not assume better)."""
        return bool(self.worse_metrics) or not self.comparable


def lower_is_better(metric: str) -> bool:
    tokens = re.split(r"[^a-z0-9]+", metric.lower())
    name = metric.lower()
    return any(t in tokens for t in LOWER_IS_BETTER) or any(
        len(s) > 3 and s in name for s in LOWER_IS_BETTER)


class ModelRegistry:
    def __init__(self, root=None, shipped_dir=None):
        self.root = Path(root) if root is not None else user_data_dir() / "models"
        self.shipped_dir = Path(shipped_dir) if shipped_dir is not None else find_shipped_model()
        if self.shipped_dir is not None and _is_inside(self.root.resolve(), self.shipped_dir.resolve()):
            raise InputError(f"The model registry folder {self.root} must not be inside the shipped model {self.shipped_dir}")
        self.versions_dir = self.root / VERSIONS_DIR
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        # leftovers of a killed save / activation: never valid versions, so safe to drop
        remove_stale_temps(self.versions_dir)
        remove_stale_temps(self.root, max_age_s=STALE_STATE_TEMP_S)

    # --- reading ---------------------------------------------------------------------------------

    def _user_version_dirs(self) -> list[Path]:
        dirs = [p for p in self.versions_dir.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
        return sorted(dirs, key=lambda p: int(_VERSION_RE.match(p.name).group(1)))

    def model_dir(self, version: str) -> Path:
        if version == SHIPPED_VERSION:
            if self.shipped_dir is None:
                raise ModelFileError(f"No shipped model found in {SHIPPED_MODELS_DIR}; reinstall LiverLesionAI.")
            return self.shipped_dir
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise InputError(f"Unknown model version {version!r} (expected 'shipped' or e.g. 'v0001')")
        d = self.versions_dir / version
        if not d.is_dir():
            raise ModelFileError(f"Model version {version!r} not found in {self.versions_dir}")
        return d

    def list_versions(self) -> list[VersionInfo]:
        """Shipped model first, then user versions oldest first; unreadable ones carry ``problem``."""
        try:
            active = self.active_version()
        except ModelFileError:
            active = None
        out = []
        entries = ([(SHIPPED_VERSION, self.shipped_dir)] if self.shipped_dir is not None else []) + [
            (p.name, p) for p in self._user_version_dirs()]
        for version, d in entries:
            info = VersionInfo(version, d, None, shipped=version == SHIPPED_VERSION, active=version == active)
            try:
                info.card = read_model_card(d)
            except ModelFileError as e:
                info.problem = str(e)
            out.append(info)
        return out

    def _read_active_state(self) -> dict:
        path = self.root / ACTIVE_FILE
        if not path.exists():
            return {"active": SHIPPED_VERSION, "history": []}
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or not isinstance(state.get("active"), str):
                raise ValueError("no 'active' entry")
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelFileError(
                f"The active-model record is damaged: {path} ({e}). Choose a model version again to repair it.") from None
        state.setdefault("history", [])
        return state

    def active_version(self) -> str:
        return self._read_active_state()["active"]

    def active_model_dir(self) -> Path:
        """Folder of the model in use; ModelFileError (clear message) if it is missing."""
        version = self.active_version()
        try:
            return self.model_dir(version)
        except ModelFileError as e:
            raise ModelFileError(f"The active model version {version!r} cannot be used: {e}. "
                                 f"Roll back to another version.") from None

    # --- writing ---------------------------------------------------------------------------------

    def add_version(self, state_dict: dict, card: dict, parent_version: str) -> str:
        """Save a new version (never activates it); returns its id, e.g. 'v0003'."""
        parent_dir = self.model_dir(parent_version)  # refuses unknown parents
        parent_card = read_model_card(parent_dir)
        card = dict(card)
        card["parent_version"] = parent_version
        card.setdefault("name", parent_card.get("name", "LiverLesionAI"))
        existing = [int(_VERSION_RE.match(p.name).group(1)) for p in self._user_version_dirs()]
        n = max(existing, default=0) + 1
        for _ in range(100):  # another process may take the same number: try the next one
            version = f"v{n:04d}"
            card["version"] = version
            try:
                save_model(self.versions_dir / version, state_dict, card)
                return version
            except OutputExistsError:
                n += 1
        raise ModelFileError(f"Could not find a free version number in {self.versions_dir}")

    def activate(self, version: str) -> None:
        """Make ``version`` the model in use (explicit user choice). The model is verified first."""
        d = self.model_dir(version)
        verify_model(d)  # refuse a damaged model before it becomes active
        try:
            state = self._read_active_state()
        except ModelFileError:
            state = {"active": None, "history": []}  # activating is how a damaged record is repaired
        previous = state.get("active")
        history = list(state.get("history", []))
        history.append({"version": version, "previous": previous,
                        "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        crash_point("registry:activate")
        write_json_atomic(self.root / ACTIVE_FILE, {"active": version, "history": history[-200:]}, overwrite=True)

    def rollback(self, version: str | None = None) -> str:
        """Go back to ``version`` (any earlier one, or 'shipped'); None = the previously active one."""
        if version is None:
            history = self._read_active_state()["history"]
            version = history[-1]["previous"] if history and history[-1].get("previous") else SHIPPED_VERSION
        self.activate(version)
        return version

    def compare(self, version: str, tolerance: float = 0.0) -> Comparison:
        """Parent vs new validation metrics from the version's card; ``worse`` drives the UI warning."""
        card = read_model_card(self.model_dir(version))
        validation = card.get("validation") or {}
        parent_m = _numeric(validation.get("parent"))
        new_m = _numeric(validation.get("new"))
        same_cases = True
        if not parent_m and card.get("parent_version"):
            # fall back to the parent's own metrics; then the cases may differ, so say so
            try:
                parent_m = _numeric(read_model_card(self.model_dir(card["parent_version"])).get("metrics"))
                same_cases = False
            except (ModelFileError, InputError):
                pass
        if not new_m:
            new_m = _numeric(card.get("metrics"))
            same_cases = False
        shared = sorted(set(parent_m) & set(new_m))
        deltas = {m: new_m[m] - parent_m[m] for m in shared}
        worse = [m for m in shared
                 if (deltas[m] > tolerance if lower_is_better(m) else deltas[m] < -tolerance)]
        return Comparison(version, card.get("parent_version"), parent_m, new_m, deltas, worse,
                          comparable=bool(shared), same_cases=same_cases)


def _numeric(metrics) -> dict[str, float]:
    if not isinstance(metrics, dict):
        return {}
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[str(k)] = float(v)
    return out


def _is_inside(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False
