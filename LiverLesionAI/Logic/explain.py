"""Integrated-Gradients explanations of a lesion's type: which of its voxels made stage 2 call it that.

What is explained is stage 2's per-pixel typing, the joint network's classification: the mean
probability, over the lesion's voxels, of the lesion's type (``score``). It is one of the two kinds of
evidence the lesion classifier fuses (the other, patch descriptors, is not differentiable: it holds
percentiles and thresholds).

Integrated Gradients (Sundararajan et al., 2017) attributes ``score(CT) - score(baseline)`` to the input
voxels: attribution = (x - x') times the gradient averaged along the straight path from the baseline x'
to x. The baseline is the same CT with this lesion and a thin band around it replaced by the median of
the liver around it: "this liver without the lesion". So the map is confined to the lesion and its band
and says which parts of it (rim, nodules, centre) carry the type; an air or zero baseline would spread
it over every organ edge in view. Attributions sum to ``score - baseline_score`` up to the path
integral's discretisation, ``completeness_gap``, which is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .engine import LiverLesionEngine
from .errors import InputError
from .geometry import canonicalize, resample_separable
from .networks import STAGE2_FIRST_LESION
from .phantom import Grid
from .preprocessing import to_view
from .records import LESION_TYPES, CTVolume, SegmentationResult

DEFAULT_STEPS = 8  # path steps to start with; doubled (up to MAX_STEPS) while the attributions do not add up
MAX_STEPS = 64
GAP_TOLERANCE = 0.05  # of score - baseline_score
GAP_FLOOR = 0.002  # probability: below this a gap is noise, whatever the difference
BAND_MM = 2.5  # around the lesion, also replaced in the baseline: its rim and partial-volume edge
PARENCHYMA_RING_MM = 5.0  # liver around the band whose median HU fills the baseline
CONTEXT_MM = 60.0  # around the band: the lesion score is then within 0.005 of the whole slices' (real case, 4 lesions)
SLICES_PER_BATCH = 8
METHOD = {  # written with every explanation
    "name": "Integrated Gradients",
    "explains": "stage 2's mean probability of the lesion's type over the lesion's voxels (per-pixel typing)",
    "baseline": f"the CT with the lesion and a {BAND_MM} mm band replaced by the median of the liver around it",
    "attribution": "per voxel of stage 2's grid (crop), in probability; the sum is score - baseline_score, up to "
                   "completeness_gap",
}


@dataclass
class LesionExplanation:
    lesion_id: int
    lesion_type: str  # the type explained (the engine's for its lesions; the reviewer's for a given mask)
    attribution: np.ndarray  # [k, j, i] float32 on a canonical crop of stage 2's grid, probability per voxel
    ijk_to_ras: np.ndarray  # of ``attribution``
    lesion_mask: np.ndarray  # [k, j, i] bool on the same crop: the lesion as stage 2's grid holds it
    image: np.ndarray  # stage 2's normalised input on the crop
    baseline: np.ndarray  # the same with the lesion and its band replaced by the surrounding liver
    liver_prior: np.ndarray  # stage 1's liver probability on the crop (stage 2's last input channel)
    score: float  # mean stage-2 probability of ``lesion_type`` over the lesion's voxels, on the CT
    baseline_score: float  # the same with the lesion replaced by the surrounding liver
    completeness_gap: float  # sum(attribution) - (score - baseline_score)
    steps: int  # of the path integral, after refinement

    @property
    def relative_gap(self) -> float:
        return abs(self.completeness_gap) / max(abs(self.score - self.baseline_score), 1e-6)

    @property
    def inside_share(self) -> float:
        """Share of the positive attribution inside the lesion mask (the rest lies in the band around it)."""
        positive = np.clip(self.attribution, 0, None)
        return float(positive[self.lesion_mask].sum() / max(positive.sum(), 1e-12))

    def summary(self) -> dict:
        return {"lesion_id": self.lesion_id, "lesion_type": self.lesion_type, "score": round(self.score, 4),
                "baseline_score": round(self.baseline_score, 4),
                "attribution_sum": round(float(self.attribution.sum()), 4),
                "completeness_gap": round(self.completeness_gap, 4), "inside_share": round(self.inside_share, 3),
                "steps": self.steps}


def explain_lesions(engine: LiverLesionEngine, ct: CTVolume, lesion_ids=None, steps: int = DEFAULT_STEPS,
                    force: bool = False, progress=None) -> tuple[SegmentationResult, list[LesionExplanation]]:
    """Segment ``ct`` and explain the type the engine gave each lesion in ``lesion_ids`` (default: all), on
    the stage-2 grid of that run."""
    progress = progress or (lambda fraction, message: None)
    outputs = engine.run_networks(ct, lambda f, m: progress(0.3 * f, m), force)
    if isinstance(outputs, SegmentationResult):  # no liver: nothing to explain
        return outputs, []
    result = engine.lesions_from(outputs)
    records = {r.lesion_id: r for r in result.lesions}
    wanted = sorted(records) if lesion_ids is None else [int(i) for i in lesion_ids]
    unknown = [i for i in wanted if i not in records]
    if unknown:
        raise InputError(f"No lesion {', '.join(map(str, unknown))} in this CT's result "
                         f"(lesions found: {', '.join(map(str, sorted(records))) or 'none'}).")
    canon = outputs.canon
    instances2 = resample_separable(canonicalize(result.lesion_instances, ct.ijk_to_ras).array, canon.grid,
                                    outputs.grid2, 0, cval=0, dtype=np.uint16)
    expert = engine.experts[outputs.expert]
    explanations = []
    for n, lesion_id in enumerate(wanted):
        progress(0.3 + 0.7 * n / len(wanted), f"Explaining lesion {lesion_id}")
        mask2 = instances2 == lesion_id
        if not mask2.any():  # a lesion thinner than a stage-2 voxel after resampling
            mask2 = _nearest_voxel_mask(instances2.shape, records[lesion_id].centroid_ras, outputs.grid2)
        lesion_type = records[lesion_id].lesion_type
        explanations.append(integrated_gradients(expert.stage2, outputs.hu2, outputs.prior2, mask2,
                                                 outputs.grid2, lesion_type, engine.config.stage2_views,
                                                 engine.device, steps, lesion_id))
    progress(1.0, f"Explained {len(explanations)} lesion(s)")
    return result, explanations


def explain_lesion(engine: LiverLesionEngine, ct: CTVolume, lesion_mask: np.ndarray, lesion_type: str,
                   lesion_id: int = 1, steps: int = DEFAULT_STEPS) -> LesionExplanation:
    """Explain ``lesion_type`` for one lesion given as a mask in the CT's voxel grid (e.g. a reviewed segment)."""
    grid2, hu2, prior2, mask2, expert = engine.lesion_inputs(ct, np.asarray(lesion_mask) > 0)
    return integrated_gradients(engine.experts[expert].stage2, hu2, prior2, mask2, grid2, lesion_type,
                                engine.config.stage2_views, engine.device, steps, lesion_id)


def _nearest_voxel_mask(shape, ras, grid: Grid):
    ijk = np.linalg.inv(grid.ijk_to_ras) @ np.r_[np.asarray(ras, float), 1.0]
    k, j, i = (int(np.clip(round(v), 0, n - 1)) for v, n in zip(ijk[2::-1], shape))
    mask = np.zeros(shape, bool)
    mask[k, j, i] = True
    return mask


def _crop(band, shape, spacing_mm, divisor):
    """Index slices around ``band`` with CONTEXT_MM of context, each a multiple of ``divisor`` long where
    the volume allows (so stage 2 runs on it unpadded, in every view)."""
    boxes = ndimage.find_objects(band.astype(np.uint8))[0]
    out = []
    for axis, (box, n) in enumerate(zip(boxes, shape)):
        margin = int(np.ceil(CONTEXT_MM / spacing_mm[2 - axis]))
        lo, hi = max(box.start - margin, 0), min(box.stop + margin, n)
        length = min(-(-(hi - lo) // divisor) * divisor, n)
        lo = min(lo, n - length)
        out.append(slice(lo, lo + length))
    return tuple(out)


def integrated_gradients(stage2, hu2, prior2, mask2, grid2: Grid, lesion_type: str, views, device,
                         steps: int = DEFAULT_STEPS, lesion_id: int = 1, max_steps: int = MAX_STEPS) -> LesionExplanation:
    """Integrated Gradients of stage 2's mean ``lesion_type`` probability over ``mask2`` (module docstring).

    ``hu2``/``prior2``: stage 2's normalised input and liver prior on ``grid2``; ``views``: the slab
    orientations whose probabilities the engine averages."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    spacing = np.asarray(grid2.spacing, float)
    band = ndimage.binary_dilation(mask2, iterations=max(1, int(round(BAND_MM / spacing[0]))))
    ring = ndimage.binary_dilation(band, iterations=max(1, int(round(PARENCHYMA_RING_MM / spacing[0])))) & ~band
    parenchyma = ring & (prior2 > 0.5)
    fill = float(np.median(hu2[parenchyma if parenchyma.any() else ring]))
    box = _crop(band, hu2.shape, spacing, 2 ** (len(stage2.config.features) - 1))
    image = np.ascontiguousarray(hu2[box], np.float32)
    lesion, prior = mask2[box], np.ascontiguousarray(prior2[box], np.float32)
    baseline = np.where(band[box], np.float32(fill), image)

    score = ScoreFunction(stage2, prior, lesion, lesion_type, views, device)
    image_t, baseline_t = torch.from_numpy(image).to(device), torch.from_numpy(baseline).to(device)
    with torch.inference_mode(False):
        on_image, on_baseline = score(image_t), score(baseline_t)
        while True:  # the path integral, refined until it adds up (completeness)
            path_gradient = torch.zeros_like(image_t)
            for alpha in (np.arange(steps) + 0.5) / steps:  # midpoint rule
                path_gradient += score.gradient(baseline_t + float(alpha) * (image_t - baseline_t))
            attribution = ((image_t - baseline_t) * path_gradient / steps).cpu().numpy().astype(np.float32)
            gap = float(attribution.sum()) - (on_image - on_baseline)
            if abs(gap) <= max(GAP_TOLERANCE * abs(on_image - on_baseline), GAP_FLOOR) or steps >= max_steps:
                break
            steps *= 2

    x_axis, y_axis, z_axis = grid2.axes()
    crop_grid = Grid(np.array([x_axis[box[2].start], y_axis[box[1].start], z_axis[box[0].start]]), grid2.spacing,
                     image.shape)
    return LesionExplanation(int(lesion_id), lesion_type, attribution, crop_grid.ijk_to_ras, lesion, image, baseline,
                             prior, on_image, on_baseline, gap, steps)


class ScoreFunction:
    """What is explained: stage 2's mean ``lesion_type`` probability over the lesion's voxels, views averaged
    as the engine averages them, as a function of the normalised CT crop (liver prior and lesion fixed)."""

    def __init__(self, stage2, prior, lesion, lesion_type, views, device):
        if lesion_type not in LESION_TYPES:
            raise ValueError(f"unknown lesion type {lesion_type!r}; expected one of {LESION_TYPES}")
        if not np.any(lesion):
            raise ValueError("the lesion mask is empty")
        self.stage2, self.views, self.device = stage2, tuple(views), device
        self.prior = torch.as_tensor(np.asarray(prior, np.float32), device=device)
        self.lesion = torch.as_tensor(np.asarray(lesion, bool), device=device)
        self.channel = STAGE2_FIRST_LESION + LESION_TYPES.index(lesion_type)
        self.half = (stage2.config.in_channels - 1) // 2
        self.weight = 1.0 / (float(self.lesion.sum()) * len(self.views))

    def __call__(self, volume) -> float:
        with torch.no_grad():
            return sum(float(part) for part in self._parts(torch.as_tensor(volume, device=self.device)))

    def gradient(self, volume) -> torch.Tensor:
        volume = torch.as_tensor(volume, device=self.device).detach().requires_grad_(True)
        gradient = torch.zeros_like(volume)
        for part in self._parts(volume):  # slab batch by slab batch: memory bounded by the batch
            gradient += torch.autograd.grad(part, volume)[0]
        return gradient

    def _parts(self, volume):
        half = self.half
        for view in self.views:
            v, p, m = to_view(volume, view), to_view(self.prior, view), to_view(self.lesion, view)
            slices = torch.nonzero(m.flatten(1).any(1)).flatten().tolist()
            # edge-padded along the slab axis, as the engine's slabs are
            padded = torch.cat([v[:1].expand(half, *v.shape[1:]), v, v[-1:].expand(half, *v.shape[1:])])
            for start in range(0, len(slices), SLICES_PER_BATCH):
                ks = slices[start:start + SLICES_PER_BATCH]
                slabs = torch.stack([torch.cat([padded[k:k + 2 * half + 1], p[k:k + 1]]) for k in ks])
                probability = self.stage2(slabs).float().softmax(1)[:, self.channel]
                yield (probability * m[ks]).sum() * self.weight
