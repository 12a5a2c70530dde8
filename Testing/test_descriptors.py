"""Lesion view descriptors (the classifier's patch evidence) on shapes with known answers."""

import numpy as np
import pytest
from scipy import ndimage

from liverlesionai.descriptors import DESCRIPTOR_NAMES, lesion_view_descriptors

P = 64


def _disc(radius, centre=(32, 32)):
    yy, xx = np.mgrid[:P, :P]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def _describe(image, mask):
    values = lesion_view_descriptors(image, mask)
    assert values.shape == (len(DESCRIPTOR_NAMES),) and np.isfinite(values).all()
    return dict(zip(DESCRIPTOR_NAMES, values.tolist()))


def test_homogeneous_dark_disc_in_parenchyma():
    mask = _disc(10)
    image = np.where(mask, -0.4, 0.35).astype(np.float32)  # cyst-like water in enhanced liver
    d = _describe(image, mask)
    assert d["mean_minus_ring"] == pytest.approx(-0.75) and d["std"] == pytest.approx(0.0, abs=1e-6)
    assert d["ring_median"] == pytest.approx(0.35) and d["mean"] == pytest.approx(-0.4)
    assert d["fraction_darker"] == 1.0 and d["fraction_brighter"] == 0.0
    for band in range(1, 5):
        assert d[f"band{band}_minus_ring"] == pytest.approx(-0.75)
    assert d["log_area_px"] == pytest.approx(np.log(mask.sum()))
    assert d["max_depth_px"] == pytest.approx(ndimage.distance_transform_edt(mask).max())
    assert d["filled_fraction"] == 1.0


def test_bright_rim_and_dark_centre_are_seen_in_the_radial_bands():
    mask = _disc(14)
    image = np.full((P, P), 0.3, np.float32)
    image[mask] = 0.5  # enhancing rim ...
    image[_disc(8)] = 0.0  # ... around a necrotic centre
    d = _describe(image, mask)
    assert d["band1_minus_ring"] > 0.1 > -0.1 > d["band4_minus_ring"]
    assert d["periphery_p95_minus_ring"] == pytest.approx(0.2)
    assert d["fraction_brighter"] + d["fraction_darker"] == pytest.approx(1.0)


def test_sharp_edges_have_steeper_gradients_than_blurred_ones_and_holes_count():
    mask = _disc(10)
    sharp = np.where(mask, -0.4, 0.35).astype(np.float32)
    blurred = ndimage.gaussian_filter(sharp, 3)
    assert _describe(sharp, mask)["edge_gradient"] > 1.5 * _describe(blurred, mask)["edge_gradient"]
    annulus = mask & ~_disc(4)
    assert _describe(sharp, annulus)["filled_fraction"] == pytest.approx(annulus.sum() / mask.sum())


def test_absent_lesion_is_an_error():
    with pytest.raises(ValueError, match="absent"):
        lesion_view_descriptors(np.zeros((P, P), np.float32), np.zeros((P, P), bool))
