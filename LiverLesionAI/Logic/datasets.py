"""Evaluation datasets on disk: phantom test sets this project generates, and 3D-IRCADb-style cases.

A case is a folder with ``image.nii.gz`` and ``label.nii.gz``, optionally ``lesion_instances.nii.gz``
and a ``labels.json`` that names the label values. Without ``labels.json`` the 3D-IRCADb
convention of ../shared/data/ircadb-01 is assumed (1 liver, 2 tumour, 3 cyst).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, OutputError
from .lesions import label_lesions
from .records import LESION_TYPES, CTVolume
from .volume_io import read_ct, write_volume

PHANTOM_LABELS = {"1": "liver", **{str(2 + i): t for i, t in enumerate(LESION_TYPES)}}
IRCADB_LABELS = {"1": "liver", "2": "tumour", "3": "cyst"}


@dataclass
class EvaluationCase:
    case_id: str
    folder: Path

    def load_image(self) -> CTVolume:
        return read_ct(self.folder / "image.nii.gz")

    def load_truth(self) -> dict:
        """{"liver_mask", "lesion_instances", "lesion_types"} in the image's voxel grid."""
        labels_file = self.folder / "labels.json"
        names = json.loads(labels_file.read_text()) if labels_file.exists() else IRCADB_LABELS
        label = read_ct(self.folder / "label.nii.gz").voxels.astype(np.int32)
        lesion_values = [int(v) for v, name in names.items() if name != "liver"]
        lesion_mask = np.isin(label, lesion_values)
        instances_file = self.folder / "lesion_instances.nii.gz"
        if instances_file.exists():
            instances = read_ct(instances_file).voxels.astype(np.uint16)
        else:
            instances, _ = label_lesions(lesion_mask)
        types = {}
        for lesion_id in np.unique(instances[instances > 0]):
            values = label[instances == lesion_id]
            value = int(np.bincount(values[values > 1]).argmax()) if (values > 1).any() else 0
            types[int(lesion_id)] = names.get(str(value), "unknown")
        return {"liver_mask": (label > 0).astype(np.uint8), "lesion_instances": instances, "lesion_types": types}


def find_cases(dataset_dir) -> list[EvaluationCase]:
    root = Path(dataset_dir)
    if not root.is_dir():
        raise InputError(f"Dataset folder {root} does not exist.")
    folders = [root] if (root / "image.nii.gz").exists() else sorted(
        p for p in root.iterdir() if (p / "image.nii.gz").exists() and (p / "label.nii.gz").exists())
    if not folders:
        raise InputError(f"{root} holds no evaluation case (folders with image.nii.gz and label.nii.gz).")
    return [EvaluationCase(p.name, p) for p in folders]


def write_phantom_case(folder, seed, max_in_plane=None, domain=None):
    """A held-out phantom case on disk (image, label with types, instances, labels.json)."""
    from .phantom import generate_phantom_ct

    folder = Path(folder)
    if folder.exists():
        raise OutputError(f"{folder} already exists; LiverLesionAI never overwrites a case.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    ct, truth = generate_phantom_ct(seed, max_in_plane=max_in_plane, domain=domain)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:  # a case folder appears complete or not at all
        write_volume(staging / "image.nii.gz", ct.voxels, ct.ijk_to_ras)
        write_volume(staging / "label.nii.gz", truth.label_map, ct.ijk_to_ras)
        write_volume(staging / "lesion_instances.nii.gz", truth.lesion_instances, ct.ijk_to_ras)
        (staging / "labels.json").write_text(json.dumps(PHANTOM_LABELS, indent=1))
        try:
            os.rename(staging, folder)
        except OSError as error:
            if folder.exists():  # another process wrote it meanwhile: its case stays as it is
                raise OutputError(f"{folder} was written meanwhile by another process; LiverLesionAI never "
                                  f"overwrites a case.") from error
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
