"""Is this volume a CT the engine can read? Clear refusals instead of silently wrong results."""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .records import CTVolume


def validate_ct(ct: CTVolume, force: bool = False) -> list[str]:
    """Raise InputError for volumes the engine must refuse; return warnings for the user."""
    v = ct.voxels
    if v.ndim != 3:
        raise InputError(f"{ct.name}: expected a 3D CT volume, got an array of shape {v.shape}.")
    if min(v.shape) < 1 or v.size == 0:
        raise InputError(f"{ct.name}: the volume is empty (shape {v.shape}).")
    m = ct.ijk_to_ras[:3, :3]
    if not np.all(np.isfinite(ct.ijk_to_ras)) or abs(np.linalg.det(m)) < 1e-9:
        raise InputError(f"{ct.name}: the volume geometry (IJK-to-RAS matrix) is degenerate.")
    if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
        bad = int((~np.isfinite(v)).sum())
        raise InputError(f"{ct.name}: {bad} voxel(s) are NaN or infinite; the CT file is damaged.")
    return []
