"""Lesion instances and their measurements: volume, RECIST-style axial diameters, HU statistics.

Diameters are measured in the patient's physical axial plane whatever the acquisition orientation:
when one volume axis is normal to the axial plane (axial, sagittal or coronal acquisitions, flips,
left-handed matrices) the axial planes are voxel planes and are measured directly; otherwise (oblique
volumes) each lesion is resampled onto an axial grid first.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .errors import InputError
from .records import LESION_TYPES, LesionRecord

_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connected lesions
# Voxel planes count as axial when their normal is within this angle of S (absorbs float32 headers).
_AXIAL_TOLERANCE_DEG = 1.0
# Caliper directions per half turn: 0.5 degree steps bound the diameter error to 4e-5 relative.
_CALIPER_DIRECTIONS = 360
_ANGLES = np.linspace(0.0, np.pi, _CALIPER_DIRECTIONS, endpoint=False)
_DIRECTIONS = np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], axis=1)  # (n, 2)
# Oblique volumes are resampled at their finest spacing, with at most this many cells along a side.
_MAX_OBLIQUE_GRID_SIDE = 400


class LesionGeometryError(InputError):
    """The lesion map or its geometry cannot be measured (wrong shape, degenerate matrix)."""


def label_lesions(lesion_mask: np.ndarray, min_voxels: int = 1) -> tuple[np.ndarray, int]:
    """Split a binary lesion mask into 26-connected lesions numbered 1..n, largest first.

    Components smaller than ``min_voxels`` are dropped. Returns (uint16 instance map, n).
    """
    mask = np.asarray(lesion_mask)
    if mask.ndim != 3:
        raise LesionGeometryError(f"The lesion mask must be a 3D volume, got {mask.ndim} dimensions.")
    binary = mask != 0
    instances = np.zeros(mask.shape, dtype=np.uint16)
    # Label only the lesions' bounding box: lesions fill a small part of a CT, labelling is costly.
    box = ndimage.find_objects(binary.astype(np.uint8))
    if not box:
        return instances, 0
    box = box[0]
    labels, n = ndimage.label(binary[box], structure=_FULL_CONNECTIVITY)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    kept = np.flatnonzero(sizes >= max(int(min_voxels), 1))
    # Stable sort: equal volumes keep their raster order, so the numbering is deterministic.
    kept = kept[np.argsort(-sizes[kept], kind="stable")]
    if kept.size > np.iinfo(np.uint16).max:
        raise LesionGeometryError(
            f"The lesion mask has {kept.size} separate lesions; at most 65535 can be numbered."
        )
    lut = np.zeros(n + 1, dtype=np.uint16)
    lut[kept] = np.arange(1, kept.size + 1, dtype=np.uint16)
    instances[box] = lut[labels]
    return instances, int(kept.size)


def _check_geometry(ijk_to_ras) -> np.ndarray:
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4):
        raise LesionGeometryError(f"ijk_to_ras must be a 4x4 matrix, got shape {m.shape}.")
    if not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise LesionGeometryError("ijk_to_ras is degenerate: the voxel size or directions are invalid.")
    return m


def _check_instances(lesion_instances: np.ndarray) -> np.ndarray:
    inst = np.asarray(lesion_instances)
    if inst.ndim != 3:
        raise LesionGeometryError(f"The lesion map must be a 3D volume, got {inst.ndim} dimensions.")
    if not np.issubdtype(inst.dtype, np.integer):
        raise LesionGeometryError(f"The lesion map must hold integer lesion ids, got {inst.dtype}.")
    return inst


def _axial_axis(direction: np.ndarray) -> int | None:
    """Array axis (0=k, 1=j, 2=i) whose voxel planes are axial, or None for an oblique volume."""
    cols = direction  # columns = RAS step of i, j, k
    best_axis, best_cos = None, 0.0
    for ijk_axis in range(3):
        a, b = (c for c in range(3) if c != ijk_axis)
        normal = np.cross(cols[:, a], cols[:, b])
        cos = abs(normal[2]) / np.linalg.norm(normal)
        if cos > best_cos:
            best_axis, best_cos = ijk_axis, cos
    if best_cos >= np.cos(np.deg2rad(_AXIAL_TOLERANCE_DEG)):
        return 2 - best_axis  # ijk column -> [k, j, i] array axis
    return None


def _in_plane_frame(step_p: np.ndarray, step_q: np.ndarray) -> np.ndarray:
    """2x2 matrix mapping in-plane voxel offsets (p, q) to orthonormal in-plane millimetres."""
    e1 = step_p / np.linalg.norm(step_p)
    e2 = step_q - (step_q @ e1) * e1
    e2 /= np.linalg.norm(e2)
    return np.array([[step_p @ e1, step_q @ e1], [step_p @ e2, step_q @ e2]])


def _plane_diameters(points_mm: np.ndarray, steps_2d: np.ndarray) -> tuple[float, float, float]:
    """(long, short, long-axis angle) of one plane's voxel set, given its voxel-centre points in mm.

    Each voxel is a cell of size |steps| around its centre: the caliper width along u is the
    centre-set width plus the cell's extent along u (the cell's inscribed ellipse, so a disc of
    diameter D sampled at any spacing measures D within about one voxel, not D + diagonal).
    """
    pts = points_mm
    if len(pts) >= 3:
        try:
            pts = pts[ConvexHull(pts).vertices]
        except QhullError:  # collinear or repeated points: every point is already an extreme point
            pass
    proj = pts @ _DIRECTIONS.T  # (n_points, n_dirs)
    cell = np.sqrt(((_DIRECTIONS @ steps_2d) ** 2).sum(axis=1))  # cell extent per direction
    widths = proj.max(axis=0) - proj.min(axis=0) + cell
    best = int(np.argmax(widths))
    perpendicular = (best + _CALIPER_DIRECTIONS // 2) % _CALIPER_DIRECTIONS
    return float(widths[best]), float(widths[perpendicular]), float(_ANGLES[best])


def _boundary_in_planes(mask: np.ndarray, plane_axis: int) -> np.ndarray:
    """Voxels on the in-plane outline of each plane (interior voxels never set a diameter)."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    cross = np.zeros((3, 3), dtype=bool)
    cross[1, :] = cross[:, 1] = True
    sl = [slice(None)] * 3
    sl[plane_axis] = 1
    structure[tuple(sl)] = cross
    interior = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~interior


def _axes_in_voxel_planes(mask: np.ndarray, plane_axis: int, direction: np.ndarray) -> tuple[float, float]:
    """Long and short axis when the planes along ``plane_axis`` are axial."""
    p_axis, q_axis = (a for a in range(3) if a != plane_axis)
    # array axis a -> ijk column 2 - a
    frame = _in_plane_frame(direction[:, 2 - p_axis], direction[:, 2 - q_axis])
    boundary = _boundary_in_planes(mask, plane_axis)
    coords = np.nonzero(boundary)
    planes = coords[plane_axis]
    pq = np.stack([coords[p_axis], coords[q_axis]], axis=1).astype(np.float64)
    points_mm = pq @ frame.T
    order = np.argsort(planes, kind="stable")
    planes, points_mm = planes[order], points_mm[order]
    splits = np.flatnonzero(np.diff(planes)) + 1
    best = (0.0, 0.0)
    for pts in np.split(points_mm, splits):
        long_mm, short_mm, _ = _plane_diameters(pts, frame)
        if long_mm > best[0]:
            best = (long_mm, short_mm)
    return best


def _axes_oblique(mask: np.ndarray, offset_kji: np.ndarray, m: np.ndarray) -> tuple[float, float]:
    """Long and short axis for an oblique volume: resample the lesion onto an axial RAS grid."""
    direction = m[:3, :3]
    spacing = np.linalg.norm(direction, axis=0)
    # Bounding box of the lesion's voxel cells in RAS.
    ext = np.array(mask.shape[::-1], dtype=np.float64)  # i, j, k sizes
    corners = np.array([[x, y, z] for x in (-0.5, ext[0] - 0.5) for y in (-0.5, ext[1] - 0.5)
                        for z in (-0.5, ext[2] - 0.5)])
    corners = corners + offset_kji[::-1]
    ras = corners @ direction.T + m[:3, 3]
    lo, hi = ras.min(axis=0), ras.max(axis=0)
    in_plane = max(spacing.min(), float((hi[:2] - lo[:2]).max()) / _MAX_OBLIQUE_GRID_SIDE)
    # Slab thickness = the largest S step of one voxel, i.e. the slice spacing seen along S.
    slab = max(float(np.abs(direction[2]).max()), in_plane)
    axes = [np.arange(lo[d] + in_plane / 2, hi[d], in_plane) for d in range(2)]
    axes.append(np.arange(lo[2] + slab / 2, hi[2], slab))
    if min(len(a) for a in axes) == 0:
        axes = [a if len(a) else np.array([(lo[d] + hi[d]) / 2]) for d, a in enumerate(axes)]
    gr, ga, gs = np.meshgrid(*axes, indexing="ij")
    grid_ras = np.stack([gr.ravel(), ga.ravel(), gs.ravel()])
    ijk = np.linalg.solve(direction, grid_ras - m[:3, 3:4])
    kji = ijk[::-1] - offset_kji[:, None]
    sampled = ndimage.map_coordinates(mask.astype(np.uint8), kji, order=0, mode="constant", cval=0)
    axial = sampled.reshape(gr.shape).transpose(2, 1, 0).astype(bool)  # [s, a, r]
    if not axial.any():  # thinner than the grid: fall back to one in-plane cell
        return float(in_plane), float(in_plane)
    grid_direction = np.diag([in_plane, in_plane, slab])  # grid i = R, j = A, k = S
    return _axes_in_voxel_planes(axial, 0, grid_direction)


def lesion_axes_mm(lesion_instances: np.ndarray, ijk_to_ras) -> dict[int, tuple[float, float]]:
    """Long and short axial diameter (mm) of every lesion id in the map."""
    return {lid: (v["long_axis_mm"], v["short_axis_mm"])
            for lid, v in _measure(None, lesion_instances, ijk_to_ras).items()}


def measure_lesions(hu: np.ndarray, lesion_instances: np.ndarray, ijk_to_ras) -> dict[int, dict]:
    """Measurements of every lesion id in ``lesion_instances`` (arrays [k, j, i]).

    Per id: voxel_count, volume_ml, long_axis_mm, short_axis_mm, centroid_ras, mean_hu, std_hu,
    slice_range (first, last k).
    """
    hu = np.asarray(hu)
    if hu.shape != np.shape(lesion_instances):
        raise LesionGeometryError(
            f"The CT ({hu.shape}) and the lesion map ({np.shape(lesion_instances)}) differ in size."
        )
    return _measure(hu, lesion_instances, ijk_to_ras)


def _measure(hu, lesion_instances, ijk_to_ras) -> dict[int, dict]:
    inst = _check_instances(lesion_instances)
    m = _check_geometry(ijk_to_ras)
    direction = m[:3, :3]
    voxel_ml = abs(np.linalg.det(direction)) / 1000.0
    plane_axis = _axial_axis(direction)
    results: dict[int, dict] = {}
    for index, box in enumerate(ndimage.find_objects(inst)):
        if box is None:
            continue
        lid = index + 1
        mask = inst[box] == lid
        coords = np.nonzero(mask)
        offset = np.array([s.start for s in box], dtype=np.float64)
        kji_mean = np.array([c.mean() for c in coords]) + offset
        centroid = direction @ kji_mean[::-1] + m[:3, 3]
        if plane_axis is not None:
            long_mm, short_mm = _axes_in_voxel_planes(mask, plane_axis, direction)
        else:
            long_mm, short_mm = _axes_oblique(mask, offset, m)
        count = int(coords[0].size)
        entry = {
            "voxel_count": count,
            "volume_ml": count * voxel_ml,
            "long_axis_mm": long_mm,
            "short_axis_mm": short_mm,
            "centroid_ras": tuple(float(v) for v in centroid),
            "slice_range": (int(box[0].start + coords[0].min()), int(box[0].start + coords[0].max())),
        }
        if hu is not None:
            values = hu[box][mask].astype(np.float64)
            entry["mean_hu"] = float(values.mean())
            entry["std_hu"] = float(values.std())
        results[lid] = entry
    return results


def build_lesion_records(
    hu: np.ndarray,
    lesion_instances: np.ndarray,
    ijk_to_ras,
    type_probabilities: dict[int, dict[str, float]],
) -> list[LesionRecord]:
    """One LesionRecord per lesion id, typed by the most probable of LESION_TYPES, ordered by id."""
    measured = measure_lesions(hu, lesion_instances, ijk_to_ras)
    records = []
    for lid in sorted(measured):
        if lid not in type_probabilities:
            raise ValueError(f"Lesion {lid} has no type probabilities; every lesion must be classified.")
        probs = type_probabilities[lid]
        unknown = set(probs) - set(LESION_TYPES)
        if unknown:
            raise ValueError(
                f"Lesion {lid} has probabilities for unknown types {sorted(unknown)}; "
                f"expected {list(LESION_TYPES)}."
            )
        full = {t: float(probs.get(t, 0.0)) for t in LESION_TYPES}
        lesion_type = max(LESION_TYPES, key=lambda t: full[t])
        v = measured[lid]
        records.append(
            LesionRecord(
                lesion_id=int(lid),
                lesion_type=lesion_type,
                probabilities=full,
                voxel_count=v["voxel_count"],
                volume_ml=float(v["volume_ml"]),
                long_axis_mm=float(v["long_axis_mm"]),
                short_axis_mm=float(v["short_axis_mm"]),
                centroid_ras=v["centroid_ras"],
                mean_hu=v["mean_hu"],
                std_hu=v["std_hu"],
                slice_range=v["slice_range"],
            )
        )
    return records
