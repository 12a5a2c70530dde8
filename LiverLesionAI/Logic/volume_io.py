"""Reading CT volumes and writing image volumes, with exact geometry.

This is the one place where SimpleITK's LPS geometry (origin, spacing, direction) is converted to
and from the 4x4 IJK-to-RAS matrix used everywhere else (RAS = LPS with x and y negated). Arrays
are [k, j, i], as ``sitk.GetArrayFromImage`` and ``slicer.util.arrayFromVolume`` give them.

Files are written atomically: to a hidden temporary file in the target folder, then renamed.
"""

from __future__ import annotations

import gzip
import os
import secrets
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError
from .records import CTVolume

# Longest first, so that ".nii.gz" wins over ".gz".
_KNOWN_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd")
READABLE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Single-file formats only: a header/data pair (.nhdr, .mhd) cannot be replaced atomically.
WRITABLE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


def split_extension(path: str | os.PathLike) -> tuple[str, str]:
    """('image', '.nii.gz') for 'dir/image.nii.gz'; unknown extensions split at the last dot."""
    name = Path(path).name
    lower = name.lower()
    for ext in _KNOWN_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if stem else (name, "")


# --------------------------------------------------------------------------- geometry


def sitk_from_array(voxels: np.ndarray, ijk_to_ras: np.ndarray) -> sitk.Image:
    """A SimpleITK image holding ``voxels`` ([k, j, i]) at the position given by ``ijk_to_ras``."""
    voxels = np.asarray(voxels)
    if voxels.ndim != 3:
        raise ValueError(f"voxels must be a 3D [k, j, i] array, got shape {voxels.shape}")
    if voxels.dtype == bool:
        voxels = voxels.astype(np.uint8)
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError("ijk_to_ras must be a finite 4x4 matrix")
    axes = matrix[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"ijk_to_ras has a zero voxel size (spacing {spacing.tolist()})")
    direction = axes / spacing
    if np.max(np.abs(direction.T @ direction - np.eye(3))) > 1e-4:
        # ITK images and NIfTI/NRRD readers in Slicer assume perpendicular voxel axes.
        raise ValueError("ijk_to_ras has sheared (non-perpendicular) voxel axes; cannot be stored as an image")
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels), isVector=False)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (_LPS_TO_RAS @ direction).ravel()])
    image.SetOrigin([float(v) for v in _LPS_TO_RAS @ matrix[:3, 3]])
    return image


def array_from_sitk(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(voxels [k, j, i], 4x4 ijk_to_ras) of a 3D single-component SimpleITK image."""
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("expected one value per voxel")
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = _LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=np.float64)
    return sitk.GetArrayFromImage(image), matrix


# --------------------------------------------------------------------------- reading


def read_ct(path: str | os.PathLike, series_uid: str | None = None) -> CTVolume:
    """Read a CT from a NIfTI/NRRD/MetaImage file or a folder holding a DICOM series.

    Values are as stored after DICOM rescale slope/intercept (Hounsfield units for CT). No check
    that the data is a plausible CT is done here (the engine validates); only what is needed to
    return a 3D single-value array is enforced. Raises InputError with the file name and problem.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    non_finite = None
    if path.is_dir():
        image = _read_dicom_series(path, series_uid)
        name = path.resolve().name
    else:
        stem, ext = split_extension(path)
        if ext.lower() not in READABLE_EXTENSIONS:
            raise InputError(
                f"{path}: unsupported file type '{ext or path.name}'. Use NIfTI (.nii, .nii.gz), NRRD "
                f"(.nrrd, .nhdr), MetaImage (.mha, .mhd) or a folder with a DICOM series."
            )
        if ext.lower() in (".nii", ".nii.gz"):
            non_finite = _check_nifti_complete(path)  # ITK zero-fills a truncated NIfTI and NaN voxels
        try:
            _check_size_before_reading(path, stem)
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise InputError(f"{path}: cannot be read; the file is damaged, truncated or not an image "
                             f"({_first_line(exc)}).") from exc
        name = stem
    image = _as_3d(image, path)
    voxels, ijk_to_ras = array_from_sitk(image)
    if non_finite is not None and non_finite.shape == voxels.shape:
        voxels = voxels.astype(np.float32)
        voxels[non_finite] = np.nan  # keep the damage visible: validation refuses it with a count
    return CTVolume(voxels=voxels, ijk_to_ras=ijk_to_ras, name=name)


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _check_size_before_reading(path: Path, name: str) -> None:
    """Refuse a volume beyond the memory budget from its header, before its voxels are loaded."""
    from .validation import check_memory_budget

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = list(reader.GetSize())[:3] + [1] * (3 - min(3, reader.GetDimension()))
    spacing = list(reader.GetSpacing())[:3] + [1.0] * (3 - min(3, reader.GetDimension()))
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    itemsize = next((n // 8 for n in (64, 32, 16, 8) if pixel.startswith(f"{n}-bit")), 2)
    check_memory_budget(name, tuple(size[::-1]), np.diag([*spacing, 1.0]), itemsize)


def _check_nifti_complete(path: Path):
    """Raise InputError if the NIfTI-1/2 file holds fewer bytes than its header announces.

    For float data, return the mask [k, j, i] of NaN/Inf voxels (ITK reads them as 0), else None.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            content = f.read()
        header, total = content[:540], len(content)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: cannot be read; the file is damaged or truncated ({exc}).") from exc
    for order in "<>":
        sizeof_header = struct.unpack(order + "i", header[:4])[0] if len(header) >= 4 else 0
        if sizeof_header == 348 and len(header) >= 348:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype = struct.unpack(order + "h", header[70:72])[0]
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            data_offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if sizeof_header == 540 and len(header) >= 540:
            datatype = struct.unpack(order + "h", header[12:14])[0]
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            data_offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        raise InputError(f"{path}: is not a NIfTI file (no valid NIfTI header).")
    if not 1 <= dims[0] <= 7:
        raise InputError(f"{path}: the NIfTI header is damaged (dimension count {dims[0]}).")
    expected = max(data_offset, 348) + int(np.prod([max(d, 1) for d in dims[1:dims[0] + 1]], dtype=np.int64)) * bitpix // 8
    if total < expected:
        raise InputError(f"{path}: the file is truncated ({total} of {expected} bytes); it cannot be used.")
    if datatype not in _NIFTI_FLOAT_TYPES:
        return None
    shape = [max(d, 1) for d in dims[1:dims[0] + 1]][::-1]
    offset = max(data_offset, 348 if sizeof_header == 348 else 540)
    data = np.frombuffer(content, dtype=order + _NIFTI_FLOAT_TYPES[datatype], count=int(np.prod(shape)),
                         offset=offset)
    non_finite = ~np.isfinite(data)
    return non_finite.reshape(shape[-3:] if len(shape) >= 3 else shape) if non_finite.any() else None


def _as_3d(image: sitk.Image, path: Path) -> sitk.Image:
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputError(f"{path}: has {components} values per voxel (a colour or vector image); "
                         f"a CT has one value per voxel.")
    dim = image.GetDimension()
    if dim == 3:
        return image
    if dim == 2:
        # One slice: keep it (k = 1) so that the engine's validation can say what is wrong.
        return sitk.JoinSeries([image])
    if dim == 4 and image.GetSize()[3] == 1:
        return sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
    raise InputError(f"{path}: is a {dim}D image of size {image.GetSize()}; a CT volume is 3D.")


def _read_dicom_series(folder: Path, series_uid: str | None) -> sitk.Image:
    series_ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ())
    if not series_ids:
        raise InputError(f"{folder}: the folder contains no readable DICOM series.")
    if series_uid is None and len(series_ids) > 1:
        lines = []
        for uid in series_ids:
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
            lines.append(f"  {uid}  '{_series_description(files[0])}'  {len(files)} slices")
        raise InputError(f"{folder}: the folder holds {len(series_ids)} DICOM series; choose one by its "
                         f"series UID:\n" + "\n".join(lines))
    uid = series_uid if series_uid is not None else series_ids[0]
    if uid not in series_ids:
        raise InputError(f"{folder}: no DICOM series with UID {uid}; found: {', '.join(series_ids)}.")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: DICOM series {uid} cannot be read ({_first_line(exc)}).") from exc


def _series_description(dicom_file: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(dicom_file)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return "?"
    key = "0008|103e"
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with a file/line location; the last line says what went wrong.
    return lines[-1] if lines else type(exc).__name__


# --------------------------------------------------------------------------- writing


def write_file_atomically(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = False) -> Path:
    """Call ``write(temp_path)`` then move the result to ``path`` in one step.

    The temporary file lies in the same folder and keeps the extension (writers such as SimpleITK
    choose the format by it), e.g. ``.image.tmp-1a2b3c4d.nii.gz``. Nothing is left behind on
    failure. An existing ``path`` is only replaced with ``overwrite=True``.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"Cannot write {path}: the folder {folder} does not exist.")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; it was not overwritten. Choose another name or allow overwriting.")
    stem, ext = split_extension(path)
    temp = folder / f".{stem}.tmp-{secrets.token_hex(4)}{ext}"
    try:
        try:
            write(str(temp))
        except (OSError, RuntimeError) as exc:
            raise OutputError(f"Cannot write {path}: {_first_line(exc)}") from exc
        if not temp.is_file():
            raise OutputError(f"Cannot write {path}: the writer produced no file.")
        if overwrite:
            os.replace(temp, path)
        else:
            _move_without_clobbering(temp, path)
    finally:
        if temp.exists():
            temp.unlink()
    return path


def _move_without_clobbering(temp: Path, path: Path) -> None:
    try:
        os.link(temp, path)  # fails if path appeared since the check: never replaces a user's file
    except FileExistsError as exc:
        raise OutputError(f"{path} already exists; it was not overwritten.") from exc
    except OSError:  # file system without hard links
        if path.exists():
            raise OutputError(f"{path} already exists; it was not overwritten.") from None
        os.replace(temp, path)
    else:
        temp.unlink()


def write_volume(path: str | os.PathLike, voxels: np.ndarray, ijk_to_ras: np.ndarray,
                 overwrite: bool = False) -> Path:
    """Write a [k, j, i] array as NIfTI (.nii, .nii.gz), NRRD (.nrrd) or MetaImage (.mha).

    NRRD and MetaImage are gzip-compressed. Raises OutputError if the file exists (unless
    ``overwrite``) or cannot be written; ValueError for an unsupported extension or bad geometry.
    """
    _, ext = split_extension(path)
    if ext.lower() not in WRITABLE_EXTENSIONS:
        raise ValueError(f"{path}: cannot write '{ext}' files; use one of {', '.join(WRITABLE_EXTENSIONS)}")
    image = sitk_from_array(voxels, ijk_to_ras)
    return write_file_atomically(path, lambda temp: sitk.WriteImage(image, temp, useCompression=True), overwrite)
