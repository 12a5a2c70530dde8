"""MRML glue of the Slicer module: CT volume node <-> engine <-> segmentation node, without Qt.

Everything the Slicer panel does to the scene goes through this module, so that it runs (and is tested)
under the ``slicer-core`` wheel exactly as inside the Slicer application. Rules kept here:

- numpy arrays are [k, j, i]; geometry is the volume node's IJK-to-RAS matrix (times its parent linear
  transform, if any), copied exactly;
- one segmentation node per result, one shared labelmap layer; segment IDs ``liver`` and ``lesion_<id>``;
- a lesion segment's name, colour, terminology and tags always change together (``_write_record_tags``);
- the review status lives in the segment's tags (and in Slicer's own segment status), so it is saved with
  the seg.nrrd and the scene; a rejected lesion stays in the node, hidden, until it is restored.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from pathlib import Path

import numpy as np

from .errors import InputError, OutputError
from .terminology import TERMINOLOGY_FILE, terminology_entry_string
from .records import (
    LESION_TYPES,
    LESION_TYPE_COLORS,
    LIVER_COLOR,
    REVIEW_STATUSES,
    UNCLASSIFIED_COLOR,
    CTVolume,
    LesionRecord,
    SegmentationResult,
)

LIVER_SEGMENT_ID = "liver"
LESION_SEGMENT_PREFIX = "lesion_"

# Slicer's own per-segment status (shown in the Segment Editor) mirrors our review status.
_SLICER_STATUS = {"unreviewed": "notstarted", "confirmed": "completed", "rejected": "flagged"}
_PREVIOUS_STATUS_TAG = "LiverLesionAI.PreviousReviewStatus"


def _slicer():
    import slicer  # deferred: importing the engine must not require slicer-core

    return slicer


def measure_lesions(hu, lesion_instances, ijk_to_ras):
    # Deferred (scipy): the Slicer module imports this file before the user agreed to install packages.
    from .lesions import measure_lesions as measure

    return measure(hu, lesion_instances, ijk_to_ras)


# ------------------------------------------------------------------- tags shared with segfile.py
# The command-line seg.nrrd writer (segfile.py) defines the tag keys and values; the scene uses the very
# same ones, so a file written by either reads back the same. (segfile builds them inside its writer:
# we ask it for the segments of a one-lesion result rather than repeating its layout here.)


def _segfile_segments(record: LesionRecord | None, model_version: str) -> list[dict]:
    from . import segfile

    lesions = [record] if record is not None else []
    empty = np.zeros((1, 1, 1), dtype=np.uint8)
    result = SegmentationResult(empty, empty.astype(np.uint16), lesions, np.eye(4), model_version=model_version)
    return segfile._labelmap_and_segments(result)[1]  # noqa: SLF001


def _tags_for(record: LesionRecord | None, model_version: str = "") -> dict[str, str]:
    """Our tags (no terminology: that goes through SetTerminology) for a lesion, or the liver if None."""
    from .segfile import TERMINOLOGY_TAG

    segments = _segfile_segments(record, model_version)
    tags = dict(segments[-1]["Tags"])
    tags.pop(TERMINOLOGY_TAG, None)
    return tags


@functools.lru_cache(maxsize=1)
def _tag_keys() -> tuple[str, ...]:
    from .segfile import TERMINOLOGY_TAG

    probe = LesionRecord(1, LESION_TYPES[0], {}, 1, 0.0, 0.0, 0.0, (0.0, 0.0, 0.0), 0.0, 0.0, (0, 0))
    return tuple(sorted(set(_tags_for(probe, "x")) | set(_tags_for(None, "x")) | {TERMINOLOGY_TAG, _PREVIOUS_STATUS_TAG}))


# --------------------------------------------------------------------------------------------- scene


def create_standalone_scene(terminology_file: str | os.PathLike | None = TERMINOLOGY_FILE):
    """A scene with the module logics the Slicer application would register (for tests and scripts only).

    Sets ``slicer.mrmlScene`` so that ``slicer.util`` helpers work. Never call this inside Slicer.
    """
    slicer = _slicer()
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app_logic)
    with _vtk_messages_hidden():  # no Slicer home: the colour files on disk are not found (built-in ones are)
        colors.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Colors", colors)  # first: the volumes logic looks it up
    logics = {"colors": colors}
    for name, cls in (
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("Terminologies", slicer.vtkSlicerTerminologiesModuleLogic),
    ):
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        if name == "Terminologies":
            # The wheel ships none of Slicer's default terminology files: the logic reports each one
            # missing when it gets the scene. Expected here, so not shown; ours is loaded below.
            with _vtk_messages_hidden():
                logic.SetMRMLScene(scene)
        else:
            logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name, logic)
        logics[name.lower()] = logic
    if terminology_file is not None:
        context = logics["terminologies"].LoadTerminologyFromFile(str(terminology_file))
        if not context:
            raise InputError(f"The terminology file {terminology_file} could not be loaded.")
    # Keep the logics alive as long as the scene (VTK holds them only weakly through the app logic).
    scene._liverlesionai_logics = (app_logic, logics)  # noqa: SLF001
    slicer.mrmlScene = scene
    return scene


@contextlib.contextmanager
def _vtk_messages_hidden():
    import vtk

    shown = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(shown)


# ------------------------------------------------------------------------------------ volume <-> CT


def _vtk_matrix(array: np.ndarray):
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def _numpy_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _image_data_from_array(voxels: np.ndarray):
    import vtk
    from vtk.util import numpy_support

    voxels = np.ascontiguousarray(voxels)
    if voxels.ndim != 3:
        raise InputError(f"Expected a 3D volume, got an array with {voxels.ndim} dimensions.")
    k, j, i = voxels.shape
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    scalars = numpy_support.numpy_to_vtk(voxels.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image


def _array_from_image_data(image) -> np.ndarray:
    from vtk.util import numpy_support

    i, j, k = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        raise InputError("The volume holds no voxel data.")
    if scalars.GetNumberOfComponents() != 1:
        raise InputError("The volume has several components per voxel (colour or vector image); a CT is needed.")
    return numpy_support.vtk_to_numpy(scalars).reshape(k, j, i).copy()


def volume_node_from_ct(scene, ct: CTVolume, name: str | None = None):
    """A new scalar volume node holding ``ct`` with its exact geometry."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or ct.name)
    node.SetIJKToRASMatrix(_vtk_matrix(ct.ijk_to_ras))
    node.SetAndObserveImageData(_image_data_from_array(ct.voxels))
    node.CreateDefaultDisplayNodes()
    return node


def world_ijk_to_ras(node) -> np.ndarray:
    """IJK-to-RAS of a volume or labelmap node in world coordinates (its linear parent transform applied)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_ras = _numpy_matrix(m)
    transform_node = node.GetParentTransformNode()
    if transform_node is not None:
        if not transform_node.IsTransformToWorldLinear():
            raise InputError(
                f"The volume '{node.GetName()}' is under a non-linear transform: harden the transform first."
            )
        to_world = vtk.vtkMatrix4x4()
        transform_node.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = _numpy_matrix(to_world) @ ijk_to_ras
    return ijk_to_ras


def ct_from_volume_node(node) -> CTVolume:
    """The CT held by a scalar volume node, in HU, with its exact world geometry."""
    if node is None:
        raise InputError("No CT volume is selected.")
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{node.GetName()}' is not a scalar (greyscale) volume; select the CT.")
    if node.GetImageData() is None:
        raise InputError(f"The volume '{node.GetName()}' holds no voxel data.")
    return CTVolume(_array_from_image_data(node.GetImageData()), world_ijk_to_ras(node), node.GetName())


# ----------------------------------------------------------------------------- result -> segmentation


def _lesion_segment_id(lesion_id: int) -> str:
    return f"{LESION_SEGMENT_PREFIX}{int(lesion_id)}"


def _oriented_labelmap(labels: np.ndarray, ijk_to_ras: np.ndarray):
    slicer = _slicer()
    image = slicer.vtkOrientedImageData()
    k, j, i = labels.shape
    image.SetDimensions(i, j, k)
    from vtk.util import numpy_support

    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(labels).ravel(), deep=True))
    image.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras))
    return image


def _new_segment(name: str, color):
    slicer = _slicer()
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.SetNameAutoGenerated(False)
    segment.SetColor(*[float(c) for c in color])
    segment.SetColorAutoGenerated(False)
    return segment


def add_result_to_scene(scene, volume_node, result: SegmentationResult, name: str | None = None):
    """One segmentation node (one shared labelmap layer) with the liver and one segment per lesion."""
    slicer = _slicer()
    ct_ijk_to_ras = world_ijk_to_ras(volume_node)
    shape = _array_from_image_data(volume_node.GetImageData()).shape
    for what, array in (("liver mask", result.liver_mask), ("lesion map", result.lesion_instances)):
        if array.shape != shape:
            raise InputError(f"The {what} has shape {array.shape}, the CT {shape}: they must match.")
    if not np.allclose(np.asarray(result.ijk_to_ras), ct_ijk_to_ras, atol=1e-4):
        raise InputError("The result's geometry differs from the CT volume's: it belongs to another volume.")

    records = sorted(result.lesions, key=lambda r: r.lesion_id)
    label_dtype = np.uint8 if len(records) < 255 else np.uint16
    labels = np.zeros(shape, dtype=label_dtype)
    labels[result.liver_mask > 0] = 1
    for value, record in enumerate(records, start=2):
        labels[result.lesion_instances == record.lesion_id] = value
    shared = _oriented_labelmap(labels, ct_ijk_to_ras)

    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume_node.GetName()} liver lesions")
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    seg_node.CreateDefaultDisplayNodes()
    seg_node.SetAttribute("LiverLesionAI.ModelVersion", result.model_version or "")
    seg_node.SetAttribute("LiverLesionAI.LiverVolumeMl", f"{result.liver_volume_ml:.3f}")
    seg_node.SetAttribute("LiverLesionAI.Messages", json.dumps(list(result.messages)))
    segmentation = seg_node.GetSegmentation()
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segmentation.SetSourceRepresentationName(labelmap_name)

    liver = _new_segment("Liver", LIVER_COLOR)
    liver.SetTerminology(_terminology("liver"))
    for key, value in _tags_for(None, result.model_version).items():
        liver.SetTag(key, value)
    liver.AddRepresentation(labelmap_name, shared)
    liver.SetLabelValue(1)
    segmentation.AddSegment(liver, LIVER_SEGMENT_ID)
    for value, record in enumerate(records, start=2):
        segment = _new_segment(record.display_name, LESION_TYPE_COLORS[record.lesion_type])
        segment.AddRepresentation(labelmap_name, shared)
        segment.SetLabelValue(value)
        segmentation.AddSegment(segment, _lesion_segment_id(record.lesion_id))
        _write_record_tags(seg_node, _lesion_segment_id(record.lesion_id), record, result.model_version)
    return seg_node


def _terminology(kind: str) -> str:
    return terminology_entry_string(kind)


def _write_record_tags(seg_node, segment_id: str, record: LesionRecord, model_version: str | None = None) -> None:
    """Name, colour, terminology, tags and Slicer status of a lesion segment, all from one record."""
    segment = _segment(seg_node, segment_id)
    if model_version is None:  # keep the version of the model that typed it
        model_version = seg_node.GetAttribute("LiverLesionAI.ModelVersion") or ""
    kind = record.lesion_type if record.lesion_type in LESION_TYPES else "lesion"
    segment.SetName(record.display_name if record.lesion_type else f"Lesion {record.lesion_id} \u2013 unclassified")
    segment.SetNameAutoGenerated(False)
    segment.SetColor(*LESION_TYPE_COLORS.get(record.lesion_type, UNCLASSIFIED_COLOR))
    segment.SetColorAutoGenerated(False)
    segment.SetTerminology(_terminology(kind))
    for key, value in _tags_for(record, model_version).items():
        segment.SetTag(key, value)
    _slicer().vtkSlicerSegmentationsModuleLogic.SetSegmentStatus(
        segment, _status_code(_SLICER_STATUS[record.review_status])
    )


def _status_code(machine_readable: str) -> int:
    return _slicer().vtkSlicerSegmentationsModuleLogic.GetSegmentStatusFromMachineReadableString(machine_readable)


def _segment(seg_node, segment_id: str):
    segment = seg_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise InputError(f"The segmentation '{seg_node.GetName()}' has no segment '{segment_id}'.")
    return segment


def show_surfaces(seg_node) -> None:
    """3D surfaces of all segments (the slice views show the labelmap overlay by default)."""
    seg_node.CreateClosedSurfaceRepresentation()


# ------------------------------------------------------------------------- voxel edits (scripted)


def set_segment_mask(seg_node, segment_id: str, mask: np.ndarray, volume_node) -> None:
    """Replace a segment's voxels with ``mask`` (on the CT's grid), as a Segment Editor edit would."""
    slicer = _slicer()
    _segment(seg_node, segment_id)
    image = _oriented_labelmap(np.asarray(mask, dtype=bool).astype(np.uint8), world_ijk_to_ras(volume_node))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, seg_node, segment_id, logic.MODE_REPLACE):
        raise OutputError(f"Could not update the voxels of segment '{segment_id}'.")


def add_painted_segment(seg_node, mask: np.ndarray, volume_node, name: str = "New lesion") -> str:
    """A new, untyped segment (what the reviewer paints with the Segment Editor); returns its ID."""
    segment_id = seg_node.GetSegmentation().AddEmptySegment("", name, list(UNCLASSIFIED_COLOR))
    set_segment_mask(seg_node, segment_id, mask, volume_node)
    return segment_id


# ------------------------------------------------------------------------------- reading records back


def _record_from_tags(seg_node, segment_id: str) -> LesionRecord | None:
    """Type, probabilities, review status and id stored in a lesion segment's tags (None: not typed).

    Measurements in the returned record are placeholders: callers take them from the voxels.
    """
    from .segfile import TAG_PREFIX

    tags = _segment_tag_dict(_segment(seg_node, segment_id))
    lesion_type = tags.get(TAG_PREFIX + "Type", "")
    if lesion_type not in LESION_TYPES:
        return None
    from .segfile import parse_probabilities  # imports scipy: not at module load (see the module file)

    probabilities = parse_probabilities(tags.get(TAG_PREFIX + "Probabilities", ""))
    status = tags.get(TAG_PREFIX + "ReviewStatus", "unreviewed")
    return LesionRecord(
        lesion_id=_stored_lesion_id(seg_node, segment_id) or 0, lesion_type=lesion_type,
        probabilities=probabilities, voxel_count=0, volume_ml=0.0, long_axis_mm=0.0, short_axis_mm=0.0,
        centroid_ras=(0.0, 0.0, 0.0), mean_hu=0.0, std_hu=0.0, slice_range=(0, 0),
        review_status=status if status in REVIEW_STATUSES else "unreviewed",
    )


def _stored_lesion_id(seg_node, segment_id: str) -> int | None:
    """The id in the LesionId tag, else in an ID like ``lesion_3`` (as segfile.py reads files)."""
    from .segfile import TAG_PREFIX

    tag = _segment_tag(_segment(seg_node, segment_id), TAG_PREFIX + "LesionId") or ""
    for text, pattern in ((tag, r"(\d+)"), (segment_id, rf"{LESION_SEGMENT_PREFIX}(\d+)")):
        match = re.fullmatch(pattern, text.strip())
        if match and int(match.group(1)) > 0:
            return int(match.group(1))
    return None


def _segment_tag(segment, key: str) -> str | None:
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(key, value) else None


def _segment_tag_dict(segment) -> dict[str, str]:
    # vtkSegment cannot list its tag keys from Python: read the keys we write.
    tags = {key: _segment_tag(segment, key) for key in _tag_keys()}
    return {key: value for key, value in tags.items() if value is not None}


def lesion_segment_ids(seg_node) -> list[str]:
    """Every segment except the liver: the engine's lesions and any segment the user painted."""
    ids = list(seg_node.GetSegmentation().GetSegmentIDs())
    return [sid for sid in ids if sid != LIVER_SEGMENT_ID]


def lesion_ids_by_segment(seg_node) -> dict[str, int]:
    """Lesion id of every lesion segment: the stored one, else a new one (for segments the user painted)."""
    stored = {sid: _stored_lesion_id(seg_node, sid) for sid in lesion_segment_ids(seg_node)}
    ids: dict[str, int] = {}
    taken: set[int] = set()
    for sid, lesion_id in stored.items():
        if lesion_id is not None and lesion_id not in taken:
            ids[sid] = lesion_id
            taken.add(lesion_id)
    next_id = max(taken | {v for v in stored.values() if v}, default=0) + 1
    for sid in stored:
        if sid not in ids:
            ids[sid] = next_id
            next_id += 1
    return {sid: ids[sid] for sid in stored}


def segment_masks(seg_node, volume_node, segment_ids: list[str]) -> np.ndarray:
    """Label map in the CT's voxel grid: value n+1 where segment_ids[n] is (later segments win overlaps)."""
    slicer = _slicer()
    scene = seg_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "LiverLesionAI temporary export")
    try:
        ids = _string_array(segment_ids)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            seg_node, ids, labelmap, volume_node
        )
        if not ok:
            raise OutputError(f"The segments of '{seg_node.GetName()}' could not be resampled to the CT grid.")
        labels = _array_from_image_data(labelmap.GetImageData())
        if not np.allclose(world_ijk_to_ras(labelmap), world_ijk_to_ras(volume_node), atol=1e-4):
            raise OutputError("The exported segments do not lie on the CT's voxel grid.")
        return labels
    finally:
        display = labelmap.GetDisplayNode()
        color = display.GetColorNode() if display is not None else None
        scene.RemoveNode(labelmap)
        if color is not None and color.GetSaveWithScene():  # the export made it for this labelmap only
            scene.RemoveNode(color)


def reviewed_liver_mask(seg_node, volume_node) -> np.ndarray:
    """The liver as reviewed, in the CT's voxel grid: the Liver segment and every lesion not rejected, holes
    filled (a rejected lesion inside the liver is liver); for searching lesions again inside it."""
    from scipy import ndimage

    from .segfile import TAG_PREFIX

    segmentation = seg_node.GetSegmentation()
    if segmentation.GetSegment(LIVER_SEGMENT_ID) is None:
        raise InputError(f"The segmentation '{seg_node.GetName()}' has no Liver segment.")
    kept = [sid for sid in lesion_segment_ids(seg_node)
            if _segment_tag(segmentation.GetSegment(sid), TAG_PREFIX + "ReviewStatus") != "rejected"]
    mask = ndimage.binary_fill_holes(segment_masks(seg_node, volume_node, [LIVER_SEGMENT_ID, *kept]) > 0)
    if not mask.any():
        raise InputError(f"The Liver segment of '{seg_node.GetName()}' is empty.")
    return mask


def _string_array(values):
    import vtk

    array = vtk.vtkStringArray()
    for value in values:
        array.InsertNextValue(value)
    return array


def lesion_records_from_segmentation(seg_node, volume_node) -> list[LesionRecord]:
    """Lesion records recomputed from the segments' current voxels, with type, probabilities and status
    from the tags. A segment the user painted (no tags) comes back with lesion_type "" (unclassified).
    Ordered by lesion id; a segment whose voxels were all erased is left out.
    """
    ct = ct_from_volume_node(volume_node)
    ids = lesion_ids_by_segment(seg_node)
    if not ids:
        return []
    labels = segment_masks(seg_node, volume_node, list(ids))
    lookup = np.zeros(len(ids) + 1, dtype=np.uint16)
    lookup[1:] = list(ids.values())
    measurements = measure_lesions(ct.voxels, lookup[labels], ct.ijk_to_ras)
    records = []
    for sid, lesion_id in ids.items():
        if lesion_id not in measurements:
            continue
        stored = _record_from_tags(seg_node, sid)
        records.append(
            LesionRecord(
                lesion_id=lesion_id,
                lesion_type=stored.lesion_type if stored else "",
                probabilities=dict(stored.probabilities) if stored else {},
                review_status=stored.review_status if stored else "unreviewed",
                **measurements[lesion_id],
            )
        )
    return sorted(records, key=lambda r: r.lesion_id)


def refresh_measurements(seg_node, volume_node) -> list[LesionRecord]:
    """After an edit: recompute every lesion's measurements and write them into its tags and name."""
    records = lesion_records_from_segmentation(seg_node, volume_node)
    segment_of = {lesion_id: sid for sid, lesion_id in lesion_ids_by_segment(seg_node).items()}
    for record in records:
        if record.lesion_type:
            _write_record_tags(seg_node, segment_of[record.lesion_id], record)
    return records


def records_for_export(records: list[LesionRecord]) -> list[LesionRecord]:
    """What reports and exports list: every lesion the reviewer has not rejected."""
    return [r for r in records if r.review_status != "rejected"]


# ------------------------------------------------------------------------------------- review actions


def _stored_record(seg_node, segment_id: str) -> LesionRecord:
    record = _record_from_tags(seg_node, segment_id)
    if record is None:
        raise InputError(
            f"The segment '{_segment(seg_node, segment_id).GetName()}' has not been classified yet: "
            "classify it first."
        )
    return record


def set_lesion_type(seg_node, segment_id: str, lesion_type: str) -> LesionRecord:
    """The reviewer's type: name, colour, terminology and tags change together."""
    if lesion_type not in LESION_TYPES:
        raise InputError(f"Unknown lesion type '{lesion_type}'; choose one of {', '.join(LESION_TYPES)}.")
    record = _stored_record(seg_node, segment_id)
    record.lesion_type = lesion_type
    _write_record_tags(seg_node, segment_id, record)
    return record


def set_review_status(seg_node, segment_id: str, status: str) -> LesionRecord:
    """unreviewed / confirmed / rejected. Rejected hides the segment and drops it from exports; setting
    any other status (or ``undo_review_status``) brings it back."""
    if status not in REVIEW_STATUSES:
        raise InputError(f"Unknown review status '{status}'; choose one of {', '.join(REVIEW_STATUSES)}.")
    record = _stored_record(seg_node, segment_id)
    _segment(seg_node, segment_id).SetTag(_PREVIOUS_STATUS_TAG, record.review_status)
    changes_visibility = "rejected" in (status, record.review_status)
    record.review_status = status
    _write_record_tags(seg_node, segment_id, record)
    display = seg_node.GetDisplayNode()
    if display is not None and changes_visibility:  # otherwise the reviewer's own show/hide stays
        display.SetSegmentVisibility(segment_id, status != "rejected")
    return record


def undo_review_status(seg_node, segment_id: str) -> LesionRecord:
    """Back to the status before the last ``set_review_status`` (e.g. un-reject a lesion)."""
    segment = _segment(seg_node, segment_id)
    previous = _segment_tag(segment, _PREVIOUS_STATUS_TAG)
    return set_review_status(seg_node, segment_id, previous or "unreviewed")


def classify_segment(engine, seg_node, segment_id: str, volume_node) -> LesionRecord:
    """Type a lesion the user painted (or re-type an edited one) with the engine's lesion classifier."""
    if segment_id == LIVER_SEGMENT_ID:
        raise InputError("The liver segment is not a lesion; select a lesion segment to classify.")
    ct = ct_from_volume_node(volume_node)
    mask = segment_masks(seg_node, volume_node, [segment_id]) > 0
    if not mask.any():
        raise InputError(f"The segment '{_segment(seg_node, segment_id).GetName()}' is empty: paint the lesion first.")
    probabilities = {k: float(v) for k, v in engine.classify_lesion(ct, mask).items()}
    stored = _record_from_tags(seg_node, segment_id)
    lesion_id = lesion_ids_by_segment(seg_node)[segment_id]
    measured = measure_lesions(ct.voxels, mask.astype(np.uint16) * lesion_id, ct.ijk_to_ras)[lesion_id]
    record = LesionRecord(
        lesion_id=lesion_id,
        lesion_type=max(probabilities, key=probabilities.get),
        probabilities=probabilities,
        review_status=stored.review_status if stored else "unreviewed",
        **measured,
    )
    _write_record_tags(seg_node, segment_id, record)
    return record


def explanation_target(seg_node, segment_id: str) -> tuple[int, str]:
    """(lesion id, type) to explain for a lesion segment: the type in its tags, as reviewed."""
    if segment_id == LIVER_SEGMENT_ID:
        raise InputError("The liver segment is not a lesion; select a lesion to explain its type.")
    record = _record_from_tags(seg_node, segment_id)
    if record is None or record.lesion_type not in LESION_TYPES:
        raise InputError(f"The segment '{_segment(seg_node, segment_id).GetName()}' has no type yet: classify it "
                         "first.")
    return lesion_ids_by_segment(seg_node)[segment_id], record.lesion_type


# ---------------------------------------------------------------------------------------- table rows

TABLE_COLUMNS = ("ID", "Type", "Probability", "Volume (mL)", "Long axis (mm)", "Short axis (mm)", "Mean HU", "Review")


def table_rows(records: list[LesionRecord]) -> list[tuple[str, ...]]:
    """The lesion table's cells as text, in TABLE_COLUMNS order (the panel shows them as they are)."""
    rows = []
    for r in sorted(records, key=lambda r: r.lesion_id):
        rows.append(
            (
                str(r.lesion_id),
                r.lesion_type or "unclassified",
                f"{r.probability:.2f}" if r.lesion_type else "",
                f"{r.volume_ml:.2f}",
                f"{r.long_axis_mm:.1f}",
                f"{r.short_axis_mm:.1f}",
                f"{r.mean_hu:.0f}",
                r.review_status,
            )
        )
    return rows


def segment_id_for_lesion(seg_node, lesion_id: int) -> str:
    for sid, found in lesion_ids_by_segment(seg_node).items():
        if found == int(lesion_id):
            return sid
    raise InputError(f"Lesion {lesion_id} is not in the segmentation '{seg_node.GetName()}'.")


def lesion_centroid_ras(record: LesionRecord) -> tuple[float, float, float]:
    """Where the slice views are centred when the reviewer clicks the lesion's row."""
    return tuple(float(v) for v in record.centroid_ras)


# ------------------------------------------------------------------------------------------- files


def save_segmentation(seg_node, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a .seg.nrrd keeping names, colours, terminology, tags and geometry; nothing partial on disk,
    and an existing file is kept unless ``overwrite``."""
    from .volume_io import write_file_atomically  # deferred: SimpleITK

    path = Path(path)
    if not path.name.endswith(".seg.nrrd"):
        raise OutputError(f"A segmentation file must end with .seg.nrrd: {path}")

    def write(temporary: str) -> None:
        storage = _slicer().vtkMRMLSegmentationStorageNode()
        storage.SetFileName(temporary)
        storage.SetUseCompression(True)
        if not storage.WriteData(seg_node):
            raise OutputError(f"Could not write the segmentation to {path}.")

    return write_file_atomically(path, write, overwrite)


def load_segmentation(scene, path: str | os.PathLike, name: str | None = None):
    """A segmentation node read from a .seg.nrrd (ours or any Slicer one)."""
    slicer = _slicer()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"The segmentation file {path} does not exist.")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or path.name[: -len(".seg.nrrd")])
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise InputError(f"{path} is not a readable segmentation file.")
    node.CreateDefaultDisplayNodes()
    for sid in lesion_segment_ids(node):  # rejected lesions stay hidden after a reload
        record = _record_from_tags(node, sid)
        if record is not None and record.review_status == "rejected":
            node.GetDisplayNode().SetSegmentVisibility(sid, False)
    return node


ATTRIBUTION_COLOR_NODE_NAME = "LiverLesionAI attribution"


def _attribution_color_node(scene):
    """Blue (against the type) - transparent - red (for it), made once per scene: transparent at zero, so
    the map shows only where it says something when it is the foreground layer over the CT."""
    slicer = _slicer()
    from .report import ATTRIBUTION_AGAINST, ATTRIBUTION_FOR

    found = scene.GetNodesByClassByName("vtkMRMLColorTableNode", ATTRIBUTION_COLOR_NODE_NAME)
    if found.GetNumberOfItems():
        return found.GetItemAsObject(0)
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(ATTRIBUTION_COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for index in range(256):
        t = (index - 127.5) / 127.5
        r, g, b = ATTRIBUTION_FOR if t > 0 else ATTRIBUTION_AGAINST
        node.SetColor(index, f"{t:+.2f}", r / 255, g / 255, b / 255, min(1.0, abs(t)))
    scene.AddNode(node)
    return node


def load_attribution_volume(scene, path: str | os.PathLike, name: str):
    """An attribution map (``liverlesionai explain``) as a scalar volume shown blue-red, symmetric around zero
    and saturating where the PNG does (report.attribution_scale). The node keeps no link to the file (a
    worker's temporary folder): it is saved with the scene."""
    slicer = _slicer()
    from .report import attribution_scale

    path = Path(path)
    if not path.is_file():
        raise InputError(f"The attribution map {path} does not exist.")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise InputError(f"{path} is not a readable attribution map.")
    node.CreateDefaultDisplayNodes()
    values = _array_from_image_data(node.GetImageData())
    scale = attribution_scale(values)
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(_attribution_color_node(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevel(2 * scale, 0.0)
    return node


def save_scene(scene, folder: str | os.PathLike) -> Path:
    """Write the scene (.mrml) and every node's data into a new folder; returns the .mrml path."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise OutputError(f"The folder {folder} is not empty; choose a new folder for the scene.")
    folder.mkdir(parents=True, exist_ok=True)
    mrml = folder / "scene.mrml"
    scene.SetRootDirectory(str(folder))
    scene.SetURL(str(mrml))
    nodes = scene.GetNodesByClass("vtkMRMLStorableNode")
    used: set[str] = set()
    for n in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(n)
        if not node.GetSaveWithScene():  # e.g. the default colour tables, recreated by every Slicer
            continue
        storage = node.GetStorageNode()
        if storage is None:
            if not node.AddDefaultStorageNode():
                continue
            storage = node.GetStorageNode()
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", node.GetName()) or node.GetID()
        while stem in used:
            stem += "_"
        used.add(stem)
        storage.SetFileName(str(folder / f"{stem}.{storage.GetDefaultWriteFileExtension()}"))
        if not storage.WriteData(node):
            raise OutputError(f"Could not save '{node.GetName()}' with the scene.")
    scene.Commit()
    return mrml


def load_scene(mrml_path: str | os.PathLike):
    """A new scene read from a .mrml written by ``save_scene`` (or by Slicer), data included."""
    slicer = _slicer()
    mrml_path = Path(mrml_path)
    if not mrml_path.is_file():
        raise InputError(f"The scene file {mrml_path} does not exist.")
    scene = slicer.vtkMRMLScene()
    scene.SetURL(str(mrml_path))
    if not scene.Connect():
        raise InputError(f"{mrml_path} is not a readable scene.")
    return scene
