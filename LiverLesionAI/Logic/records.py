"""The data that flows one way through the product: CT volume -> engine -> lesion records -> scene / files.

Array convention everywhere: numpy arrays are indexed [k, j, i] (slice, row, column), exactly as
``slicer.util.arrayFromVolume`` returns them; ``ijk_to_ras`` is the 4x4 matrix that maps (i, j, k, 1)
to patient RAS millimetres, as ``vtkMRMLVolumeNode.GetIJKToRASMatrix`` holds it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

LESION_TYPES = ("cyst", "hemangioma", "metastasis")

# Okabe-Ito colour-blind-safe palette (RGB 0..1).
LIVER_COLOR = (0.0, 158 / 255, 115 / 255)
LESION_TYPE_COLORS = {
    "cyst": (86 / 255, 180 / 255, 233 / 255),
    "hemangioma": (240 / 255, 228 / 255, 66 / 255),
    "metastasis": (213 / 255, 94 / 255, 0.0),
}
UNCLASSIFIED_COLOR = (204 / 255, 121 / 255, 167 / 255)

REVIEW_STATUSES = ("unreviewed", "confirmed", "rejected")


@dataclass
class CTVolume:
    """A CT in Hounsfield units with its exact geometry."""

    voxels: np.ndarray  # [k, j, i], HU (any numeric dtype; int16 or float32 typical)
    ijk_to_ras: np.ndarray  # 4x4 float64
    name: str = "CT"

    def __post_init__(self):
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)
        if self.ijk_to_ras.shape != (4, 4):
            raise ValueError(f"ijk_to_ras must be a 4x4 matrix, got shape {self.ijk_to_ras.shape}")

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.voxels.shape
        return (i, j, k)


@dataclass
class LesionRecord:
    """One lesion: a 3D connected component of the lesion mask, with its type and measurements."""

    lesion_id: int  # value of this lesion in the lesion instance map
    lesion_type: str  # one of LESION_TYPES
    probabilities: dict[str, float]  # calibrated, keys = LESION_TYPES, sum to 1
    voxel_count: int
    volume_ml: float
    long_axis_mm: float  # longest in-plane (axial) diameter, on the axial slice where it is longest
    short_axis_mm: float  # longest diameter perpendicular to it on the same slice
    centroid_ras: tuple[float, float, float]
    mean_hu: float
    std_hu: float
    slice_range: tuple[int, int]  # first and last k index (inclusive) in the input volume
    review_status: str = "unreviewed"

    @property
    def probability(self) -> float:
        return float(self.probabilities.get(self.lesion_type, 0.0))

    @property
    def display_name(self) -> str:
        """Segment name shown in Slicer, e.g. 'Lesion 3 – metastasis (0.87)'."""
        return f"Lesion {self.lesion_id} \u2013 {self.lesion_type} ({self.probability:.2f})"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["centroid_ras"] = [float(v) for v in self.centroid_ras]
        d["slice_range"] = [int(v) for v in self.slice_range]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LesionRecord":
        d = dict(d)
        d["centroid_ras"] = tuple(d["centroid_ras"])
        d["slice_range"] = tuple(d["slice_range"])
        return cls(**d)


@dataclass
class SegmentationResult:
    """What the engine returns, in the input volume's geometry."""

    liver_mask: np.ndarray  # [k, j, i] uint8, 1 = liver parenchyma (lesions excluded)
    lesion_instances: np.ndarray  # [k, j, i] uint16, 0 = none, n = LesionRecord.lesion_id
    lesions: list[LesionRecord]
    ijk_to_ras: np.ndarray
    liver_volume_ml: float = 0.0  # whole organ: parenchyma + lesions
    messages: list[str] = field(default_factory=list)  # e.g. "No liver found."
    model_version: str = ""
    # lesion id -> {"confidence": mean lesion probability, "surface_fraction": share near the liver surface}
    lesion_evidence: dict[int, dict[str, float]] = field(default_factory=dict)
    # lesion id -> the classifier head's input (engine.lesions_from(..., keep_features=True) only)
    lesion_features: dict[int, object] = field(default_factory=dict)
    expert: str = "parent"  # the stage-2 expert that ran: "parent", or "site" in a fine-tuned version (domain_gate)

    def as_prediction(self) -> dict:
        """The masks and types in the form evaluation.evaluate_case compares with ground truth."""
        return {"liver_mask": self.liver_mask, "lesion_instances": self.lesion_instances,
                "lesion_types": {r.lesion_id: r.lesion_type for r in self.lesions}}
