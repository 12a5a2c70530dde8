"""Benchmark inputs: the real 512x512x129 CT and a generated 512x512x600 phantom (cached, never committed)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL_CT = REPO.parent / "shared/data/ircadb-01/case_01/image.nii.gz"
PHANTOM_SEED = 101
PHANTOM_SLICES = 600
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "liverlesionai-bench"


def phantom_grid(seed=PHANTOM_SEED, slices=PHANTOM_SLICES, in_plane=512):
    """A thin-slice chest-abdomen-pelvis style grid covering the whole phantom body."""
    from liverlesionai.phantom import Grid, make_phantom

    phantom = make_phantom(seed)
    lo, hi = phantom.extent_min, phantom.extent_max
    pixel = float(max(hi[0] - lo[0], hi[1] - lo[1])) / (in_plane - 1)
    thickness = float(hi[2] - lo[2] + 20.0) / (slices - 1)
    center = (lo + hi) / 2
    origin = np.array([center[0] + pixel * (in_plane - 1) / 2, center[1] + pixel * (in_plane - 1) / 2,
                       lo[2] - 10.0])
    return Grid(origin, np.array([pixel, pixel, thickness]), (slices, in_plane, in_plane))


def phantom_ct_path(cache_dir=DEFAULT_CACHE, seed=PHANTOM_SEED, slices=PHANTOM_SLICES) -> Path:
    """NIfTI of the big phantom, rendered once (a minute or two) and cached outside the repository."""
    from liverlesionai.phantom import generate_phantom_ct
    from liverlesionai.volume_io import write_volume

    cache_dir = Path(cache_dir)
    path = cache_dir / f"phantom_{seed}_{slices}.nii.gz"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    ct, _ = generate_phantom_ct(seed, grid=phantom_grid(seed, slices))
    write_volume(path, ct.voxels, ct.ijk_to_ras)  # atomic: temp name, then rename
    return path


def inputs(cache_dir=DEFAULT_CACHE, small=False):
    """{name: path} of the benchmark volumes (``small``: a 128-slice phantom for smoke runs)."""
    if small:
        return {"phantom_512x512x128": phantom_ct_path(cache_dir, slices=128)}
    found = {}
    if REAL_CT.exists():
        found["ircadb01_512x512x129"] = REAL_CT
    found[f"phantom_512x512x{PHANTOM_SLICES}"] = phantom_ct_path(cache_dir)
    return found


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    for name, p in inputs().items():
        print(name, p)
