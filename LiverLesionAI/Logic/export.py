"""Export reviewed cases as de-identified training data, and read such a dataset back.

Dataset layout (``dataset_dir`` is chosen by the user):

    dataset.json                         manifest: cases, revisions, sha256 of every file
    cases/<case id>/r<n>/image.nii.gz    CT (HU), exact geometry
                         label.nii.gz    0 background, 1 liver, 2 cyst, 3 hemangioma, 4 metastasis
                         lesions.json    per lesion: type, probabilities before review, status, measurements
                         provenance.json model version, what the reviewer changed per lesion

De-identification: the case id is random; nothing from the patient (name, ID, dates, DICOM tags,
the volume's name) is written anywhere, and no date at all is written. The same study is recognised
by a *study key*: a hash of the voxels and geometry salted with a random per-dataset salt, so
exporting it again adds revision r2, r3... under the same case id.

Crash safety: the manifest is the commit record. A revision is built in a hidden temp folder and
renamed into place, then the manifest is rewritten atomically. Anything on disk that the manifest
does not list is an uncommitted leftover of a killed export: readers ignore it and the next export
(holding the dataset lock) removes it. Nothing committed is ever overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError, OutputError
from .model_io import (
    crash_point, fsync_dir, rename_folder_no_replace, sha256_file, temp_sibling, write_json_atomic,
)
from .records import LESION_TYPES, REVIEW_STATUSES, CTVolume, SegmentationResult
from .volume_io import read_ct, write_volume

MANIFEST_FILE = "dataset.json"
CASES_DIR = "cases"
LOCK_FILE = ".liverlesionai-export.lock"
DATASET_FORMAT_VERSION = 1
LABELS = {"background": 0, "liver": 1, "cyst": 2, "hemangioma": 3, "metastasis": 4}
CASE_FILES = ("image.nii.gz", "label.nii.gz", "lesions.json", "provenance.json")
_CASE_ID_RE = re.compile(r"^c[0-9a-f]{12}$")
_REVISION_RE = re.compile(r"^r(\d+)$")
# Geometry is rounded before hashing so a float32 round trip through a file header keeps the key.
_GEOMETRY_DECIMALS = 3


@dataclass
class CaseInfo:
    case_id: str
    revision: int
    folder: Path
    study_key: str
    files: dict[str, str]  # file name -> sha256
    new_case: bool


@dataclass
class TrainingCase:
    case_id: str
    revision: int
    folder: Path
    lesions: list[dict]
    provenance: dict
    files: dict[str, str] = field(default_factory=dict)

    @property
    def image_path(self) -> Path:
        return self.folder / "image.nii.gz"

    @property
    def label_path(self) -> Path:
        return self.folder / "label.nii.gz"

    def load_image(self) -> CTVolume:
        ct = read_ct(self.image_path)
        ct.name = self.case_id
        return ct

    def load_label(self) -> np.ndarray:
        return read_ct(self.label_path).voxels.astype(np.uint8)


# --- building the case (pure, nothing on disk) ---------------------------------------------------


def _check_inputs(ct: CTVolume, reviewed: SegmentationResult, proposed: SegmentationResult | None) -> None:
    shape = ct.voxels.shape
    if ct.voxels.ndim != 3:
        raise InputError(f"The CT must be a 3D volume; got {ct.voxels.ndim} dimensions.")
    for what, seg in (("reviewed", reviewed), ("proposed", proposed)):
        if seg is None:
            continue
        for arr_name in ("liver_mask", "lesion_instances"):
            arr = np.asarray(getattr(seg, arr_name))
            if arr.shape != shape:
                raise InputError(f"The {what} segmentation ({arr_name}, size {arr.shape}) does not match "
                                 f"the CT (size {shape}); export the segmentation made on this CT.")
        if not np.allclose(np.asarray(seg.ijk_to_ras, float), ct.ijk_to_ras, atol=1e-3):
            raise InputError(f"The {what} segmentation is not in the CT's geometry (position/orientation "
                             f"differ); export the segmentation made on this CT.")
        ids = {r.lesion_id for r in seg.lesions}
        if len(ids) != len(seg.lesions):
            raise InputError(f"The {what} segmentation lists the same lesion number twice.")
        present = set(np.unique(seg.lesion_instances).tolist()) - {0}
        missing = sorted(present - ids)
        if missing:
            raise InputError(f"Lesion(s) {missing} in the {what} segmentation have no lesion record (type); "
                             f"give every lesion a type before exporting.")
        for r in seg.lesions:
            if r.lesion_type not in LESION_TYPES:
                raise InputError(f"Lesion {r.lesion_id} has type {r.lesion_type!r}; a training case needs one of "
                                 f"{', '.join(LESION_TYPES)}.")
            if r.review_status not in REVIEW_STATUSES:
                raise InputError(f"Lesion {r.lesion_id} has review status {r.review_status!r}; expected one of "
                                 f"{', '.join(REVIEW_STATUSES)}.")


def build_label_map(reviewed: SegmentationResult) -> np.ndarray:
    """uint8 label map; rejected lesions are not lesions for training: their voxels become liver."""
    instances = np.asarray(reviewed.lesion_instances)
    label = np.zeros(instances.shape, dtype=np.uint8)
    label[np.asarray(reviewed.liver_mask) != 0] = LABELS["liver"]
    lut = np.zeros(int(instances.max(initial=0)) + 1, dtype=np.uint8)
    for r in reviewed.lesions:
        if r.lesion_id < len(lut):
            lut[r.lesion_id] = LABELS["liver"] if r.review_status == "rejected" else LABELS[r.lesion_type]
    lesion = instances != 0
    label[lesion] = lut[instances[lesion]]
    return label


class _Overlaps:
    """Voxel counts shared by reviewed lesion r and proposed lesion p (0 = no lesion), sparse."""

    def __init__(self, reviewed: np.ndarray, proposed: np.ndarray):
        either = (reviewed != 0) | (proposed != 0)
        pairs = np.stack([reviewed[either], proposed[either]], axis=1).astype(np.int64)
        uniq, counts = np.unique(pairs, axis=0, return_counts=True) if len(pairs) else (np.zeros((0, 2)), [])
        self.pair = {(int(r), int(p)): int(n) for (r, p), n in zip(uniq, counts)}
        self.reviewed_size, self.proposed_size = {}, {}
        for (r, p), n in self.pair.items():
            self.reviewed_size[r] = self.reviewed_size.get(r, 0) + n
            self.proposed_size[p] = self.proposed_size.get(p, 0) + n

    def best_proposed(self, r: int) -> int | None:
        shared = [(n, -p) for (rr, p), n in self.pair.items() if rr == r and p != 0]
        return -max(shared)[1] if shared else None


def build_case_records(reviewed: SegmentationResult, proposed: SegmentationResult | None,
                       model_version: str) -> tuple[list[dict], dict]:
    """(lesions.json content, provenance.json content). Reviewed lesions are matched to the proposed
    lesion they overlap most, since the reviewer may renumber, split or redraw lesions."""
    rev_inst = np.asarray(reviewed.lesion_instances)
    proposed_by_id = {r.lesion_id: r for r in proposed.lesions} if proposed is not None else {}
    ov = _Overlaps(rev_inst, np.asarray(proposed.lesion_instances)) if proposed is not None else None
    lesions, changes, matched = [], [], set()
    for r in sorted(reviewed.lesions, key=lambda x: x.lesion_id):
        best = ov.best_proposed(r.lesion_id) if ov is not None else None
        match = proposed_by_id.get(best) if best is not None else None
        if match is not None:
            matched.add(match.lesion_id)
        before = match if match is not None else r
        d = r.to_dict()
        d.pop("probabilities")
        d["label"] = None if r.review_status == "rejected" else LABELS[r.lesion_type]
        d["type_before_review"] = before.lesion_type
        d["probabilities_before_review"] = {k: float(v) for k, v in before.probabilities.items()}
        lesions.append(d)
        change = {"lesion_id": r.lesion_id, "review_status": r.review_status,
                  "proposed_lesion_id": match.lesion_id if match else None,
                  "type_before_review": before.lesion_type, "type_after_review": r.lesion_type,
                  "type_changed": before.lesion_type != r.lesion_type,
                  "added_by_reviewer": proposed is not None and match is None}
        if ov is not None:
            kept = ov.pair.get((r.lesion_id, match.lesion_id), 0) if match else 0
            change["voxels_added"] = ov.reviewed_size.get(r.lesion_id, 0) - kept
            change["voxels_removed"] = ov.proposed_size.get(match.lesion_id, 0) - kept if match else 0
        changes.append(change)
    provenance = {
        "dataset_format_version": DATASET_FORMAT_VERSION,
        "exported_by": f"LiverLesionAI {__version__}",
        "model_version": str(model_version),
        "proposal_available": proposed is not None,
        "label_values": LABELS,
        "lesions": changes,
    }
    if proposed is not None:
        provenance["proposed_lesions_deleted"] = [
            {"proposed_lesion_id": p.lesion_id, "type": p.lesion_type, "voxels": ov.proposed_size.get(p.lesion_id, 0)}
            for p in proposed.lesions if p.lesion_id not in matched]
        organ_after = (np.asarray(reviewed.liver_mask) != 0) | (rev_inst != 0)
        organ_before = (np.asarray(proposed.liver_mask) != 0) | (np.asarray(proposed.lesion_instances) != 0)
        provenance["liver_voxels_added"] = int(np.count_nonzero(organ_after & ~organ_before))
        provenance["liver_voxels_removed"] = int(np.count_nonzero(organ_before & ~organ_after))
    return lesions, provenance


def study_key(ct: CTVolume, salt: str) -> str:
    """Salted hash of voxels + geometry: recognises a re-export without storing who the patient is."""
    h = hashlib.sha256()
    h.update(bytes.fromhex(salt))
    h.update(repr(tuple(ct.voxels.shape)).encode())
    h.update(np.round(ct.ijk_to_ras, _GEOMETRY_DECIMALS).astype("<f8").tobytes())
    for k in range(ct.voxels.shape[0]):  # slice by slice: no full-volume float copy
        h.update(np.ascontiguousarray(ct.voxels[k], dtype="<f4").tobytes())
    return h.hexdigest()


# --- dataset on disk ---------------------------------------------------------------------------


@contextmanager
def _dataset_lock(dataset_dir: Path):
    """Exclusive lock on the dataset; the OS releases it if the process is killed."""
    fd = os.open(str(dataset_dir / LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.name == "posix":
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            import msvcrt
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
        yield
    finally:
        os.close(fd)  # closing releases the lock on both platforms


def read_manifest(dataset_dir) -> dict | None:
    """The manifest, or None when the folder is not a dataset yet. Damaged -> InputError, never rewritten."""
    path = Path(dataset_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"The dataset manifest is damaged: {path} ({e}). Restore it from a backup; "
                         f"LiverLesionAI will not overwrite it.") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != DATASET_FORMAT_VERSION \
            or not isinstance(manifest.get("cases"), list):
        raise InputError(f"{path} is not a LiverLesionAI dataset manifest of format {DATASET_FORMAT_VERSION}.")
    return manifest


def manifest_sha256(dataset_dir) -> str:
    """Checksum of dataset.json, recorded in a model card as the training data it saw."""
    return sha256_file(Path(dataset_dir) / MANIFEST_FILE)


def _remove_uncommitted(dataset_dir: Path, manifest: dict) -> None:
    """Under the lock: drop leftovers of killed exports (anything of ours the manifest does not list)."""
    for p in dataset_dir.iterdir():
        if p.name.startswith(f".{Path(MANIFEST_FILE).stem}.tmp-"):
            p.unlink(missing_ok=True)
    cases_dir = dataset_dir / CASES_DIR
    if not cases_dir.is_dir():
        return
    committed = {c["case_id"]: {r["revision"] for r in c["revisions"]} for c in manifest["cases"]}
    for case in cases_dir.iterdir():
        if case.name.startswith(".") and ".tmp-" in case.name:
            shutil.rmtree(case, ignore_errors=True)
            continue
        if not (case.is_dir() and _CASE_ID_RE.match(case.name)):
            continue  # not ours: leave it alone
        revisions = committed.get(case.name, set())
        for rev in case.iterdir():
            m = _REVISION_RE.match(rev.name)
            uncommitted_rev = m is not None and int(m.group(1)) not in revisions
            if (rev.name.startswith(".") and ".tmp-" in rev.name) or uncommitted_rev:
                shutil.rmtree(rev, ignore_errors=True)
        if case.name not in committed and not any(case.iterdir()):
            case.rmdir()


def _only_our_leftovers(dataset_dir: Path) -> bool:
    """A folder without manifest may still hold what a killed first export left (cases/<id>/...)."""
    for p in dataset_dir.iterdir():
        if p.name.startswith("."):
            continue
        if p.name != CASES_DIR or not p.is_dir():
            return False
        if any(not (_CASE_ID_RE.match(c.name) or (c.name.startswith(".") and ".tmp-" in c.name))
               for c in p.iterdir()):
            return False
    return True


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def export_case(dataset_dir, ct: CTVolume, reviewed: SegmentationResult,
                proposed: SegmentationResult | None, model_version: str) -> CaseInfo:
    """Add one reviewed case (or a new revision of an already exported study) to a dataset folder."""
    _check_inputs(ct, reviewed, proposed)
    label = build_label_map(reviewed)
    lesions, provenance = build_case_records(reviewed, proposed, model_version)

    dataset_dir = Path(dataset_dir)
    if dataset_dir.exists() and not dataset_dir.is_dir():
        raise OutputError(f"{dataset_dir} is a file; choose a folder for the training dataset.")
    dataset_dir.mkdir(parents=True, exist_ok=True)
    with _dataset_lock(dataset_dir):
        manifest = read_manifest(dataset_dir)
        if manifest is None:
            if not _only_our_leftovers(dataset_dir):
                raise OutputError(f"{dataset_dir} is not empty and has no {MANIFEST_FILE}; choose an empty "
                                  f"folder or an existing LiverLesionAI dataset.")
            manifest = {"format_version": DATASET_FORMAT_VERSION, "study_key_salt": secrets.token_hex(16),
                        "label_values": LABELS, "cases": []}
        _remove_uncommitted(dataset_dir, manifest)
        key = study_key(ct, manifest["study_key_salt"])
        entry = next((c for c in manifest["cases"] if c["study_key"] == key), None)
        new_case = entry is None
        if new_case:
            taken = {c["case_id"] for c in manifest["cases"]}
            case_id = next(i for i in (f"c{secrets.token_hex(6)}" for _ in range(1000))
                           if i not in taken and not (dataset_dir / CASES_DIR / i).exists())
            entry = {"case_id": case_id, "study_key": key, "revisions": []}
        case_dir = dataset_dir / CASES_DIR / entry["case_id"]
        revision = 1 + max([r["revision"] for r in entry["revisions"]] + [
            int(m.group(1)) for p in (case_dir.iterdir() if case_dir.is_dir() else ())
            if (m := _REVISION_RE.match(p.name))], default=0)
        final = case_dir / f"r{revision}"

        case_dir.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(final)
        tmp.mkdir()
        try:
            write_volume(tmp / "image.nii.gz", ct.voxels, ct.ijk_to_ras)
            crash_point("export:image")
            write_volume(tmp / "label.nii.gz", label, ct.ijk_to_ras)
            write_json_atomic(tmp / "lesions.json", {"case_id": entry["case_id"], "revision": revision,
                                                     "lesions": lesions})
            write_json_atomic(tmp / "provenance.json", dict(provenance, case_id=entry["case_id"], revision=revision))
            files = {}
            for name in CASE_FILES:
                _fsync_file(tmp / name)
                files[name] = sha256_file(tmp / name)
            fsync_dir(tmp)
            crash_point("export:before_rename")
            rename_folder_no_replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        crash_point("export:before_manifest")
        entry["revisions"].append({
            "revision": revision, "path": final.relative_to(dataset_dir).as_posix(), "files": files,
            "model_version": str(model_version),
            "lesion_labels": {t: sum(1 for d in lesions if d["label"] == LABELS[t]) for t in LESION_TYPES},
        })
        if new_case:
            manifest["cases"].append(entry)
        write_json_atomic(dataset_dir / MANIFEST_FILE, manifest, overwrite=True)
        crash_point("export:done")
    return CaseInfo(entry["case_id"], revision, final, key, files, new_case)


def export_case_from_files(dataset_dir, ct_path, seg_path, proposed_seg_path=None,
                           model_version: str | None = None) -> CaseInfo:
    """CLI path: a CT file/DICOM folder + the reviewed .seg.nrrd (+ optionally the model's original)."""
    from .segfile import read_seg_nrrd  # local: keeps pynrrd off the import path of the engine

    ct = read_ct(ct_path)
    reviewed = read_seg_nrrd(seg_path)
    proposed = read_seg_nrrd(proposed_seg_path) if proposed_seg_path else None
    if model_version is None:
        model_version = (proposed.model_version if proposed is not None else "") or reviewed.model_version or "unknown"
    return export_case(dataset_dir, ct, reviewed, proposed, model_version)


def load_dataset(dataset_dir, all_revisions: bool = False, strict: bool = False) -> list[TrainingCase]:
    """Cases listed in the manifest whose files are present and match their checksums.

    By default only each case's latest revision (the reviewer's last word). A case whose files are
    missing or damaged is skipped with a warning (one bad case must not stop training); with
    ``strict=True`` it raises InputError instead. A damaged latest revision is skipped, not replaced
    by an older one, so stale labels are never used silently. Unlisted folders are ignored.
    """
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    if manifest is None:
        raise InputError(f"{dataset_dir} is not a LiverLesionAI training dataset (no {MANIFEST_FILE}).")
    out = []
    for c in manifest["cases"]:
        revisions = sorted(c["revisions"], key=lambda r: r["revision"])
        for rev in (revisions if all_revisions else revisions[-1:]):
            folder = dataset_dir / rev["path"]
            problem = _revision_problem(folder, rev["files"])
            if problem:
                msg = f"Training case {c['case_id']} r{rev['revision']} skipped: {problem}"
                if strict:
                    raise InputError(msg)
                warnings.warn(msg, stacklevel=2)
                continue
            lesions = json.loads((folder / "lesions.json").read_text(encoding="utf-8"))["lesions"]
            provenance = json.loads((folder / "provenance.json").read_text(encoding="utf-8"))
            out.append(TrainingCase(c["case_id"], rev["revision"], folder, lesions, provenance, dict(rev["files"])))
    return out


def _revision_problem(folder: Path, files: dict[str, str]) -> str:
    for name, sha in files.items():
        p = folder / name
        if not p.is_file():
            return f"{p} is missing"
        if sha256_file(p) != sha:
            return f"{p} does not match its checksum (damaged or edited)"
    return ""
