"""Site-matched phantoms: a reviewed case's appearance measured with known answers, its reading in the phantom
generator's units, and the round trip through the generator (phantoms of a known shifted domain)."""

from __future__ import annotations

import numpy as np
import pytest

from liverlesionai import phantom as ph
from liverlesionai import site_domain
from liverlesionai.phantom import generate_phantom_ct


def _ellipsoid(shape, center, radii):
    k, j, i = np.indices(shape)
    return sum(((a - c) / r) ** 2 for a, c, r in zip((k, j, i), center, radii)) < 1


def test_case_appearance_measures_liver_noise_and_lesion_contrast():
    rng = np.random.default_rng(1)
    shape = (30, 96, 96)  # k, j, i; 0.8 mm in plane, 2.5 mm slices
    liver = _ellipsoid(shape, (15, 48, 48), (13, 40, 40))
    lesions = np.zeros(shape, np.uint16)
    lesions[_ellipsoid(shape, (15, 40, 35), (4, 12, 12))] = 1  # hypodense, 50 HU below the liver
    lesions[_ellipsoid(shape, (15, 60, 65), (3, 8, 8))] = 2  # bright, 40 HU above
    hu = np.full(shape, -100.0) + rng.normal(0, 12, shape)
    hu[liver] = 90 + rng.normal(0, 12, int(liver.sum()))
    hu[lesions == 1] -= 50
    hu[lesions == 2] += 40
    a = site_domain.case_appearance(hu.astype(np.float32), liver, lesions, spacing_mm=(0.8, 0.8, 2.5))
    assert a["liver_hu"] == pytest.approx(90, abs=1.0)
    assert a["noise_hu"] == pytest.approx(12, rel=0.05)
    assert a["lesion_contrasts_hu"] == pytest.approx([-50, 40], abs=2.0)
    tiny_liver = _ellipsoid(shape, (15, 48, 48), (1, 3, 3))
    assert site_domain.case_appearance(hu, tiny_liver, np.zeros(shape, np.uint16), (0.8, 0.8, 2.5)) is None


def test_domain_estimate_reads_the_site_through_the_reference_phantoms():
    # the reference phantoms read 2 HU below their drawn liver HU and 0.8 of their noise
    reference = [({"liver_hu": 100.0, "noise_hu": 8.0, "lesion_contrasts_hu": [-40.0, 40.0]},
                  {"liver_hu": 102.0, "noise_hu": 10.0}),
                 ({"liver_hu": 120.0, "noise_hu": 16.0, "lesion_contrasts_hu": [-40.0]},
                  {"liver_hu": 122.0, "noise_hu": 20.0})]
    site = [{"liver_hu": 70.0, "noise_hu": 20.0, "lesion_contrasts_hu": [-20.0]},
            {"liver_hu": 76.0, "noise_hu": 24.0, "lesion_contrasts_hu": [20.0, -20.0]}, None]
    domain = site_domain.estimate_domain(site, reference)
    assert domain == {"liver_hu": [67.0, 83.0], "noise_hu": [22.5, 33.0], "lesion_contrast_scale": 0.5}
    loud = [{"liver_hu": 70.0, "noise_hu": 20.0, "lesion_contrasts_hu": [-400.0]}]
    assert site_domain.estimate_domain(loud, reference)["lesion_contrast_scale"] == site_domain.CONTRAST_SCALE_RANGE[1]
    no_lesion = [{"liver_hu": 70.0, "noise_hu": 20.0, "lesion_contrasts_hu": []}]
    assert "lesion_contrast_scale" not in site_domain.estimate_domain(no_lesion, reference)  # the generator's own
    assert site_domain.estimate_domain([None], reference) is None
    assert site_domain.estimate_domain(site, []) is None


def test_phantoms_of_a_shifted_domain_are_read_back_in_the_generators_units():
    shift = {"liver_hu": [60, 70], "noise_hu": [28, 32], "lesion_contrast_scale": 0.5}

    def appearance(seed, domain=None):
        ct, truth = generate_phantom_ct(seed, max_in_plane=128, domain=domain)
        return site_domain.case_appearance(ct.voxels, truth.liver_mask, truth.lesion_instances, ct.spacing)

    reference = []
    for seed in (500_000, 500_003, 500_008, 500_010):  # default-domain phantoms with lesions
        drawn = ph.make_phantom(seed)
        reference.append((appearance(seed), {"liver_hu": drawn.liver_hu, "noise_hu": drawn.noise_hu}))
    domain = site_domain.estimate_domain([appearance(seed, shift) for seed in (2_000_001, 2_000_003)], reference)
    assert 55 <= domain["liver_hu"][0] and domain["liver_hu"][1] <= 80  # drawn 60-70, widened by 5 HU
    assert 24 <= domain["noise_hu"][0] and domain["noise_hu"][1] <= 38  # drawn 28-32, widened by 10 %
    assert 0.25 <= domain["lesion_contrast_scale"] <= 0.8  # drawn 0.5; the default domain's is 1
