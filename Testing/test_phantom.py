"""Phantom generator invariants: reproducible, anatomically plausible, lesion signatures per type."""

import numpy as np
import pytest
from scipy import ndimage

from liverlesionai import phantom as ph
from liverlesionai.records import LESION_TYPES


@pytest.fixture(scope="module")
def small_case():
    return ph.generate_phantom_ct(11, max_in_plane=160)


def test_same_seed_same_phantom(small_case):
    ct2, truth2 = ph.generate_phantom_ct(11, max_in_plane=160)
    ct, truth = small_case
    assert np.array_equal(ct.voxels, ct2.voxels)
    assert np.array_equal(truth.lesion_instances, truth2.lesion_instances)
    assert np.allclose(ct.ijk_to_ras, ct2.ijk_to_ras)


def test_different_seeds_differ():
    a, b = ph.make_phantom(1), ph.make_phantom(2)
    assert a.liver_hu != b.liver_hu
    assert not np.allclose(a.liver_blobs[0].center, b.liver_blobs[0].center)


def test_hounsfield_ranges(small_case):
    ct, truth = small_case
    assert ct.voxels.dtype == np.int16
    assert ct.voxels.min() <= -950  # air outside the body
    liver_hu = np.median(ct.voxels[(truth.liver_mask > 0) & (truth.lesion_instances == 0)])
    assert 70 <= liver_hu <= 145
    assert (ct.voxels > 300).sum() > 0  # bone


def test_liver_volume_range():
    volumes = [ph.make_phantom(seed).liver_volume_ml for seed in range(12)]
    assert min(volumes) > 900 and max(volumes) < 2700
    assert max(volumes) - min(volumes) > 400  # varied


def test_lesions_inside_liver_and_counts():
    counts, diameters = [], []
    for seed in range(25):
        phantom = ph.make_phantom(seed)
        counts.append(len(phantom.lesions))
        for lesion in phantom.lesions:
            diameters.append(2 * lesion.blob.axes.mean())
            assert lesion.lesion_type in LESION_TYPES
    assert max(counts) <= 15 and min(counts) == 0
    assert min(diameters) < 6 and max(diameters) > 50
    assert np.mean(np.array(diameters) < 20) > 0.3  # many small lesions


def test_ground_truth_consistency(small_case):
    ct, truth = small_case
    assert truth.liver_mask.shape == truth.lesion_instances.shape == ct.voxels.shape
    lesion = truth.lesion_instances > 0
    assert np.all(truth.liver_mask[lesion] == 1)  # lesions are part of the liver organ mask
    ids = sorted(int(v) for v in np.unique(truth.lesion_instances) if v)
    assert ids == list(range(1, len(ids) + 1))
    assert set(truth.lesion_types) == set(ids)
    labels = truth.label_map
    for lesion_id, lesion_type in truth.lesion_types.items():
        assert np.all(labels[truth.lesion_instances == lesion_id] == 2 + LESION_TYPES.index(lesion_type))


def _render_lesion(lesion_type, seed, metastasis_look="hypodense"):
    """A phantom with exactly one big lesion of a type, rendered noise-free around it."""
    rng = np.random.default_rng(seed)
    for s in range(seed, seed + 200):
        phantom = ph.make_phantom(s)
        center = ph._liver_points(phantom, rng, 50)
        if len(center):
            break
    lesion = ph._make_lesion(rng, 1, lesion_type, center[0], 30.0, phantom.liver_hu, 180.0, 1.0, metastasis_look)
    phantom.lesions = [lesion]
    grid = ph.Grid(center[0] + np.array([25, 25, -25]), np.ones(3), (51, 51, 51))
    hu, tissue, instances = ph.render(phantom, grid, acquisition=False)
    return phantom, lesion, hu, instances


def test_type_signatures():
    # cyst: water density, homogeneous
    phantom, _, hu, inst = _render_lesion("cyst", 100)
    core = ndimage.binary_erosion(inst == 1, iterations=2)  # away from the partial-volume edge
    values = hu[core]
    assert -5 <= np.median(values) <= 25 and values.std() < 8
    # metastasis: hypodense to the liver
    phantom, lesion, hu, inst = _render_lesion("metastasis", 200)
    assert np.median(hu[inst == 1]) < phantom.liver_hu - 5
    # hemangioma: enhancing (near blood pool) nodules at the periphery
    phantom, lesion, hu, inst = _render_lesion("hemangioma", 300)
    values = hu[inst == 1]
    assert np.percentile(values, 95) > phantom.liver_hu + 20


def test_hypervascular_metastasis_domain():
    # the fine-tuning benchmark's "lesion look" domain: metastases brighter than the liver
    for seed in (400, 401, 402):
        phantom, lesion, hu, inst = _render_lesion("metastasis", seed, metastasis_look="hypervascular")
        core = ndimage.binary_erosion(inst == 1, iterations=3)
        assert np.median(hu[core]) > phantom.liver_hu + 10
    shifted = ph.make_phantom(7, domain={"metastasis_look": "hypervascular"})
    original = ph.make_phantom(7)
    assert len(shifted.lesions) == len(original.lesions)  # same case, another lesion look
    metastases = [lesion for lesion in shifted.lesions if lesion.lesion_type == "metastasis"]
    assert metastases and all(lesion.core_hu > shifted.liver_hu + 15 for lesion in metastases)
    with pytest.raises(ValueError, match="metastasis_look"):
        ph.make_phantom(7, domain={"metastasis_look": "isodense"})


def _wall_contact(phantom, spacing=2.0):
    """Liver voxels face to face with abdominal-wall muscle (outside the wall's inner surface), and
    the largest wall radius reached inside the liver (1 = the muscle's inner surface)."""
    lo, hi = phantom.liver_bbox
    lo, hi = lo - 10, hi + 10
    grid = ph.Grid(np.array([hi[0], hi[1], lo[2]]), np.full(3, spacing),
                   tuple(int(v) for v in np.ceil((hi - lo)[::-1] / spacing) + 1))
    _, tissue, _ = ph.render(phantom, grid, acquisition=False)
    x, y, z = grid.axes()
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    wall_radius = ph.abdominal_wall(phantom).radius(X, Y, Z)
    liver = np.isin(tissue, (ph.LIVER, ph.LIVER_VESSEL))
    wall_muscle = (tissue == ph.MUSCLE) & (wall_radius >= 1)
    touching = liver & ndimage.binary_dilation(wall_muscle)
    return int(touching.sum()), float(wall_radius[liver].max())


def test_liver_lies_against_the_abdominal_wall():
    # real livers press on the diaphragm and wall muscle; a fat plane always between them taught the
    # network to take that muscle for liver on real CT (generator 1.0)
    gaps = {seed: ph.make_phantom(seed).liver_wall_gap for seed in range(40)}
    assert 0.55 <= np.mean([g == 0 for g in gaps.values()]) <= 0.95
    assert all(g == 0 or 0.01 <= g <= 0.03 for g in gaps.values())
    phantom = ph.make_phantom(2)  # a liver large enough to reach the wall
    assert phantom.liver_wall_gap == 0
    touching, reach = _wall_contact(phantom)
    assert touching > 1000 and reach > 0.999
    phantom.liver_wall_gap = 0.02  # the same patient with a fat plane (1-3 mm: under a 2 mm voxel in places)
    touching_with_gap, reach = _wall_contact(phantom)
    assert touching_with_gap < touching / 5 and reach < 0.98 + 1e-6


def test_acquisition_variety():
    rng = np.random.default_rng(0)
    spacings = [ph.acquisition_grid(ph.make_phantom(s), rng).spacing for s in range(30)]
    thickness = [s[2] for s in spacings]
    in_plane = [s[0] for s in spacings]
    assert min(thickness) <= 1.0 and max(thickness) >= 3.0
    assert min(in_plane) < 0.65 and max(in_plane) > 0.85


def test_thick_slices_resampled_onto_a_fine_grid():
    """render_thick_slices: the labels are the shapes on the fine grid itself; between slices the HU is the linear
    interpolation of slices 5 mm apart (bends every 4th slice of a 1.25 mm grid, at one phase), smoother along z
    than a fine render, at the liver's level."""
    phantom = ph.make_phantom(1000003)
    center = np.mean(phantom.liver_bbox, axis=0)
    nk, nj, ni = 40, 64, 64
    grid = ph.Grid(center + 1.25 * np.array([(ni - 1) / 2, (nj - 1) / 2, -(nk - 1) / 2]), np.full(3, 1.25),
                   (nk, nj, ni))
    fine_hu, tissue, instances = ph.render(phantom, grid, np.random.default_rng(1))
    hu, thick_tissue, thick_instances = ph.render_thick_slices(phantom, grid, 5.0, np.random.default_rng(1), 1.0)
    assert hu.shape == grid.shape and hu.dtype == np.float32
    assert np.array_equal(thick_tissue, tissue) and np.array_equal(thick_instances, instances)
    assert instances.any() and (tissue == ph.LIVER).mean() > 0.2

    def bends(volume):  # slices where some column is not linear in k
        return np.abs(np.diff(volume.astype(np.float64), n=2, axis=0)).max(axis=(1, 2)) > 0.01

    assert bends(fine_hu).all()
    thick_bends = bends(hu)
    assert 0.25 <= thick_bends.mean() <= 0.6
    assert np.array_equal(thick_bends[4:], thick_bends[:-4])
    liver = tissue == ph.LIVER
    along_z = liver[1:] & liver[:-1]
    assert np.abs(np.diff(hu, axis=0))[along_z].mean() < 0.6 * np.abs(np.diff(fine_hu, axis=0))[along_z].mean()
    assert abs(hu[liver].mean() - fine_hu[liver].mean()) < 5.0


def test_ground_truth_carries_the_tissue_its_masks_come_from():
    """GroundTruth.tissue (for telling where a model's errors lie): the liver mask is exactly liver, liver vessel
    and lesion tissue, and every lesion voxel is lesion tissue."""
    ct, truth = ph.generate_phantom_ct(3, max_in_plane=96)
    assert truth.tissue.shape == ct.voxels.shape and truth.tissue.dtype == np.uint8
    assert np.array_equal(truth.liver_mask > 0, np.isin(truth.tissue, (ph.LIVER, ph.LIVER_VESSEL, ph.LESION)))
    assert (truth.tissue[truth.lesion_instances > 0] == ph.LESION).all()
    assert {ph.VESSEL, ph.MUSCLE, ph.BONE} <= set(np.unique(truth.tissue).tolist())
