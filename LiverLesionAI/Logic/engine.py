"""Inference: CT volume -> liver mask, lesion instances, typed lesion records (in the input geometry).

Cascade: stage 1 finds the liver on a coarse canonical grid covering the whole scan; stage 2 works
on a fine grid inside the liver box, segmenting liver and lesions and typing every lesion pixel;
each lesion (3D connected component) is then typed by the classifier head from three orthogonal
patches through it (intensity/shape descriptors + stage-2 pixel type probabilities), with a calibrated
temperature. Probabilities are kept only inside the liver box and at float16.

A fine-tuned version may hold two stage-2 experts (stage 2, head, candidate filter): its parent's and the one
fine-tuned for the exported cases' site; its domain gate picks one per CT after stage 1 (domain_gate).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from . import domain_gate
from .errors import InputError, LiverLesionAIError, ModelFileError
from .geometry import canonicalize, grid_bounds, resample_separable, sub_grid
from .lesions import build_lesion_records
from .model_io import load_model
from .networks import STAGE2_FIRST_LESION, CascadeConfig, LesionClassifierHead, UNet2p5D
from .preprocessing import canonical_grid, denormalize_hu, from_view, normalize_hu, pad_to_multiple, to_view
from .records import LESION_TYPES, CTVolume, SegmentationResult
from .training import lesion_view_inputs, lesion_view_vectors, resolve_device
from .validation import validate_ct

MIN_LIVER_ML = 150.0  # below this, stage 1 found no liver worth reporting
MAX_LIVER_ML = 5000.0  # beyond even severe hepatomegaly: stage 1 was fooled (e.g. a water phantom)
MIN_LESION_MM3 = 14.0  # ~3 mm diameter: the smallest lesion the product reports
ROI_MARGIN_MM = 15.0
EDGE_BAND_MM = 2.5  # "near the liver surface" for the lesion candidate filter
GREAT_VESSEL_SURFACE_MM = 3.0  # a great vessel's bright core comes this close to the stage-2 liver's surface

Progress = Callable[[float, str], None]
EXPERT_MESSAGES = {  # shown with the result of a gated model (domain_gate)
    "site": "Fine-tuned networks used: this scan's liver HU and noise resemble those of the cases the model was "
            "fine-tuned on.",
    "parent": "Parent model's networks used: this scan's liver HU and noise differ from those of the cases the "
              "model was fine-tuned on.",
}


def _no_progress(fraction, message):
    pass


def largest_component(mask):
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


PRECISIONS = ("auto", "fp32")


def native_bf16(device: torch.device) -> bool:
    """True where bfloat16 convolutions run natively (not emulated, which would be slower): a CUDA GPU,
    or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return True
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return device.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in probes)


@dataclass
class NetworkOutputs:
    """What the networks made of one CT (``LiverLesionEngine.run_networks``), before any lesion rule."""
    ct: CTVolume
    canon: object  # the CT on its canonical grid (geometry.canonicalize)
    grid2: object  # stage 2's fine grid around the liver
    hu2: np.ndarray  # normalised CT on grid2
    prior2: np.ndarray  # stage 1's liver probability on grid2
    probs2: np.ndarray  # stage-2 class probabilities (classes, K, J, I) float16
    messages: list
    expert: str = "parent"  # the stage-2 expert that ran (domain_gate)


@dataclass
class Expert:
    """Stage 2, classifier head and lesion rule (the config's candidate filter) that run together."""
    stage2: UNet2p5D
    classifier: LesionClassifierHead
    config: CascadeConfig


class LiverLesionEngine:
    """Loads a model once; ``segment`` runs the whole cascade on a CT.

    ``precision``: "auto" runs the segmentation networks under bfloat16 autocast where the hardware
    does it natively (about twice as fast on such CPUs; Dice unchanged, a lesion near the confidence
    threshold may flip: README, Performance), "fp32" never.
    """

    def __init__(self, model=None, device: str = "auto", threads: int | None = None, precision: str = "auto"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.precision = precision
        if threads:
            torch.set_num_threads(int(threads))
        self.device = resolve_device(device)
        if model is None:
            from .registry import ModelRegistry
            model = ModelRegistry().active_model_dir()
        self.model_dir = Path(model)
        state, card = load_model(self.model_dir)
        if "architecture" not in card:
            raise ModelFileError(f"Model card of {self.model_dir} has no architecture; not a LiverLesionAI model.")
        self.card = card
        self.version = str(card.get("version", self.model_dir.name))
        try:
            config = CascadeConfig.from_dict(card["architecture"])
        except (KeyError, TypeError, ValueError) as error:
            raise ModelFileError(f"Model card of {self.model_dir} has an architecture this version cannot build "
                                 f"({error}).") from error
        self.stage1 = UNet2p5D(config.stage1)
        self.experts = {"parent": Expert(UNet2p5D(config.stage2), LesionClassifierHead(config), config)}
        self.gate = card["architecture"].get("domain_gate")
        parts = {"stage1": self.stage1, "stage2": self.stage2, "classifier": self.classifier}
        if self.gate:  # a fine-tuned version with a site expert (domain_gate)
            site = self.add_site_expert(self.gate)
            try:
                site.config.set_candidate_filter(card["architecture"]["site_candidate_filter"])
            except (KeyError, TypeError, ValueError) as error:
                raise ModelFileError(f"Model card of {self.model_dir} has a domain gate but no usable "
                                     f"site_candidate_filter ({error!r}).") from error
            parts.update({"site.stage2": site.stage2, "site.classifier": site.classifier})
        for prefix, net in parts.items():
            sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            try:
                net.load_state_dict(sub)
            except RuntimeError as e:
                raise ModelFileError(f"Model {self.model_dir} does not fit this LiverLesionAI version "
                                     f"({prefix}: {str(e).splitlines()[0]})") from None
            # channels-last weights: oneDNN's faster convolution path (~18% less CPU time, same masks)
            net.to(self.device, memory_format=torch.channels_last).eval()

    # the expert fine-tuning adapts and a model's own lesion rule: the site expert where there is one
    @property
    def adapted(self) -> Expert:
        return self.experts.get("site", self.experts["parent"])

    @property
    def stage2(self) -> UNet2p5D:
        return self.adapted.stage2

    @property
    def classifier(self) -> LesionClassifierHead:
        return self.adapted.classifier

    @property
    def config(self) -> CascadeConfig:
        return self.adapted.config

    def add_site_expert(self, gate: dict) -> Expert:
        """A site expert, a copy of the parent expert until changed, and the gate that routes CTs to it."""
        parent = self.experts["parent"]
        self.experts["site"] = Expert(copy.deepcopy(parent.stage2), copy.deepcopy(parent.classifier),
                                      copy.deepcopy(parent.config))
        self.gate = gate
        return self.experts["site"]

    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _predict_slabs(self, net, volume, prior=None, slices=None, batch=16, notes=None):
        """Softmax probabilities (classes, K, H, W) float16 of a 2.5D net over axial slabs.

        Out of memory: empty the cache, halve the batch down to 1 slice, then finish on the CPU;
        what happened is appended to ``notes`` (shown to the user), never a silent partial result.
        """
        half = (net.config.in_channels - (prior is not None)) // 2
        nk = volume.shape[0]
        out = np.zeros((net.config.num_classes, *volume.shape), np.float16)
        out[0] = 1.0
        slices = np.arange(nk) if slices is None else slices
        padded = np.pad(volume, ((half, half), (0, 0), (0, 0)), mode="edge")
        device, first_batch, start, on_cpu_fallback = self.device, batch, 0, False
        try:
            while start < len(slices):
                ks = slices[start:start + batch]
                x = np.stack([padded[k:k + 2 * half + 1] for k in ks])
                if prior is not None:
                    x = np.concatenate([x, prior[ks][:, None]], axis=1)
                try:
                    _raise_fake_oom()
                    xt = torch.from_numpy(x).to(device)
                    bf16 = self.precision == "auto" and native_bf16(device)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        # float16 and class-first on the device: the host only copies
                        probs = net(xt).float().softmax(1).half().transpose(0, 1).cpu().numpy()
                except RuntimeError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
                    if not _is_out_of_memory(e):
                        raise
                    if batch == 1 and on_cpu_fallback:
                        raise LiverLesionAIError("Out of memory even with 1 slice per batch on the CPU; close other "
                                                 "programs or crop the CT to the abdomen.") from None
                    xt = None
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    if batch > 1:
                        batch //= 2
                    else:
                        device, on_cpu_fallback = torch.device("cpu"), True
                        net.to(device)
                    continue
                out[:, ks] = probs
                start += len(ks)
        finally:
            if device != self.device:
                net.to(self.device)
        if notes is not None and on_cpu_fallback:
            notes.append(f"{self.device.type.upper()} out of memory even with 1 slice per batch: finished on the "
                         "CPU (slower).")
        elif notes is not None and batch < first_batch:
            notes.append(f"{self.device.type.upper()} out of memory: retried with {batch} slice(s) per batch "
                         f"instead of {first_batch}.")
        return out

    def _predict_views(self, net, volume, prior, views, notes=None):
        """``_predict_slabs`` of stage 2 over the slices near the liver prior, averaged over slab ``views``."""
        fused = None
        for view in views:
            x, p = to_view(volume, view), to_view(prior, view)
            active = np.nonzero(p.reshape(len(p), -1).max(1) > 0.05)[0]
            # in-plane sizes of the canonical grid are multiples of the divisor; k (a row axis in the other views)
            # is not: pad with air (-1 after normalisation) and no liver, then crop
            x, (h, w) = pad_to_multiple(x, net.divisor, -1.0)
            p, _ = pad_to_multiple(p, net.divisor, 0.0)
            probs = from_view(self._predict_slabs(net, x, prior=p, slices=active, notes=notes)[..., :h, :w], view)
            if fused is None:
                fused = np.ascontiguousarray(probs)
            else:
                fused += probs
        if len(views) > 1:
            fused /= np.float16(len(views))
        return fused

    def _empty_result(self, ct, message):
        shape = ct.voxels.shape
        return SegmentationResult(np.zeros(shape, np.uint8), np.zeros(shape, np.uint16), [], ct.ijk_to_ras.copy(),
                                  0.0, [message], self.version)

    # ------------------------------------------------------------------------------------------
    def segment(self, ct: CTVolume, progress: Progress | None = None, force: bool = False,
                liver_prior: np.ndarray | None = None) -> SegmentationResult:
        """Liver, lesions and their types. ``liver_prior``, a liver mask (lesions included) in the CT's voxel
        grid, replaces stage 1: stage 2 then looks for lesions in and around that liver."""
        progress = progress or _no_progress
        outputs = self.run_networks(ct, progress, force, liver_prior)
        if isinstance(outputs, SegmentationResult):
            return outputs
        return self.lesions_from(outputs, progress)

    def run_networks(self, ct: CTVolume, progress: Progress | None = None, force: bool = False,
                     liver_prior: np.ndarray | None = None) -> NetworkOutputs | SegmentationResult:
        """Stages 1 and 2 of ``segment`` (the part that depends on the networks and on ``fill_liver_holes``);
        the "no liver" result where there is none. ``lesions_from`` turns the outputs into the result under
        the current lesion rule and candidate filter, so several rules can share one network pass."""
        inputs = self._stage2_inputs(ct, progress, force, liver_prior)
        if isinstance(inputs, SegmentationResult):
            return inputs
        canon, g2, x2, prior2, messages = inputs
        expert = domain_gate.route(self.gate, self._acquisition(x2, prior2)) if self.gate else "parent"
        notes = []
        probs2 = self._predict_views(self.experts[expert].stage2, x2, prior2, self.config.stage2_views, notes)
        if self.gate:
            messages.append(EXPERT_MESSAGES[expert])
        return NetworkOutputs(ct, canon, g2, x2, prior2, probs2, messages + notes, expert)

    def acquisition_features(self, ct: CTVolume) -> dict | None:
        """The liver's median HU and noise the domain gate routes on (stage 1 only); None without a liver."""
        inputs = self._stage2_inputs(ct)
        return None if isinstance(inputs, SegmentationResult) else self._acquisition(*inputs[2:4])

    def _acquisition(self, x2, prior2):
        hu = denormalize_hu(x2, self.config.hu_window)
        return domain_gate.acquisition_features(hu, prior2 > 0.5, float(self.config.stage2_spacing[0]))

    def _stage2_inputs(self, ct: CTVolume, progress: Progress | None = None, force: bool = False,
                       liver_prior: np.ndarray | None = None):
        """Stage 1, then stage 2's input on its grid: (canon, grid2, hu2, prior2, messages), or the "no liver"
        result."""
        progress = progress or _no_progress
        cfg = self.config
        progress(0.0, "Checking the CT")
        warnings = validate_ct(ct, force=force)
        if liver_prior is not None and np.shape(liver_prior) != ct.voxels.shape:
            raise InputError(f"The liver prior's shape {np.shape(liver_prior)} is not the CT's {ct.voxels.shape}.")
        canon = canonicalize(ct.voxels, ct.ijk_to_ras)
        lo, hi = grid_bounds(canon.grid)

        g1 = canonical_grid(lo, hi, cfg.stage1_spacing, multiple=self.stage1.divisor)
        notes = []  # e.g. out-of-memory retries, shown with the result
        if liver_prior is None:
            progress(0.1, "Finding the liver (stage 1)")
            x1 = normalize_hu(resample_separable(canon.array, canon.grid, g1, 1, cval=-1024), cfg.hu_window)
            liver_prob1 = self._predict_slabs(self.stage1, x1, notes=notes)[1].astype(np.float32)
        else:
            progress(0.1, "Using the given liver")
            notes.append("Lesions were searched in the given liver mask (stage 1 not run).")
            prior = canonicalize((np.asarray(liver_prior) > 0).astype(np.float32), ct.ijk_to_ras).array
            # clipped: an oblique CT is resampled with air (-1024) outside its box
            liver_prob1 = np.clip(resample_separable(prior, canon.grid, g1, 1, cval=0.0), 0.0, 1.0)
        liver1 = largest_component(liver_prob1 > 0.5)
        if cfg.fill_liver_holes and liver_prior is None:
            filled = fill_holes_per_slice(liver1) if cfg.fill_holes_in_slices else ndimage.binary_fill_holes(liver1)
            holes = filled & ~liver1
            liver_prob1[holes], liver1 = 1.0, liver1 | holes
        if cfg.liver_closing_mm and liver_prior is None:
            dents = closing_by_ball(liver1, np.asarray(g1.spacing, float)[::-1], cfg.liver_closing_mm) & ~liver1
            liver_prob1[dents], liver1 = 1.0, liver1 | dents
        liver1_ml = liver1.sum() * np.prod(g1.spacing) / 1000
        if liver1_ml < MIN_LIVER_ML or liver1_ml > MAX_LIVER_ML:
            reason = ("is the upper abdomen in the field of view?" if liver1_ml < MIN_LIVER_ML else
                      f"the region found, {liver1_ml:.0f} mL, is not a plausible liver")
            result = self._empty_result(ct, f"No liver found in this CT ({reason}).")
            result.messages.extend(warnings + notes)
            progress(1.0, "No liver found")
            return result

        progress(0.3, "Segmenting and typing lesions (stage 2)")
        (kmin, jmin, imin), (kmax, jmax, imax) = np.argwhere(liver1).min(0), np.argwhere(liver1).max(0)
        corners = (g1.ijk_to_ras @ np.array([[imin, jmin, kmin, 1.0], [imax, jmax, kmax, 1.0]]).T)[:3]
        roi_lo = np.maximum(corners.min(1) - ROI_MARGIN_MM, lo)
        roi_hi = np.minimum(corners.max(1) + ROI_MARGIN_MM, hi)
        g2 = canonical_grid(roi_lo, roi_hi, cfg.stage2_spacing, multiple=self.stage2.divisor)
        x2 = normalize_hu(resample_separable(canon.array, canon.grid, g2, 1, cval=-1024), cfg.hu_window)
        prior2 = resample_separable(liver_prob1, g1, g2, 1, cval=0.0)
        return canon, g2, x2, prior2, list(warnings) + notes

    def lesions_from(self, outputs: NetworkOutputs, progress: Progress | None = None,
                     classify: bool = True, keep_features: bool = False) -> SegmentationResult:
        """Liver mask, lesions and their types from the networks' outputs, under the current config.
        ``classify=False`` skips the classifier head (every lesion gets equal type probabilities): for
        detection-only uses such as tuning the candidate filter, where it would be most of the time.
        ``keep_features``: the result also holds each lesion's classifier input (``lesion_features``), to fit
        a head on the masks the engine itself makes."""
        progress = progress or _no_progress
        expert = self.experts[outputs.expert]
        cfg = expert.config
        ct, canon, g2, x2, prior2, probs2 = (outputs.ct, outputs.canon, outputs.grid2, outputs.hu2, outputs.prior2,
                                             outputs.probs2)
        labels2 = probs2.argmax(0)
        liver_region = stage2_liver_region(labels2, prior2, cfg.stage2_spacing[0])
        lesion_prob2 = probs2[STAGE2_FIRST_LESION:].astype(np.float32).sum(0)
        if cfg.lesion_threshold is None:
            lesion_mask = (labels2 >= STAGE2_FIRST_LESION) & liver_region
        else:
            lesion_mask = (lesion_prob2 >= cfg.lesion_threshold) & liver_region
        instances2, n = ndimage.label(lesion_mask, structure=np.ones((3, 3, 3)))
        keep, evidence2 = _lesion_candidates(instances2, n, lesion_prob2, liver_region, cfg)
        if cfg.lesion_appendage_radius_mm:  # after the filter, which judges the whole component
            instances2[lesion_appendages(np.isin(instances2, keep), cfg.stage2_spacing,
                                         cfg.lesion_appendage_radius_mm)] = 0
        if cfg.lesion_split_dynamic_mm:  # the pieces share the whole component's evidence
            instances2, pieces = split_touching_lesions(instances2, keep, cfg.stage2_spacing,
                                                        cfg.lesion_split_dynamic_mm, cfg.lesion_split_min_radius_mm,
                                                        cfg.lesion_split_max_neck_ratio)
            keep = np.concatenate([keep, np.fromiter(pieces, int, len(pieces))]).astype(int)
            evidence2.update({piece: evidence2[whole] for piece, whole in pieces.items()})
            n = int(instances2.max())

        progress(0.6, f"Classifying {len(keep)} lesion(s)")
        features2 = self._lesion_features(x2, prior2, instances2, keep, expert) if classify else {}
        if classify:
            type_probs2 = self._type_probabilities(features2, expert)
        else:
            type_probs2 = {int(k): dict.fromkeys(LESION_TYPES, 1 / len(LESION_TYPES)) for k in keep}

        progress(0.8, "Mapping results to the CT's geometry")
        remap = np.zeros(n + 1, np.uint16)
        remap[keep] = np.arange(1, len(keep) + 1)
        instances2 = remap[instances2]
        type_probs2 = {int(remap[k]): p for k, p in type_probs2.items()}
        evidence2 = {int(remap[k]): e for k, e in evidence2.items()}
        features2 = {int(remap[k]): f for k, f in features2.items()} if keep_features else {}
        liver_fg = (probs2[1:].astype(np.float32).sum(0)) * liver_region
        if cfg.great_vessel_radius_mm:
            liver_fg[great_vessels(denormalize_hu(x2, cfg.hu_window), liver_region, instances2 > 0, cfg)] = 0.0
        lesion_fg = lesion_prob2 * (instances2 > 0)
        # Everything is mapped inside the stage-2 box of the canonical grid, then placed once.
        sub, slices = sub_grid(canon.grid, *grid_bounds(g2))
        liver_c = np.zeros(canon.grid.shape, np.uint8)
        inst_c = np.zeros(canon.grid.shape, np.uint16)
        voxel_mm3 = abs(np.linalg.det(ct.ijk_to_ras[:3, :3]))
        type_probs, evidence, features, liver_voxels = {}, {}, {}, 0
        if sub is not None:
            liver_in = resample_separable(liver_fg, g2, sub, 1) > 0.5
            lesion_cut = 0.5 if cfg.lesion_threshold is None else cfg.lesion_threshold
            lesion_in = resample_separable(lesion_fg, g2, sub, 1) > lesion_cut
            grown = ndimage.grey_dilation(instances2, size=(3, 3, 3))
            grown = np.where(instances2 > 0, instances2, grown)
            inst_in = resample_separable(grown, g2, sub, 0, cval=0, dtype=np.uint16) * lesion_in
            kept_in, (type_probs, evidence, features) = _renumber_by_volume(
                inst_in, (type_probs2, evidence2, features2), MIN_LESION_MM3 / voxel_mm3)
            organ_in = liver_in | (inst_in > 0)  # specks too small to report stay liver
            liver_c[slices] = organ_in & (kept_in == 0)
            inst_c[slices] = kept_in
            liver_voxels = int(organ_in.sum())
        liver_mask = canon.to_input(liver_c)
        instances = canon.to_input(inst_c)

        progress(0.9, "Measuring lesions")
        records = build_lesion_records(ct.voxels, instances, ct.ijk_to_ras, type_probs)
        liver_ml = liver_voxels * voxel_mm3 / 1000
        messages = list(outputs.messages)
        if not records:
            messages.append("No liver lesions found.")
        progress(1.0, f"Done: liver {liver_ml:.0f} mL, {len(records)} lesion(s)")
        return SegmentationResult(liver_mask, instances, records, ct.ijk_to_ras.copy(), liver_ml, messages,
                                  self.version, lesion_evidence=evidence, lesion_features=features,
                                  expert=outputs.expert)

    # ------------------------------------------------------------------------------------------
    def _lesion_features(self, x2, prior2, instances2, lesion_ids, expert: Expert) -> dict[int, torch.Tensor]:
        """The classifier head's input per lesion id: three orthogonal patches through the lesion, each
        summarised by descriptors (or encoder features) and stage 2's type probabilities inside the mask."""
        if len(lesion_ids) == 0:
            return {}
        size = self.config.classifier_patch
        half = (self.config.stage2.in_channels - 1) // 2
        r = size // 2
        pad = [(r, r)] * 3
        x_pad = np.pad(x2, pad, constant_values=-1.0)
        prior_pad = np.pad(prior2, pad)
        centroids = ndimage.center_of_mass(np.ones_like(instances2, np.uint8), instances2, lesion_ids)
        inputs, masks = [], []
        inst_pad = np.pad(instances2, pad)
        for lesion_id, c in zip(lesion_ids, centroids):
            k, j, i = (int(round(v)) + r for v in c)
            box = (slice(k - r, k + r), slice(j - r, j + r), slice(i - r, i + r))
            mask = inst_pad[box] == lesion_id
            if not mask[r].any() or not mask[:, r].any() or not mask[:, :, r].any():
                # non-convex lesion: centre the patches on one of its own voxels
                vox = np.argwhere(inst_pad == lesion_id)
                k, j, i = vox[len(vox) // 2]
                box = (slice(k - r, k + r), slice(j - r, j + r), slice(i - r, i + r))
                mask = inst_pad[box] == lesion_id
            view_inputs, view_masks = lesion_view_inputs(x_pad[box], prior_pad[box], mask, half)
            inputs.append(view_inputs)
            masks.append(view_masks)
        out = {}
        with torch.inference_mode():
            for start in range(0, len(lesion_ids), 32):
                ids = lesion_ids[start:start + 32]
                vin = np.concatenate(inputs[start:start + 32])
                vm = np.concatenate(masks[start:start + 32])
                views = lesion_view_vectors(expert.stage2, vin, vm, self.device, expert.config.classifier_features)
                for lesion_id, vector in zip(ids, torch.cat(views, dim=1).float().cpu()):
                    out[int(lesion_id)] = vector
        return out

    def _type_probabilities(self, features: dict[int, torch.Tensor], expert: Expert) -> dict[int, dict[str, float]]:
        """Calibrated type probabilities per lesion id from the classifier head."""
        if not features:
            return {}
        with torch.inference_mode():
            vectors = torch.stack(list(features.values())).to(self.device)
            probs = expert.classifier([vectors]).softmax(1).cpu().numpy()  # the views, already concatenated
        return {lesion_id: {t: float(v) for t, v in zip(LESION_TYPES, p)} for lesion_id, p in zip(features, probs)}

    def classify_lesion(self, ct: CTVolume, lesion_mask: np.ndarray) -> dict[str, float]:
        """Type probabilities for one lesion the user drew (mask in the CT's voxel grid)."""
        grid2, x2, prior2, mask2, expert = self.lesion_inputs(ct, lesion_mask)
        expert = self.experts[expert]
        features = self._lesion_features(x2, prior2, mask2.astype(np.int32), np.array([1]), expert)
        return self._type_probabilities(features, expert)[1]

    def lesion_inputs(self, ct: CTVolume, lesion_mask: np.ndarray):
        """Stage 2's input around one lesion given as a mask in the CT's voxel grid (drawn or reviewed):
        (grid2, hu2, prior2, mask2, expert name), with a classifier patch of context on every side."""
        if lesion_mask.shape != ct.voxels.shape or not lesion_mask.any():
            raise ValueError("The lesion mask is empty or does not match the CT's size.")
        cfg = self.config
        canon = canonicalize(ct.voxels, ct.ijk_to_ras)
        mask_c = canonicalize(lesion_mask.astype(np.uint8), ct.ijk_to_ras).array
        lo, hi = grid_bounds(canon.grid)
        g1 = canonical_grid(lo, hi, cfg.stage1_spacing, multiple=self.stage1.divisor)
        x1 = normalize_hu(resample_separable(canon.array, canon.grid, g1, 1, cval=-1024), cfg.hu_window)
        liver_prob1 = self._predict_slabs(self.stage1, x1)[1].astype(np.float32)
        idx = np.argwhere(mask_c)
        pts = np.c_[idx[:, ::-1], np.ones(len(idx))] @ canon.grid.ijk_to_ras.T
        margin = cfg.classifier_patch * cfg.stage2_spacing[0]
        g2 = canonical_grid(np.maximum(pts[:, :3].min(0) - margin, lo), np.minimum(pts[:, :3].max(0) + margin, hi),
                            cfg.stage2_spacing, multiple=self.stage2.divisor)
        x2 = normalize_hu(resample_separable(canon.array, canon.grid, g2, 1, cval=-1024), cfg.hu_window)
        prior2 = resample_separable(liver_prob1, g1, g2, 1, cval=0.0)
        mask2 = resample_separable(mask_c, canon.grid, g2, 1) > 0.5
        if not mask2.any():
            mask2 = resample_separable(mask_c, canon.grid, g2, 0, dtype=np.uint8) > 0
        expert = domain_gate.route(self.gate, self.acquisition_features(ct)) if self.gate else "parent"
        return g2, x2, prior2, mask2, expert


def stage2_liver_region(labels2, prior2, spacing_mm):
    """Stage 2's organ: its liver and lesion voxels (argmax ``labels2`` >= 1) within 10 mm of stage 1's liver
    (``prior2`` > 0.5), largest component. Lesions are looked for inside it."""
    near_liver = ndimage.binary_dilation(prior2 > 0.5, iterations=int(round(10 / float(spacing_mm))))
    return largest_component((labels2 >= 1) & near_liver)


def fill_holes_per_slice(mask):
    """The mask with every hole closed, in 3D and in each axial slice (a hole that opens at the organ's top
    or bottom is not one in 3D, but is in the slices it crosses)."""
    filled = ndimage.binary_fill_holes(mask)
    for k in range(len(filled)):
        filled[k] = ndimage.binary_fill_holes(filled[k])
    return filled


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


_FAKE_OOM_ENV = "LIVERLESIONAI_TEST_FAKE_OOM"  # test hook: the first N forward passes run out of memory
_fake_oom_raised = 0


def _raise_fake_oom():
    global _fake_oom_raised
    if _fake_oom_raised < int(os.environ.get(_FAKE_OOM_ENV, "0") or 0):
        _fake_oom_raised += 1
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated by {_FAKE_OOM_ENV})")


def _lesion_candidates(instances2, n, lesion_prob2, organ, cfg: CascadeConfig):
    """Lesion components worth reporting, with the evidence for each.

    Drops specks below the reportable size, components the network is unsure of, and thin shells
    hugging the organ's outer surface (partial-volume edges against fat, not lesions). Thresholds
    come from the model card (tuned on validation phantoms).
    """
    spacing = np.asarray(cfg.stage2_spacing)
    ids = np.arange(n + 1)
    sizes = np.maximum(np.bincount(instances2.ravel(), minlength=n + 1), 1)
    confidence = np.bincount(instances2.ravel(), weights=lesion_prob2.ravel(), minlength=n + 1) / sizes
    depth = ndimage.distance_transform_edt(organ, sampling=spacing[::-1])
    surface = np.bincount(instances2[depth <= EDGE_BAND_MM], minlength=n + 1) / sizes
    reportable = ids[(ids > 0) & (sizes >= MIN_LESION_MM3 / np.prod(spacing))]  # specks get no evidence
    evidence = {int(i): {"confidence": float(confidence[i]), "surface_fraction": float(surface[i])} for i in reportable}
    keep = np.array([i for i in reportable if cfg.passes(evidence[int(i)])], int)
    return keep, {int(i): evidence[int(i)] for i in keep}


def opening_by_ball(mask, sampling_kji, radius_mm):
    """The voxels of ``mask`` covered by a ball of ``radius_mm`` lying inside it (morphological opening by the
    ball, through two distance transforms: exact for any radius and anisotropic ``sampling_kji``)."""
    core = ndimage.distance_transform_edt(mask, sampling=sampling_kji) > radius_mm  # centres of the balls that fit
    if not core.any():
        return core
    return mask & (ndimage.distance_transform_edt(~core, sampling=sampling_kji) <= radius_mm)


def closing_by_ball(mask, sampling_kji, radius_mm):
    """``mask`` with every dent a ball of ``radius_mm`` cannot enter filled (morphological closing by the ball: the
    opening of the complement, with room around the mask so that its edges are not closed against the array's)."""
    pad = int(np.ceil(radius_mm / float(np.min(sampling_kji)))) + 1
    outside = np.pad(~mask, pad, constant_values=True)
    closed = ~opening_by_ball(outside, sampling_kji, radius_mm)
    return closed[tuple(slice(pad, -pad) for _ in range(mask.ndim))]


def lesion_appendages(lesion_mask, spacing_xyz, radius_mm):
    """What hangs off a lesion's main body: per 26-connected component of ``lesion_mask`` (a canonical grid of
    ``spacing_xyz``) that holds a ball of ``radius_mm`` somewhere, its voxels farther than ``radius_mm`` from the
    largest piece of its opening by that ball: the sheets and bridges thinner than the ball's diameter beyond
    their roots, and what lies beyond them. The corners the opening shaves off stay. Components thinner than the
    ball throughout (small lesions) keep every voxel."""
    found = np.zeros(lesion_mask.shape, bool)
    if not lesion_mask.any():
        return found
    box = ndimage.find_objects(lesion_mask.astype(np.uint8))[0]
    mask = lesion_mask[box]
    sampling = np.asarray(spacing_xyz, float)[::-1]
    covered = opening_by_ball(mask, sampling, radius_mm)
    if not covered.any():
        return found
    connectivity = np.ones((3, 3, 3))
    components, _ = ndimage.label(mask, structure=connectivity)
    pieces, n = ndimage.label(covered, structure=connectivity)
    size = np.bincount(pieces.ravel())[1:]
    owner = np.asarray(ndimage.maximum(components, pieces, index=np.arange(1, n + 1)), int)
    main_piece = {}
    for piece in np.argsort(-size, kind="stable") + 1:
        main_piece.setdefault(owner[piece - 1], piece)
    main_body = np.isin(pieces, list(main_piece.values()))
    near_body = ndimage.distance_transform_edt(~main_body, sampling=sampling) <= radius_mm
    found[box] = mask & ~near_body & np.isin(components, list(main_piece))
    return found


def split_touching_lesions(instances, lesion_ids, spacing_xyz, dynamic_mm, min_radius_mm, max_neck_ratio=None):
    """Each lesion of ``instances`` (ids ``lesion_ids``, a canonical grid of ``spacing_xyz``) made of round bodies
    joined through necks, split into one lesion per body. A body is a peak of the lesion's distance to its
    boundary that holds a ball of ``min_radius_mm`` and rises at least ``dynamic_mm`` above the neck joining it to
    a higher one; with ``max_neck_ratio``, that neck's half-width is also at most this share of the body's radius
    (the peak), so that the lobules of a large lesion, deep in absolute terms, stay part of it. Each voxel goes to
    the body its distance ridge climbs to (watershed). Returns the new instance map and {new id: the id it was
    split from} for the pieces beyond the first, which keeps the original id."""
    instances = instances.copy()
    sampling = np.asarray(spacing_xyz, float)[::-1]
    step = float(sampling.min()) / 2
    boxes = ndimage.find_objects(instances)
    pieces, next_id = {}, int(instances.max()) + 1
    for lesion_id in lesion_ids:
        box = boxes[int(lesion_id) - 1]
        if box is None:
            continue
        box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
        mask = instances[box] == lesion_id
        depth = ndimage.distance_transform_edt(mask, sampling=sampling)
        seeds = _body_seeds(mask, depth, 0.0, step, (dynamic_mm, min_radius_mm, max_neck_ratio))
        if len(seeds) < 2:
            continue
        bodies = _flood_from_seeds(mask, depth, seeds, step)
        region = instances[box]
        for number in range(2, len(seeds) + 1):
            region[mask & (bodies == number)] = next_id
            pieces[next_id] = int(lesion_id)
            next_id += 1
    return instances, pieces


def _flood_from_seeds(mask, depth, seeds, step):
    """Watershed by flooding: the seeds (numbered from 1) grow through ``mask`` level by level of falling
    ``depth``, so two bodies meet at the neck between them and each keeps the voxels that slope down from it."""
    bodies = np.zeros(mask.shape, np.int16)
    for number, seed in enumerate(seeds, start=1):
        bodies[seed] = number
    footprint = np.ones((3, 3, 3), bool)
    for level in np.arange(depth.max(), -step, -step):
        allowed = mask & (depth > max(level, 0.0))
        while True:
            grown = ndimage.grey_dilation(bodies, footprint=footprint)
            reached = allowed & (bodies == 0) & (grown > 0)
            if not reached.any():
                break
            bodies[reached] = grown[reached]
    return bodies


def _body_seeds(region, depth, level, step, body_rule):
    """The cores of the bodies within ``region`` (where ``depth`` > ``level``): the region is cut at rising levels
    of depth until it falls apart into parts of which at least two are bodies (``body_rule``: dynamic, minimum
    radius, maximum neck ratio, as split_touching_lesions takes them), each then searched alike; lesser parts are
    not bodies."""
    dynamic_mm, min_radius_mm, max_neck_ratio = body_rule
    connectivity = np.ones((3, 3, 3))
    while True:
        level += step
        parts, n = ndimage.label(region & (depth > level), structure=connectivity)
        if n == 0:
            return [region]
        peaks = np.asarray(ndimage.maximum(depth, parts, index=np.arange(1, n + 1)))
        bodies = [i + 1 for i, peak in enumerate(peaks) if peak >= level + dynamic_mm and peak >= min_radius_mm
                  and (max_neck_ratio is None or level <= max_neck_ratio * peak)]
        if len(bodies) >= 2:
            return [seed for body in bodies for seed in _body_seeds(parts == body, depth, level, step, body_rule)]
        if not bodies:
            return [region]
        region = parts == bodies[0]


def great_vessels(hu2, liver_region, lesions2, cfg: CascadeConfig):
    """Voxels of ``liver_region`` (stage 2's grid, isotropic) that belong to a great vessel: enhancing (at least
    cfg.great_vessel_min_hu_above_liver above the liver's median, on a lightly smoothed CT), thick enough to hold a
    ball of cfg.great_vessel_radius_mm, and reaching the region's surface; with cfg.great_vessel_rim, also the
    vessel's partial-volume rim (the voxels next to it at least half as bright). The IVC and the portal trunk
    qualify; intrahepatic vessels are thinner, and a bright lesion deep in the liver does not reach its surface."""
    found = np.zeros(liver_region.shape, bool)
    parenchyma = liver_region & ~lesions2
    if not parenchyma.any():
        return found
    box = ndimage.find_objects(liver_region.astype(np.uint8))[0]
    region, parenchyma = liver_region[box], parenchyma[box]
    sampling = np.asarray(cfg.stage2_spacing, float)[::-1]
    smooth = ndimage.gaussian_filter(hu2[box].astype(np.float32), 1.0)  # voxel noise would break thin walls
    above_liver = smooth - np.median(smooth[parenchyma])
    bright = parenchyma & (above_liver >= cfg.great_vessel_min_hu_above_liver)
    radius = float(cfg.great_vessel_radius_mm)
    thick = opening_by_ball(bright, sampling, radius)
    if not thick.any():
        return found
    labels, _ = ndimage.label(thick)
    # the vessel's own blurred wall keeps its core a voxel or two inside the region's surface
    near_surface = ndimage.distance_transform_edt(region, sampling=sampling) <= GREAT_VESSEL_SURFACE_MM
    reaching = np.unique(labels[near_surface & thick])
    vessels = np.isin(labels, reaching[reaching > 0])
    if cfg.great_vessel_rim:
        rim_bright = above_liver >= cfg.great_vessel_min_hu_above_liver / 2
        vessels |= ndimage.binary_dilation(vessels) & parenchyma & rim_bright
    found[box] = vessels
    return found


def _renumber_by_volume(instances, per_lesion, min_voxels):
    """Lesion ids 1..n by decreasing volume (id 1 = largest), dropping lesions that shrank below the
    reportable size when mapped to the input grid; ``per_lesion``, dicts by lesion id, renumbered alike
    (a dict may be empty)."""
    counts = np.bincount(instances.ravel())
    ids = [i for i in np.argsort(-counts, kind="stable") if i > 0 and counts[i] >= max(min_voxels, 1)]
    remap = np.zeros(len(counts), np.uint16)
    renumbered = tuple({} for _ in per_lesion)
    for new_id, old_id in enumerate(ids, start=1):
        remap[old_id] = new_id
        for source, target in zip(per_lesion, renumbered):
            if int(old_id) in source:
                target[new_id] = source[int(old_id)]
    return remap[instances], renumbered
