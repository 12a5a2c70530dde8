"""Is this volume a CT the engine can read? Clear refusals instead of silently wrong results.

``validate_ct`` checks, cheapest first, so that a volume too large for memory is refused before any
pass over its voxels: array structure (2D, 4D, colour), geometry, size, memory budget, voxel values
(NaN/Inf, constant, not Hounsfield units), physical extent and voxel size. Problems that make a run
meaningless are always refused; problems a user may knowingly accept (an image that does not look
like HU, a small field of view, implausible voxel size) are refused unless ``force=True``, and then
come back as warnings that end up in the result's messages.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import InputError
from .preprocessing import ras_bounds
from .records import CTVolume

MIN_VOXELS_PER_AXIS = 3  # the 2.5D networks need neighbouring slices
MIN_FOV_MM = 100.0  # a liver is ~150 mm wide: less than this across cannot hold it
MIN_CRANIOCAUDAL_MM = 30.0
MIN_SPACING_MM = 0.2  # finer than any abdominal CT: the header's unit is probably wrong
THICK_SLICE_MM = 5.0  # above this, warn that small lesions may be missed
AIR_HU = (-1200.0, -800.0)  # every abdominal CT in HU has air (outside the body, lungs, bowel)
MIN_AIR_FRACTION = 5e-4
STATS_SAMPLE_VOXELS = 4_000_000
MEMORY_LIMIT_ENV = "LIVERLESIONAI_MEMORY_LIMIT_GB"
# Peak engine memory per input voxel besides the input itself: masks, instance maps, resampled
# probabilities in the input grid (axis-aligned input); an oblique input is resampled to a canonical
# grid at its finest spacing and mapped back through coordinate arrays.
BYTES_PER_VOXEL_ALIGNED = 16
BYTES_PER_VOXEL_OBLIQUE = 64
BYTES_PER_CANONICAL_VOXEL = 24
FORCE_HINT = "force the run (--force on the command line) if you are sure"


def memory_limit_bytes() -> float:
    """Memory the engine may use: LIVERLESIONAI_MEMORY_LIMIT_GB, else half of this computer's RAM."""
    text = os.environ.get(MEMORY_LIMIT_ENV)
    if text:
        try:
            return float(text) * 1e9
        except ValueError:
            raise InputError(f"{MEMORY_LIMIT_ENV}={text!r} is not a number of gigabytes.") from None
    try:
        import psutil

        return 0.5 * psutil.virtual_memory().total
    except ImportError:
        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimate_memory_bytes(shape_kji, ijk_to_ras, itemsize: int = 2) -> float:
    """Approximate peak memory of a segmentation run on a volume of this size and geometry."""
    from .geometry import axis_alignment

    n = float(np.prod(shape_kji, dtype=np.float64))
    if axis_alignment(ijk_to_ras) is not None:
        return n * (itemsize + BYTES_PER_VOXEL_ALIGNED)
    lo, hi = ras_bounds(shape_kji, ijk_to_ras)
    step = float(np.linalg.norm(np.asarray(ijk_to_ras)[:3, :3], axis=0).min())
    canonical = float(np.prod(np.floor((hi - lo) / step) + 1))
    return n * (itemsize + BYTES_PER_VOXEL_OBLIQUE) + canonical * BYTES_PER_CANONICAL_VOXEL


def extent_mm(shape_kji, ijk_to_ras) -> np.ndarray:
    """Physical size (mm) of the volume along R, A, S: bounding box of its voxels' outer corners."""
    n_ijk = np.asarray(shape_kji, dtype=np.float64)[::-1]
    return np.abs(np.asarray(ijk_to_ras)[:3, :3]) @ n_ijk


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def _mm(values) -> str:
    return " x ".join(f"{v:.3g}" for v in values) + " mm"


def _voxel_size(spacing) -> str:
    """Smallest side first, so the text does not depend on how the volume's axes are stored."""
    return _mm(sorted(spacing))


def _check_structure(ct: CTVolume) -> None:
    v, name = ct.voxels, ct.name
    if v.ndim == 2:
        raise InputError(f"{name}: is a single 2D image ({v.shape[1]} x {v.shape[0]} pixels), not a CT volume. "
                         "Load the whole CT series (a 3D volume).")
    if v.ndim == 4 and v.shape[-1] in (3, 4):
        raise InputError(f"{name}: is a colour (RGB) image with {v.shape[-1]} values per voxel; a CT has one "
                         "value per voxel. Load the original greyscale CT, not a screenshot or rendering.")
    if v.ndim != 3:
        raise InputError(f"{name}: is a {v.ndim}D array of shape {v.shape} (a time series or multi-component "
                         "image); a CT volume is 3D with one value per voxel. Load a single 3D CT series.")
    if v.dtype == bool or not (np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.floating)):
        raise InputError(f"{name}: voxel type {v.dtype} is not a CT intensity (expected integer or "
                         "floating-point Hounsfield units).")
    if v.size == 0:
        raise InputError(f"{name}: the volume is empty (size {' x '.join(map(str, v.shape[::-1]))} voxels).")


def _check_geometry(ct: CTVolume) -> None:
    m = ct.ijk_to_ras[:3, :3]
    if not np.all(np.isfinite(ct.ijk_to_ras)) or abs(np.linalg.det(m)) < 1e-9:
        raise InputError(f"{ct.name}: the volume geometry (IJK-to-RAS matrix) is degenerate: a voxel size is "
                         "zero or not a number. The file header is damaged; re-export the CT.")


def _check_size(ct: CTVolume) -> None:
    ni, nj, nk = ct.shape_ijk
    if min(ni, nj, nk) < MIN_VOXELS_PER_AXIS:
        raise InputError(f"{ct.name}: has only {min(ni, nj, nk)} voxel(s) along one axis (size {ni} x {nj} x {nk} "
                         f"voxels); LiverLesionAI needs a 3D CT series with at least {MIN_VOXELS_PER_AXIS} slices "
                         "covering the liver. Load the whole CT series, not a single slice.")
    check_memory_budget(ct.name, ct.voxels.shape, ct.ijk_to_ras, ct.voxels.dtype.itemsize)


def check_memory_budget(name: str, shape_kji, ijk_to_ras, itemsize: int = 2) -> None:
    """Refuse, with the numbers, a volume whose run would exceed the memory limit.

    Needs only the header (shape, geometry, voxel type): a reader can call it before loading voxels.
    """
    need = estimate_memory_bytes(shape_kji, ijk_to_ras, itemsize)
    limit = memory_limit_bytes()
    if need > limit:
        nk, nj, ni = shape_kji
        raise InputError(f"{name}: too large to process: {ni * nj * nk:,} voxels ({ni} x {nj} x {nk}) need "
                         f"about {_gb(need)} of memory, above the limit of {_gb(limit)}. Crop the CT to the "
                         f"abdomen or resample it to larger voxels (e.g. 1 mm), or raise the limit with "
                         f"{MEMORY_LIMIT_ENV}.")


def _value_range(ct: CTVolume) -> tuple[float, float, float]:
    """(min, max, fraction of air-like voxels); refuses NaN/Inf and constant volumes."""
    v, name = ct.voxels, ct.name
    if np.issubdtype(v.dtype, np.floating):
        finite = np.isfinite(v)
        if not finite.all():
            bad = int(v.size - np.count_nonzero(finite))
            raise InputError(f"{name}: {bad:,} voxel(s) are NaN or infinite (not a number); the CT file is damaged. "
                             "Re-export the CT from the scanner or PACS.")
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        raise InputError(f"{name}: every voxel has the same value ({lo:g}): the volume holds no image. "
                         "Check that the right file was loaded.")
    stride = max(1, int(np.ceil((v.size / STATS_SAMPLE_VOXELS) ** (1 / 3))))
    sample = v[::stride, ::stride, ::stride]
    air = float(np.count_nonzero((sample >= AIR_HU[0]) & (sample <= AIR_HU[1])) / sample.size)
    return lo, hi, air


def _forceable_problems(ct: CTVolume, lo: float, hi: float, air: float) -> list[tuple[str, str]]:
    """(what was seen, what to do) for each problem a user may knowingly accept."""
    problems = []
    spacing = ct.spacing
    if spacing.min() < MIN_SPACING_MM:
        problems.append((f"voxel size {_voxel_size(spacing)} is finer than any abdominal CT (0.5-1 mm in-plane): the "
                         "file header's voxel size is probably wrong (cm instead of mm?)", "Fix the voxel size"))
    size = extent_mm(ct.voxels.shape, ct.ijk_to_ras)
    if min(size[0], size[1]) < MIN_FOV_MM:
        problems.append((f"the field of view is only {_mm(size[:2])} (right-left x front-back), too small for "
                         f"an abdomen (a liver is about 150 mm across; at least {MIN_FOV_MM:g} mm needed)",
                         "Load the full-field abdominal CT, not a crop"))
    elif size[2] < MIN_CRANIOCAUDAL_MM:
        problems.append((f"the volume covers only {size[2]:.3g} mm head-to-feet (at least "
                         f"{MIN_CRANIOCAUDAL_MM:g} mm needed)", "Load the CT series covering the liver"))
    if air < MIN_AIR_FRACTION:  # after the extent: a tight crop inside the body has no air either
        kind = ("raw CT stored values without rescale slope/intercept, or an MR image" if lo >= 0
                else "an MR, PET or processed image")
        problems.append((f"voxel values {lo:g}..{hi:g} with no air near -1000 HU: this looks like {kind}, not a CT "
                         "in Hounsfield units", "Load the CT in HU (DICOM rescale applied)"))
    return problems


def validate_ct(ct: CTVolume, force: bool = False) -> list[str]:
    """Raise InputError for volumes the engine must refuse; return warnings for the user.

    Every message names the volume, says what was seen and what to do.
    """
    _check_structure(ct)
    _check_geometry(ct)
    _check_size(ct)
    lo, hi, air = _value_range(ct)
    problems = _forceable_problems(ct, lo, hi, air)
    if problems and not force:
        seen, advice = problems[0]
        raise InputError(f"{ct.name}: {seen}. {advice}, or {FORCE_HINT}.")
    warnings = [f"Run forced although {seen}; results may be wrong." for seen, _ in problems]
    spacing = ct.spacing
    if spacing.max() > THICK_SLICE_MM:
        warnings.append(f"Voxels are {_voxel_size(spacing)}: with slices thicker than {THICK_SLICE_MM:g} mm, lesions "
                        "smaller than about twice the slice thickness may be missed and measurements are approximate.")
    return warnings
