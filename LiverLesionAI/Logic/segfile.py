"""3D Slicer segmentation files (.seg.nrrd) written and read with numpy only (no Slicer, no pynrrd).

Writing: one labelmap layer (segments do not overlap), label 1 = liver parenchyma, lesions 2, 3, ...
in the order of ``SegmentationResult.lesions``; segment IDs "liver" and "lesion_<id>"; names, colours,
terminology and the ``LiverLesionAI.*`` tags below in the header, exactly in the form that
``vtkMRMLSegmentationStorageNode`` writes and reads (``SegmentN_Tags:=key:value|key:value|``).
The file covers the whole input volume (``Segmentation_ReferenceImageExtentOffset:=0 0 0``), in LPS
like Slicer's own files.

Reading: single-layer and multi-layer (4D, written by Slicer after edits with overlapping segments)
files. Lesion records are rebuilt from our tags; what depends on voxels (voxel count, volume,
centroid, slice range) is recomputed from the labelmap, so edits made in Slicer are honoured.
Segments without our tags (made or renamed by a user):
  - liver: ID "liver", tag type "liver", terminology type Liver, or name "Liver";
  - lesion: ID "lesion_<n>", name "Lesion <n> ...", or a lesion terminology type (cyst,
    hemangioma, metastasis, lesion). lesion_type comes from the tag, else from a name like
    "Lesion 3 – metastasis (0.87)" (then probabilities = {type: 0.87}, the only one known), else from
    the terminology type; if none gives a type in LESION_TYPES, lesion_type = "" and probabilities = {}.
    Values that need the CT (mean/std HU, long/short axis) are NaN when no tag gives them;
  - any other segment (e.g. a vessel a user drew) is ignored; every such decision is listed in
    ``SegmentationResult.messages``.
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import re
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import InputError
from .geometry import nonzero_box
from .records import LESION_TYPES, REVIEW_STATUSES, LesionRecord, SegmentationResult
from .terminology import kind_from_terminology_string, recommended_color, terminology_entry_string
from .volume_io import write_file_atomically

LIVER_SEGMENT_ID = "liver"
LIVER_LABEL = 1
TAG_PREFIX = "LiverLesionAI."
TERMINOLOGY_TAG = "TerminologyEntry"  # the tag in which Slicer keeps a segment's terminology

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_GZIP_LEVEL = 6
_MAX_LESION_ID = np.iinfo(np.uint16).max  # lesion_instances is uint16


# =========================================================================== writing


def lesion_segment_id(lesion_id: int) -> str:
    return f"lesion_{int(lesion_id)}"


def write_seg_nrrd(path: str | os.PathLike, result: SegmentationResult, overwrite: bool = False) -> Path:
    """Write ``result`` as a Slicer .seg.nrrd (gzip), atomically; an existing file is kept unless ``overwrite``."""
    labels, segments = _labelmap_and_segments(result)
    header = _header(labels, result.ijk_to_ras, segments)
    payload = gzip.compress(np.ascontiguousarray(labels).astype(labels.dtype.newbyteorder("<")).tobytes(),
                            compresslevel=_GZIP_LEVEL, mtime=0)

    def write(temp: str) -> None:
        with open(temp, "wb") as f:
            f.write(header.encode("utf-8"))
            f.write(payload)

    return write_file_atomically(path, write, overwrite)


def _labelmap_and_segments(result: SegmentationResult) -> tuple[np.ndarray, list[dict]]:
    liver = np.asarray(result.liver_mask)
    instances = np.asarray(result.lesion_instances)
    if liver.ndim != 3 or liver.shape != instances.shape:
        raise ValueError(f"liver_mask {liver.shape} and lesion_instances {instances.shape} must be 3D arrays of one shape")
    ids = [int(rec.lesion_id) for rec in result.lesions]
    if len(set(ids)) != len(ids) or any(i <= 0 for i in ids):
        raise ValueError(f"lesion ids must be distinct positive integers, got {ids}")
    box = nonzero_box(liver, instances)
    dtype = np.uint8 if len(ids) + 1 <= 255 else np.uint16
    labels = np.zeros(liver.shape, dtype)
    if box is not None:
        liver_box, instances_box = liver[box], instances[box]
        present = np.flatnonzero(np.bincount(instances_box.ravel()))
        orphans = sorted(set(int(v) for v in present[present > 0]) - set(ids))
        if orphans:
            raise ValueError(f"lesion_instances holds lesion ids without a LesionRecord: {orphans}")
        labels_box = (liver_box > 0).astype(dtype) * dtype(LIVER_LABEL)
        if ids:
            lookup = np.zeros(max(ids + [int(present.max())]) + 1, dtype=dtype)
            for index, lesion_id in enumerate(ids):
                lookup[lesion_id] = LIVER_LABEL + 1 + index
            np.copyto(labels_box, lookup[instances_box], where=instances_box > 0)  # lesions are not parenchyma
        labels[box] = labels_box

    # Slicer takes the extent of the first segment of a layer for the whole layer (and writes the
    # layer's extent for each segment): give every segment the extent of all labelled voxels.
    boxes = [box] * (len(ids) + 1)
    model_tag = {"ModelVersion": result.model_version} if result.model_version else {}
    segments = [{
        "ID": LIVER_SEGMENT_ID, "Name": "Liver", "Color": recommended_color("liver"), "LabelValue": LIVER_LABEL,
        "Extent": boxes[0], "Tags": {TERMINOLOGY_TAG: terminology_entry_string("liver"),
                                     **_our_tags({"Type": "liver", **model_tag})},
    }]
    for index, rec in enumerate(result.lesions):
        kind = rec.lesion_type if rec.lesion_type in LESION_TYPES else "lesion"
        tags = {
            "Type": rec.lesion_type,
            "Probabilities": ",".join(f"{k}={_number(v)}" for k, v in rec.probabilities.items()),
            "VolumeMl": _number(rec.volume_ml),
            "LongAxisMm": _number(rec.long_axis_mm),
            "ShortAxisMm": _number(rec.short_axis_mm),
            "MeanHU": _number(rec.mean_hu),
            "StdHU": _number(rec.std_hu),
            "ReviewStatus": rec.review_status,
            "LesionId": str(int(rec.lesion_id)),
            **model_tag,
        }
        segments.append({
            "ID": lesion_segment_id(rec.lesion_id), "Name": rec.display_name, "Color": recommended_color(kind),
            "LabelValue": LIVER_LABEL + 1 + index, "Extent": boxes[index + 1],
            "Tags": {TERMINOLOGY_TAG: terminology_entry_string(kind), **_our_tags(tags)},
        })
    return labels, segments


def _our_tags(values: dict) -> dict:
    return {TAG_PREFIX + key: value for key, value in values.items()}


def _number(value: float) -> str:
    return f"{float(value):.6g}"


def _clean(text: str) -> str:
    """Header values are one line; '|' separates tags in Slicer's tag list."""
    return re.sub(r"[\r\n|]+", " ", str(text))


def _vector(values) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def _header(labels: np.ndarray, ijk_to_ras: np.ndarray, segments: list[dict]) -> str:
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise ValueError("ijk_to_ras must be a finite, invertible 4x4 matrix")
    lps_axes = _LPS_TO_RAS @ matrix[:3, :3]
    nk, nj, ni = labels.shape
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {'unsigned char' if labels.dtype == np.uint8 else 'unsigned short'}",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {ni} {nj} {nk}",
        "space directions: " + " ".join(_vector(lps_axes[:, axis]) for axis in range(3)),
        "kinds: domain domain domain",
        "endian: little",
        "encoding: gzip",
        "space origin: " + _vector(_LPS_TO_RAS @ matrix[:3, 3]),
    ]
    for n, seg in enumerate(segments):
        box = seg["Extent"]
        extent = (f"{box[2].start} {box[2].stop - 1} {box[1].start} {box[1].stop - 1} {box[0].start} {box[0].stop - 1}"
                  if box is not None else "0 -1 0 -1 0 -1")
        tags = "".join(f"{_clean(k)}:{_clean(v)}|" for k, v in sorted(seg["Tags"].items()))
        lines += [
            f"Segment{n}_Color:=" + " ".join(repr(float(c)) for c in seg["Color"]),
            f"Segment{n}_ColorAutoGenerated:=0",
            f"Segment{n}_Extent:={extent}",
            f"Segment{n}_ID:={_clean(seg['ID'])}",
            f"Segment{n}_LabelValue:={seg['LabelValue']}",
            f"Segment{n}_Layer:=0",
            f"Segment{n}_Name:={_clean(seg['Name'])}",
            f"Segment{n}_NameAutoGenerated:=0",
            f"Segment{n}_Tags:={tags}",
        ]
    geometry = ";".join(repr(float(v)) for v in matrix.ravel()) + f";0;{ni - 1};0;{nj - 1};0;{nk - 1};"
    lines += [
        "Segmentation_ContainedRepresentationNames:=Binary labelmap|",
        f"Segmentation_ConversionParameters:=Reference image geometry|{geometry}|"
        "Image geometry description string determining the geometry of the labelmap that is created in course "
        "of conversion. Can be copied from a volume, using the button.&",
        "Segmentation_MasterRepresentation:=Binary labelmap",
        "Segmentation_ReferenceImageExtentOffset:=0 0 0",
    ]
    return "\n".join(lines) + "\n\n"


# =========================================================================== reading


def read_seg_nrrd(path: str | os.PathLike) -> SegmentationResult:
    """Read a .seg.nrrd (ours or one saved by Slicer) back into a SegmentationResult."""
    path = Path(path)
    fields, keyvalues, data = _read_nrrd(path)
    layers, file_ijk_to_ras = _layers_and_geometry(path, fields, data)
    messages: list[str] = []
    offset = _ints(keyvalues.get("Segmentation_ReferenceImageExtentOffset", "0 0 0"), 3, path)
    layers, ijk_to_ras, origin_in_ref = _place_in_reference(layers, file_ijk_to_ras, offset, keyvalues, messages)

    shape = layers.shape[:3]
    liver = np.zeros(shape, dtype=bool)
    instances = np.zeros(shape, dtype=np.uint16)
    lesions: list[LesionRecord] = []
    model_version = ""
    voxel_ml = abs(float(np.linalg.det(ijk_to_ras[:3, :3]))) / 1000.0
    segments = _segments_from_header(keyvalues, layers.shape[3], path)
    roles = [_segment_role(seg) for seg in segments]
    claimed = {_lesion_id(seg) for seg, role in zip(segments, roles) if role == "lesion"} - {None}
    next_free_id = max(claimed | {0}) + 1
    used_ids: set[int] = set()
    placed: list[tuple[dict, int]] = []
    layer_extents: dict[int, list[int] | None] = {}
    for seg, role in zip(segments, roles):
        # As Slicer does: the first segment of a layer gives the extent (in file voxels) of the layer.
        extent = layer_extents.setdefault(seg["Layer"], seg["Extent"])
        model_version = model_version or seg["Tags"].get(TAG_PREFIX + "ModelVersion", "")
        if role == "other":
            messages.append(f"Segment '{seg['Name']}' is neither liver nor a liver lesion; ignored.")
            continue
        mask = _segment_mask(layers, seg, extent, np.array(offset) - origin_in_ref)
        if role == "liver":
            liver |= mask
            continue
        if not mask.any():
            messages.append(f"Segment '{seg['Name']}' is empty; skipped.")
            continue
        lesion_id = _lesion_id(seg)
        if lesion_id is None or lesion_id in used_ids:
            if lesion_id is not None:
                messages.append(f"Segment '{seg['Name']}' repeats lesion id {lesion_id}; given id {next_free_id}.")
            lesion_id, next_free_id = next_free_id, next_free_id + 1
        used_ids.add(lesion_id)
        if np.any(instances[mask]):
            messages.append(f"Segment '{seg['Name']}' overlaps another lesion; the overlap is given to lesion {lesion_id}.")
        instances[mask] = lesion_id
        placed.append((seg, lesion_id))

    boxes = ndimage.find_objects(instances)
    for seg, lesion_id in placed:
        box = boxes[lesion_id - 1]
        if box is None:  # entirely covered by later lesions
            messages.append(f"Segment '{seg['Name']}' lies entirely under other lesions; skipped.")
            continue
        k, j, i = np.nonzero(instances[box] == lesion_id)
        ijk = (i + box[2].start, j + box[1].start, k + box[0].start)
        lesions.append(_lesion_record(seg, lesion_id, ijk, ijk_to_ras, voxel_ml, messages))

    has_liver = bool(liver.any())
    whole_liver = liver | (instances > 0)
    liver &= instances == 0  # liver_mask holds parenchyma only
    lesions.sort(key=lambda rec: rec.lesion_id)
    return SegmentationResult(
        liver_mask=liver.astype(np.uint8), lesion_instances=instances, lesions=lesions, ijk_to_ras=ijk_to_ras,
        liver_volume_ml=float(whole_liver.sum()) * voxel_ml if has_liver else 0.0,
        messages=messages, model_version=model_version,
    )


# --------------------------------------------------------------------------- NRRD parsing

_NRRD_TYPES = {
    "i1": ("signed char", "int8", "int8_t"),
    "u1": ("uchar", "unsigned char", "uint8", "uint8_t"),
    "i2": ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    "u2": ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    "i4": ("int", "signed int", "int32", "int32_t"),
    "u4": ("uint", "unsigned int", "uint32", "uint32_t"),
    "i8": ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"),
    "u8": ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    "f4": ("float",),
    "f8": ("double",),
}
_DTYPE_BY_NAME = {name: code for code, names in _NRRD_TYPES.items() for name in names}


def _read_nrrd(path: Path) -> tuple[dict, dict, np.ndarray]:
    """(fields, key/value pairs, data reshaped to reversed sizes, i.e. fastest file axis last)."""
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror}).") from exc
    if not raw.startswith(b"NRRD000"):
        raise InputError(f"{path}: is not a NRRD file.")
    end = raw.find(b"\n\n")
    if end < 0:
        raise InputError(f"{path}: the NRRD header is incomplete (file truncated?).")
    header, payload = raw[:end].decode("utf-8", errors="replace"), raw[end + 2:]
    fields: dict[str, str] = {}
    keyvalues: dict[str, str] = {}
    for line in header.splitlines()[1:]:
        line = line.rstrip("\r")
        if not line or line.startswith("#"):
            continue
        if ":=" in line:
            key, value = line.split(":=", 1)
            keyvalues[key] = value
        elif ": " in line:
            key, value = line.split(": ", 1)
            fields[key.strip().lower()] = value.strip()
    if "data file" in fields or "datafile" in fields:
        raise InputError(f"{path}: detached NRRD data files are not supported; save the segmentation as .seg.nrrd.")
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        code = _DTYPE_BY_NAME[fields["type"].lower()]
    except (KeyError, ValueError) as exc:
        raise InputError(f"{path}: the NRRD header lacks a valid 'sizes' or 'type' field.") from exc
    dtype = np.dtype(("<" if fields.get("endian", "little") == "little" else ">") + code)
    encoding = fields.get("encoding", "raw").lower()
    try:
        if encoding in ("gzip", "gz"):
            payload = gzip.decompress(payload)
        elif encoding in ("bzip2", "bz2"):
            payload = bz2.decompress(payload)
        elif encoding != "raw":
            raise InputError(f"{path}: NRRD encoding '{encoding}' is not supported (use raw or gzip).")
    except (OSError, EOFError, ValueError) as exc:
        raise InputError(f"{path}: the compressed data is damaged or truncated ({exc}).") from exc
    count = int(np.prod(sizes))
    if len(payload) < count * dtype.itemsize:
        raise InputError(f"{path}: the file is truncated ({len(payload)} of {count * dtype.itemsize} data bytes).")
    data = np.frombuffer(payload, dtype=dtype, count=count).reshape(sizes[::-1])
    return fields, keyvalues, data


def _parse_vector(text: str, path: Path) -> np.ndarray | None:
    text = text.strip()
    if text == "none":
        return None
    try:
        return np.array([float(v) for v in text.strip("()").split(",")])
    except ValueError as exc:
        raise InputError(f"{path}: cannot parse NRRD vector '{text}'.") from exc


def _layers_and_geometry(path: Path, fields: dict, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([k, j, i, layer] integer labelmaps, file IJK-to-RAS)."""
    space = fields.get("space", "").lower()
    if space in ("left-posterior-superior", "lps"):
        to_ras = _LPS_TO_RAS
    elif space in ("right-anterior-superior", "ras"):
        to_ras = np.eye(3)
    else:
        raise InputError(f"{path}: NRRD space '{space or '(missing)'}' is not supported; expected LPS or RAS.")
    directions = [_parse_vector(v, path) for v in re.findall(r"\([^)]*\)|none", fields.get("space directions", ""))]
    if len(directions) != data.ndim:
        raise InputError(f"{path}: 'space directions' does not match the {data.ndim} axes of the data.")
    if data.ndim == 3 and all(d is not None for d in directions):
        layers = data[..., np.newaxis]
    elif data.ndim == 4 and directions[0] is None and all(d is not None for d in directions[1:]):
        layers = data  # [k, j, i, layer]: the layer (list) axis is the fastest in the file
        directions = directions[1:]
    else:
        raise InputError(f"{path}: expected a 3D labelmap or a list of 3D labelmaps, got {data.ndim} axes.")
    if layers.dtype.kind == "f":
        layers = np.trunc(layers).astype(np.int64)  # as Slicer does: truncate to integer
    origin = _parse_vector(fields.get("space origin", "(0,0,0)"), path)
    matrix = np.eye(4)
    matrix[:3, :3] = to_ras @ np.column_stack(directions)
    matrix[:3, 3] = to_ras @ origin
    return layers, matrix


def _ints(text: str, count: int, path: Path) -> list[int]:
    try:
        values = [int(v) for v in text.split()]
    except ValueError:
        values = []
    if len(values) != count:
        raise InputError(f"{path}: cannot parse '{text}' as {count} integers.")
    return values


def _reference_geometry(keyvalues: dict) -> tuple[np.ndarray, list[int]] | None:
    for parameter in keyvalues.get("Segmentation_ConversionParameters", "").split("&"):
        parts = parameter.split("|")
        if len(parts) >= 2 and parts[0] == "Reference image geometry":
            try:
                values = [float(v) for v in parts[1].split(";") if v.strip()]
            except ValueError:
                return None
            if len(values) == 22:
                return np.array(values[:16]).reshape(4, 4), [int(v) for v in values[16:]]
    return None


def _place_in_reference(layers: np.ndarray, file_ijk_to_ras: np.ndarray, offset: list[int], keyvalues: dict,
                        messages: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad a cropped file back into the reference (input CT) grid when the file says where it lies.

    Returns (layers, ijk_to_ras of the returned grid, reference IJK of returned index 0).
    """
    reference = _reference_geometry(keyvalues)
    offset_matrix = np.eye(4)
    offset_matrix[:3, 3] = offset
    if reference is not None:
        ref_matrix, extent = reference
        starts, stops = np.array(extent[0::2]), np.array(extent[1::2]) + 1
        ni, nj, nk = np.array(layers.shape[2::-1])
        file_stops = np.array(offset) + [ni, nj, nk]
        tolerance = 1e-4 * max(1.0, float(np.abs(ref_matrix).max()))
        same_grid = np.allclose(ref_matrix @ offset_matrix, file_ijk_to_ras, atol=tolerance)
        if same_grid and np.all(starts <= offset) and np.all(file_stops <= stops):
            if np.array_equal(starts, offset) and np.array_equal(stops, file_stops):
                return layers, file_ijk_to_ras, np.array(offset)
            full = np.zeros(tuple((stops - starts)[::-1]) + (layers.shape[3],), dtype=layers.dtype)
            lo = np.array(offset) - starts
            full[lo[2]:lo[2] + nk, lo[1]:lo[1] + nj, lo[0]:lo[0] + ni] = layers
            start_matrix = np.eye(4)
            start_matrix[:3, 3] = starts
            return full, ref_matrix @ start_matrix, starts
        messages.append("The segmentation's grid differs from its reference image geometry; "
                        "it is returned in its own grid.")
    return layers, file_ijk_to_ras, np.array(offset)


# --------------------------------------------------------------------------- segments


def _segments_from_header(keyvalues: dict, layer_count: int, path: Path) -> list[dict]:
    segments = []
    n = 0
    while f"Segment{n}_ID" in keyvalues:
        get = lambda key, default="": keyvalues.get(f"Segment{n}_{key}", default)  # noqa: E731
        tags = {}
        for pair in get("Tags").split("|"):
            if ":" in pair:
                key, value = pair.split(":", 1)
                tags[key] = value
        extent = get("Extent")
        segments.append({
            "ID": get("ID"),
            "Name": get("Name"),
            "Color": tuple(float(v) for v in get("Color", "0 0 0").split()[:3]),
            # Old multi-frame files have one frame per segment and no label value: voxels are 1.
            "Layer": int(get("Layer", str(n))),
            "LabelValue": int(get("LabelValue", "1")),
            "Extent": _ints(extent, 6, path) if extent else None,
            "Tags": tags,
        })
        if not 0 <= segments[-1]["Layer"] < layer_count:
            raise InputError(f"{path}: segment '{segments[-1]['Name']}' refers to layer {segments[-1]['Layer']}, "
                             f"but the file has {layer_count}.")
        n += 1
    return segments


def _segment_mask(layers: np.ndarray, seg: dict, extent: list[int] | None, file_start: np.ndarray) -> np.ndarray:
    """Voxels of ``seg``; ``extent`` is in file voxels, ``file_start`` the returned-grid index of file voxel 0."""
    layer = layers[..., seg["Layer"]]
    if extent is None:
        return layer == seg["LabelValue"]
    mask = np.zeros(layer.shape, dtype=bool)  # voxels outside the layer's extent belong to no segment
    lo = np.maximum(np.array(extent[0::2]) + file_start, 0)
    hi = np.minimum(np.array(extent[1::2]) + file_start + 1, layer.shape[::-1])
    if np.all(hi > lo):
        box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        mask[box] = layer[box] == seg["LabelValue"]
    return mask


_NAME_PATTERN = re.compile(r"^\s*lesion\s+(\d+)(?:\s*[\u2013\-:]\s*([a-z]+)(?:\s*\(\s*([0-9.]+)\s*\))?)?", re.IGNORECASE)


def _segment_role(seg: dict) -> str:
    tag_type = seg["Tags"].get(TAG_PREFIX + "Type")
    kind = kind_from_terminology_string(seg["Tags"].get(TERMINOLOGY_TAG, ""))
    if seg["ID"] == LIVER_SEGMENT_ID or tag_type == "liver" or kind == "liver" or seg["Name"].strip().lower() == "liver":
        return "liver"
    if (TAG_PREFIX + "LesionId") in seg["Tags"] or re.match(r"^lesion_\d+$", seg["ID"]) \
            or _NAME_PATTERN.match(seg["Name"]) or kind is not None:
        return "lesion"
    return "other"


def _lesion_id(seg: dict) -> int | None:
    for text, pattern in ((seg["Tags"].get(TAG_PREFIX + "LesionId", ""), r"^(\d+)$"),
                          (seg["ID"], r"^lesion_(\d+)$")):
        match = re.match(pattern, text.strip())
        if match and 0 < int(match.group(1)) <= _MAX_LESION_ID:
            return int(match.group(1))
    match = _NAME_PATTERN.match(seg["Name"])
    return int(match.group(1)) if match and 0 < int(match.group(1)) <= _MAX_LESION_ID else None


def _float_tag(tags: dict, key: str) -> float:
    try:
        return float(tags[TAG_PREFIX + key])
    except (KeyError, ValueError):
        return math.nan


def parse_probabilities(text: str) -> dict[str, float]:
    """'cyst=0.05,hemangioma=0.08,metastasis=0.87' -> dict; malformed pairs are skipped."""
    probabilities: dict[str, float] = {}
    for pair in text.split(","):
        key, _, value = pair.partition("=")
        try:
            probabilities[key.strip()] = float(value)
        except ValueError:
            continue
    return probabilities


def _lesion_record(seg: dict, lesion_id: int, ijk: tuple[np.ndarray, np.ndarray, np.ndarray], ijk_to_ras: np.ndarray,
                   voxel_ml: float, messages: list[str]) -> LesionRecord:
    tags = seg["Tags"]
    lesion_type = tags.get(TAG_PREFIX + "Type", "")
    probabilities = parse_probabilities(tags.get(TAG_PREFIX + "Probabilities", ""))
    if not lesion_type:
        messages.append(f"Segment '{seg['Name']}' has no LiverLesionAI tags; its type is taken from its name or terminology.")
        match = _NAME_PATTERN.match(seg["Name"])
        if match and match.group(2) and match.group(2).lower() in LESION_TYPES:
            lesion_type = match.group(2).lower()
            if match.group(3):
                try:
                    probabilities = {lesion_type: float(match.group(3))}
                except ValueError:
                    pass
        else:
            kind = kind_from_terminology_string(tags.get(TERMINOLOGY_TAG, ""))
            lesion_type = kind if kind in LESION_TYPES else ""
    if lesion_type not in LESION_TYPES:
        lesion_type, probabilities = "", {}

    i, j, k = ijk
    centroid = ijk_to_ras @ np.array([i.mean(), j.mean(), k.mean(), 1.0])
    review = tags.get(TAG_PREFIX + "ReviewStatus", "unreviewed")
    return LesionRecord(
        lesion_id=lesion_id,
        lesion_type=lesion_type,
        probabilities=probabilities,
        voxel_count=int(k.size),
        volume_ml=float(k.size) * voxel_ml,
        long_axis_mm=_float_tag(tags, "LongAxisMm"),
        short_axis_mm=_float_tag(tags, "ShortAxisMm"),
        centroid_ras=tuple(float(v) for v in centroid[:3]),
        mean_hu=_float_tag(tags, "MeanHU"),
        std_hu=_float_tag(tags, "StdHU"),
        slice_range=(int(k.min()), int(k.max())),
        review_status=review if review in REVIEW_STATUSES else "unreviewed",
    )
