"""Intensity and shape descriptors of a lesion in one 2D view (the lesion classifier's patch evidence).

The lesion types differ in how intensity is arranged across the lesion on portal-venous CT: a cyst is
homogeneous and water-dense with a sharp edge, a hemangioma has bright peripheral nodules that fill
inwards, a metastasis is hypodense with a brighter rim, a lobulated margin and a dark necrotic centre.
So each view is summarised by intensity relative to the surrounding parenchyma (a ring around the
lesion), in radial bands from the edge to the deepest point, plus edge sharpness and size.

Measured on 5000 phantom lesions (1000 held out, reference masks): these 26 numbers per view, with the
stage-2 pixel type probabilities, type 0.907 of the held-out lesions; the stage-2 encoder's pooled
features (995 per view) typed 0.808 with the same 4000 training lesions, and both together (with an
earlier 15-descriptor set) 0.854 -- 3000 dimensions over-fit a few thousand lesions.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

RADIAL_BANDS = (0.0, 0.25, 0.5, 0.75, 1.0)  # relative depth: 0 at the edge, 1 at the deepest point
RING_PX = 4  # width of the surrounding-parenchyma ring, pixels
CONTRAST = 0.1  # "clearly brighter/darker than the surroundings", normalised units (30 HU)

DESCRIPTOR_NAMES = (
    "mean_minus_ring", "std",
    "p05_minus_ring", "p25_minus_ring", "p50_minus_ring", "p75_minus_ring", "p95_minus_ring",
    "band1_minus_ring", "band2_minus_ring", "band3_minus_ring", "band4_minus_ring",
    "band1_std", "band2_std", "band3_std", "band4_std",
    "periphery_p95_minus_ring", "fraction_brighter", "fraction_darker",
    "ring_median", "ring_std", "edge_gradient", "edge_gradient_per_contrast",
    "log_area_px", "mean", "max_depth_px", "filled_fraction",
)


def lesion_view_descriptors(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` (P, P) normalised intensity, ``mask`` (P, P) the lesion -> DESCRIPTOR_NAMES values."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise ValueError("the lesion is absent from this view")
    image = np.asarray(image, np.float32)
    inside = image[mask]
    depth = ndimage.distance_transform_edt(mask)
    relative_depth = depth / depth.max()
    ring = ndimage.binary_dilation(mask, iterations=RING_PX) & ~mask
    surroundings = image[ring] if ring.any() else inside
    ring_median = float(np.median(surroundings))
    band_means, band_stds = [], []
    for lo, hi in zip(RADIAL_BANDS[:-1], RADIAL_BANDS[1:]):
        band = mask & (relative_depth <= hi) & ((relative_depth > lo) if lo > 0 else True)
        values = image[band] if band.any() else inside
        band_means.append(values.mean() - ring_median)
        band_stds.append(values.std())
    periphery = mask & (relative_depth <= 0.5)
    gy, gx = np.gradient(image)
    edge = mask & ~ndimage.binary_erosion(mask)
    edge_gradient = float(np.hypot(gy, gx)[edge].mean())
    mean_contrast = inside.mean() - ring_median
    values = [mean_contrast, inside.std(),
              *(np.percentile(inside, q) - ring_median for q in (5, 25, 50, 75, 95)),
              *band_means, *band_stds,
              np.percentile(image[periphery] if periphery.any() else inside, 95) - ring_median,
              (inside > ring_median + CONTRAST).mean(), (inside < ring_median - CONTRAST).mean(),
              ring_median, surroundings.std(), edge_gradient, edge_gradient / (abs(mean_contrast) + 0.02),
              np.log(mask.sum()), inside.mean(), depth.max(),
              mask.sum() / ndimage.binary_fill_holes(mask).sum()]
    return np.asarray(values, np.float32)
