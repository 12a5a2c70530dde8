"""Site-matched phantoms: the phantom generator's domain (phantom.make_phantom) that looks like a site's CTs.

Four or five exported cases are too few to teach a site expert (domain_gate) lesions of every size and type,
but they do say how the site's scans look: the liver's HU, the voxel noise and how far lesions stand out
from the liver. Measured inside the reviewed masks and read in the generator's units through phantoms of known
parameters (the original-domain guard phantoms), these give a phantom domain; phantoms drawn from it train,
validate and tune the site expert beside the exported cases. The generator's anatomy and lesion looks stay its
own: what this matches is the acquisition, not the site's patients.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .domain_gate import voxel_noise_hu

INTERIOR_MM = 3.0  # away from the liver's and lesions' edges (partial volume)
MIN_LIVER_VOXELS = 500
MIN_LESION_VOXELS = 30
# how far the estimate may take the generator: beyond this its lesion signatures no longer hold
CONTRAST_SCALE_RANGE = (0.25, 1.5)
NOISE_HU_RANGE = (2.0, 60.0)


def _interior(mask: np.ndarray, spacing_mm: np.ndarray) -> np.ndarray:
    """``mask`` eroded by about INTERIOR_MM in plane and one slice through plane (k, j, i arrays)."""
    in_plane = max(1, int(round(INTERIOR_MM / float(min(spacing_mm[0], spacing_mm[1])))))
    structure = np.zeros((3, 2 * in_plane + 1, 2 * in_plane + 1), bool)
    structure[1] = True
    structure[0, in_plane, in_plane] = structure[2, in_plane, in_plane] = True
    return ndimage.binary_erosion(mask, structure=structure)


def case_appearance(hu: np.ndarray, liver: np.ndarray, lesions: np.ndarray, spacing_mm) -> dict | None:
    """What a reviewed case's masks say about its acquisition: the median HU and voxel noise
    (domain_gate.voxel_noise_hu) of the liver without its lesions, and each lesion's median HU
    minus the liver's. ``hu``, ``liver`` (lesions included or not), ``lesions`` (instance ids) are (k, j, i)
    arrays; ``spacing_mm`` along i, j, k. None when too little liver to measure."""
    spacing_mm = np.asarray(spacing_mm, float)
    near_lesion = ndimage.binary_dilation(lesions > 0, iterations=2)
    parenchyma = _interior(liver.astype(bool) & ~near_lesion, spacing_mm)
    if parenchyma.sum() < MIN_LIVER_VOXELS:
        return None
    hu = hu.astype(np.float32, copy=False)
    liver_hu = float(np.median(hu[parenchyma]))
    contrasts = []
    for lesion_id, box in enumerate(ndimage.find_objects(lesions), start=1):
        if box is None:
            continue
        inside = lesions[box] == lesion_id
        core = ndimage.binary_erosion(inside)
        values = hu[box][core if core.sum() >= MIN_LESION_VOXELS else inside]
        if len(values) >= MIN_LESION_VOXELS:
            contrasts.append(float(np.median(values)) - liver_hu)
    return {"liver_hu": liver_hu, "noise_hu": voxel_noise_hu(hu, parenchyma), "lesion_contrasts_hu": contrasts}


def estimate_domain(site: list[dict], reference: list[tuple[dict, dict]]) -> dict | None:
    """The phantom domain (make_phantom's ``liver_hu``, ``noise_hu``, ``lesion_contrast_scale``) of the site
    cases' appearances (``case_appearance``), read through ``reference``: (appearance, the generator's
    parameters {"liver_hu", "noise_hu"}) pairs of phantoms of the default domain (lesion contrast scale 1).
    None without a measurable site case or reference phantom."""
    site = [s for s in site if s]
    reference = [(a, p) for a, p in reference if a]
    if not site or not reference:
        return None
    # the measurement reads a little off the generator's parameters (texture, blur, vessels): the reference
    # phantoms give the offset of the liver HU and the ratio of the noise
    hu_offset = float(np.median([p["liver_hu"] - a["liver_hu"] for a, p in reference]))
    noise_ratio = float(np.median([p["noise_hu"] / max(a["noise_hu"], 1e-3) for a, p in reference]))
    liver_hu = [s["liver_hu"] + hu_offset for s in site]
    noise_hu = np.clip([s["noise_hu"] * noise_ratio for s in site], *NOISE_HU_RANGE)
    domain = {"liver_hu": [round(min(liver_hu) - 5, 1), round(max(liver_hu) + 5, 1)],
              "noise_hu": [round(0.9 * float(noise_hu.min()), 1), round(1.1 * float(noise_hu.max()), 1)]}
    site_contrast = [abs(c) for s in site for c in s["lesion_contrasts_hu"]]
    reference_contrast = [abs(c) for a, _ in reference for c in a["lesion_contrasts_hu"]]
    if site_contrast and reference_contrast:
        scale = float(np.median(site_contrast)) / max(float(np.median(reference_contrast)), 1e-3)
        domain["lesion_contrast_scale"] = round(float(np.clip(scale, *CONTRAST_SCALE_RANGE)), 3)
    return domain
