"""Standard codes (SNOMED CT, DICOM style) for what LiverLesionAI segments, in 3D Slicer's terminology format.

Codes follow the DICOM segmentation context groups that Slicer's "DICOM master list" uses: category
CID 7150, lesion types CID 7159 (Cyst 367643001, "Neoplasm, Secondary" 14799000), anatomic region
Liver 10200004. Hemangioma is not in CID 7159 nor in Slicer's master list, so our context file
(Resources/LiverLesionAI.term.json) adds it with the SNOMED CT morphology code 253053003
"Benign hemangioma" (the morphologic-abnormality concept, like the other lesion types; the
disorder concept 400210000 "Hemangioma" would not match the category).

A serialized entry is what Slicer stores in a segment's "TerminologyEntry" tag:
``context~category~type~typeModifier~anatomicContext~anatomicRegion~anatomicRegionModifier``,
each code written ``scheme^value^meaning`` (empty code: ``^^``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .records import LESION_TYPE_COLORS, LIVER_COLOR, UNCLASSIFIED_COLOR

CONTEXT_NAME = "Segmentation category and type - LiverLesionAI"
ANATOMIC_CONTEXT_NAME = "Anatomic codes - DICOM master list"  # shipped with Slicer
TERMINOLOGY_FILE = Path(__file__).resolve().parents[1] / "Resources" / "LiverLesionAI.term.json"

KINDS = ("liver", "cyst", "hemangioma", "metastasis", "lesion")  # "lesion": not (yet) typed


@dataclass(frozen=True)
class Code:
    scheme: str
    value: str
    meaning: str

    def serialized(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"


EMPTY_CODE = Code("", "", "")
ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
MORPHOLOGICALLY_ALTERED_STRUCTURE = Code("SCT", "49755003", "Morphologically Altered Structure")
LIVER = Code("SCT", "10200004", "Liver")

# kind -> (category, type, 3D Slicer label, recommended colour)
_ENTRIES = {
    "liver": (ANATOMICAL_STRUCTURE, LIVER, "liver", LIVER_COLOR),
    "cyst": (MORPHOLOGICALLY_ALTERED_STRUCTURE, Code("SCT", "367643001", "Cyst"), "liver cyst",
             LESION_TYPE_COLORS["cyst"]),
    "hemangioma": (MORPHOLOGICALLY_ALTERED_STRUCTURE, Code("SCT", "253053003", "Benign hemangioma"),
                   "liver hemangioma", LESION_TYPE_COLORS["hemangioma"]),
    "metastasis": (MORPHOLOGICALLY_ALTERED_STRUCTURE, Code("SCT", "14799000", "Neoplasm, Secondary"),
                   "liver metastasis", LESION_TYPE_COLORS["metastasis"]),
    "lesion": (MORPHOLOGICALLY_ALTERED_STRUCTURE, Code("SCT", "52988006", "Lesion"), "liver lesion",
               UNCLASSIFIED_COLOR),
}


def _check_kind(kind: str) -> None:
    if kind not in _ENTRIES:
        raise ValueError(f"unknown segment kind {kind!r}; expected one of {', '.join(KINDS)}")


def type_code(kind: str) -> Code:
    _check_kind(kind)
    return _ENTRIES[kind][1]


def category_code(kind: str) -> Code:
    _check_kind(kind)
    return _ENTRIES[kind][0]


def recommended_color(kind: str) -> tuple[float, float, float]:
    _check_kind(kind)
    return tuple(_ENTRIES[kind][3])


def terminology_entry_string(kind: str) -> str:
    """The serialized terminology entry Slicer stores for a segment of this kind."""
    category, seg_type = category_code(kind), type_code(kind)
    region = EMPTY_CODE if kind == "liver" else LIVER  # lesions lie in the liver
    return "~".join((CONTEXT_NAME, category.serialized(), seg_type.serialized(), EMPTY_CODE.serialized(),
                     ANATOMIC_CONTEXT_NAME, region.serialized(), EMPTY_CODE.serialized()))


def kind_from_terminology_string(entry: str) -> str | None:
    """Our kind for a serialized entry (matched on the type's scheme and code value), else None."""
    parts = entry.split("~")
    if len(parts) < 3:
        return None
    fields = parts[2].split("^")
    if len(fields) < 2:
        return None
    for kind, (_, seg_type, _, _) in _ENTRIES.items():
        if (fields[0], fields[1]) == (seg_type.scheme, seg_type.value):
            return kind
    return None


def build_terminology_context() -> dict:
    """The content of LiverLesionAI.term.json (same schema as Slicer's shipped context files)."""
    categories: dict[Code, list] = {}
    for kind in KINDS:
        category, seg_type, slicer_label, color = _ENTRIES[kind]
        categories.setdefault(category, []).append({
            "CodingSchemeDesignator": seg_type.scheme,
            "CodeValue": seg_type.value,
            "CodeMeaning": seg_type.meaning,
            "3dSlicerLabel": slicer_label,
            "recommendedDisplayRGBValue": [int(round(c * 255)) for c in color],
            **({"SNOMEDCTConceptID": seg_type.value} if seg_type.scheme == "SCT" else {}),
        })
    return {
        "SegmentationCategoryTypeContextName": CONTEXT_NAME,
        "@schema": "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/segment-context-schema.json#",
        "SegmentationCodes": {
            "Category": [
                {
                    "CodingSchemeDesignator": category.scheme,
                    "CodeValue": category.value,
                    "CodeMeaning": category.meaning,
                    "showAnatomy": category != ANATOMICAL_STRUCTURE,
                    "Type": types,
                }
                for category, types in categories.items()
            ]
        },
    }


def terminology_context_json() -> str:
    return json.dumps(build_terminology_context(), indent=2, ensure_ascii=False) + "\n"
