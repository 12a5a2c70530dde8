"""Domain gate: which stage-2 expert of a fine-tuned model sees a CT.

A fine-tuned version keeps its parent's stage 2, classifier head and candidate filter (the *parent* expert)
and adds the ones adapted to the exported cases (the *site* expert). Each CT goes to the expert whose
acquisition it resembles: the liver's median HU (contrast phase) and its voxel noise, measured inside stage 1's
liver before stage 2 runs. Why: stage 2 decides on absolute HU, so a few cases of a site whose liver
enhances where the parent's lesions lie re-teach it at the cost of the parent's own domain (README, fine-tuning
evidence); a gate keeps both. The gate is a two-class diagonal Gaussian fitted on the exported cases and on
original-domain phantoms.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

FEATURES = ("liver_median_hu", "liver_noise_hu")
# spreads never below these: 4-5 exported cases do not estimate a spread, and two scans of one protocol
# still differ by a few HU of enhancement and noise
MIN_SPREAD = {"liver_median_hu": 8.0, "liver_noise_hu": 3.0}
LIVER_EROSION_MM = 5.0  # away from the liver's edge (partial volume with fat and vessels)
MIN_INTERIOR_VOXELS = 500


def acquisition_features(hu: np.ndarray, liver: np.ndarray, spacing_mm: float) -> dict | None:
    """Median HU and noise (HU) of the liver interior; None when too little liver to measure.

    ``hu``: a CT on an isotropic grid (k, j, i), ``liver``: a boolean mask on it. Noise: ``voxel_noise_hu``.
    """
    interior = ndimage.binary_erosion(liver, iterations=max(1, int(round(LIVER_EROSION_MM / spacing_mm))))
    if interior.sum() < MIN_INTERIOR_VOXELS:
        return None
    return {"liver_median_hu": float(np.median(hu[interior])), "liver_noise_hu": voxel_noise_hu(hu, interior)}


def voxel_noise_hu(hu: np.ndarray, region: np.ndarray) -> float:
    """Voxel noise (HU) inside ``region`` of a (k, j, i) CT: the robust spread (median absolute deviation) of
    neighbour differences along i, / sqrt(2), so texture and edges count little."""
    both = region[:, :, 1:] & region[:, :, :-1]
    diffs = (hu[:, :, 1:] - hu[:, :, :-1])[both]
    mad = np.median(np.abs(diffs - np.median(diffs)))
    return float(1.4826 * mad / math.sqrt(2))


def _gaussian(samples: list[dict]) -> dict:
    values = np.array([[s[f] for f in FEATURES] for s in samples], float)
    spread = values.std(0) if len(values) > 1 else np.zeros(len(FEATURES))
    return {"mean": values.mean(0).round(3).tolist(),
            "std": [round(max(float(s), MIN_SPREAD[f]), 3) for s, f in zip(spread, FEATURES)],
            "cases": len(values)}


def fit_gate(site: list[dict], parent: list[dict]) -> dict | None:
    """The gate from the acquisition features of the exported cases (``site``) and of original-domain
    phantoms (``parent``); None when either has no measurable case."""
    site, parent = [s for s in site if s], [s for s in parent if s]
    if not site or not parent:
        return None
    return {"features": list(FEATURES), "site": _gaussian(site), "parent": _gaussian(parent)}


def _log_likelihood(model: dict, x: np.ndarray) -> float:
    mean, std = np.asarray(model["mean"]), np.asarray(model["std"])
    return float(-0.5 * (((x - mean) / std) ** 2).sum() - np.log(std).sum())


def route(gate: dict | None, features: dict | None) -> str:
    """"site" where the CT is likelier under the exported cases' acquisition than the parent domain's, else
    "parent" (also with no gate or nothing measurable: the parent expert is the safe default)."""
    if not gate or not features:
        return "parent"
    x = np.array([features[f] for f in gate["features"]], float)
    return "site" if _log_likelihood(gate["site"], x) > _log_likelihood(gate["parent"], x) else "parent"


def separates(site_routed: list[bool], parent_routed: list[bool]) -> bool:
    """Whether a gate is worth having, from where it sends the cases it was fitted on (True: to the site
    expert): no original-domain case to the site expert, most exported ones to it."""
    return not any(parent_routed) and 2 * sum(site_routed) > len(site_routed)
