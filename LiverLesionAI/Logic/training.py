"""Training on streamed phantoms: stage 1 (liver), stage 2 (lesions + per-pixel type), lesion classifier.

Phantom seeds: the held-out test set uses seeds 0..999 (TEST_SEEDS), validation 500_000..,
training 1_000_000 and up, so training never sees a test phantom.
Every stage checkpoints to its run folder and resumes from there.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from . import phantom as ph
from .descriptors import lesion_view_descriptors
from .networks import (EVIDENCE_KEYS, FILTER_OFF, STAGE2_FIRST_LESION, STAGE2_LIVER, CascadeConfig, LesionClassifierHead, UNet2p5D,
                       passes_candidate_filter)
from .preprocessing import VIEWS, normalize_hu, to_view
from .records import LESION_TYPES

TEST_SEED_BASE = 0
VALIDATION_SEED_BASE = 500_000
TRAIN_SEED_BASE = 1_000_000
LIVER_TISSUES = (ph.LIVER, ph.LIVER_VESSEL, ph.LESION)
RESTART_LR = 1e-3  # peak learning rate of a stage's second cycle (the first peaks at 2e-3)
RESTART_SEED_OFFSET = 50_000  # the second cycle sees phantoms the first never drew
STAGE_SEED_BASES = {"stage1": TRAIN_SEED_BASE, "stage2": TRAIN_SEED_BASE + 200_000}
ENGINE_LESION_SEED_BASE = TRAIN_SEED_BASE + 800_000  # phantoms of the head fitted on the engine's own lesions


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError("A GPU was requested but PyTorch sees no CUDA device; use --device cpu.")
    return torch.device("cuda" if device == "gpu" else device)


class PhantomSource:
    """Streams phantom descriptions, each reused for a few blocks (drawing one costs ~0.1 s)."""

    def __init__(self, seed_base, reuse=2, domain=None):
        self.next_seed, self.reuse, self.domain = seed_base, reuse, domain
        self.current, self.used = None, reuse

    def get(self):
        if self.used >= self.reuse:
            self.current, self.used = ph.make_phantom(self.next_seed, self.domain), 0
            self.next_seed += 1
        self.used += 1
        return self.current


def block_grid(center, spacing, shape_kji):
    spacing = np.asarray(spacing, float)
    nk, nj, ni = shape_kji
    origin = np.array([center[0] + (ni - 1) / 2 * spacing[0], center[1] + (nj - 1) / 2 * spacing[1],
                       center[2] - (nk - 1) / 2 * spacing[2]])
    return ph.Grid(origin, spacing, shape_kji)


def _intensity_augment(hu, rng):
    return hu * rng.uniform(0.95, 1.05) + rng.uniform(-10, 10)


# Soft tissue that stage 1 takes for liver where it touches the liver, on real CT above all (the wall
# muscle, bowel and stomach at the hilum, the heart above the dome).
PRIOR_LEAK_TISSUES = (ph.MUSCLE, ph.BOWEL, ph.STOMACH, ph.PANCREAS, ph.SPLEEN, ph.KIDNEY, ph.HEART,
                      ph.GALLBLADDER, ph.VESSEL)
PRIOR_ERROR_FRACTION = 0.75  # share of training priors given stage-1-like errors


def _liver_prior(liver, rng, spacing_mm, tissue=None):
    """Imitates stage 1's upsampled liver probability (coarse, blurred, slightly off).

    With ``tissue`` (the block's tissue labels), most priors are also wrong the way stage 1 is wrong:
    a boundary that wanders by a few millimetres, leaks into soft tissue touching the liver, lesions
    left out. Trained on near-perfect priors only, stage 2 copied stage 1's errors on real CT (liver
    Dice 0.893 from stage 1 alone, 0.899 after stage 2)."""
    mask = liver
    if tissue is not None and liver.any() and rng.random() < PRIOR_ERROR_FRACTION:
        spacing = np.full(3, float(spacing_mm))
        outside_mm = ndimage.distance_transform_edt(~liver, sampling=spacing)
        signed_mm = outside_mm - ndimage.distance_transform_edt(liver, sampling=spacing)
        wander_mm = ph._smooth_noise(rng, liver.shape, spacing, 30.0) * rng.uniform(0.0, 3.0)
        mask = signed_mm < wander_mm
        patches = ph._smooth_noise(rng, liver.shape, spacing, 25.0) > rng.uniform(-0.5, 1.0)
        mask |= np.isin(tissue, PRIOR_LEAK_TISSUES) & (outside_mm < rng.uniform(0.0, 12.0)) & patches
        if rng.random() < 0.3:
            mask &= tissue != ph.LESION
    sigma = rng.uniform(1.0, 3.0) / spacing_mm
    prior = ndimage.gaussian_filter(mask.astype(np.float32), sigma)
    if rng.random() < 0.3:
        prior = ndimage.shift(prior, rng.uniform(-2, 2, 3), order=1, mode="nearest")
    return prior


def lesion_pixel_weights(instances_2d, target_area=150.0, max_weight=25.0, min_weight=1.0):
    """Inverse lesion-size weights: every lesion gets about the same total weight (at least
    ``min_weight`` per pixel)."""
    weights = np.ones(instances_2d.shape, np.float32)
    ids, counts = np.unique(instances_2d[instances_2d > 0], return_counts=True)
    for lesion_id, count in zip(ids, counts):
        weights[instances_2d == lesion_id] = np.clip(target_area / count, min_weight, max_weight)
    return weights


# Stage 1 counts lesions as liver. Unweighted, it carved dark lesions at the liver's edge out of the
# liver (a 51 mm cyst in the left lobe tip: stage-1 probability 0.25 inside it), and stage 2, which
# follows the prior, then labelled them background. Same weighting as stage 2's at 3 mm (150 pixels at
# 1.25 mm = 26 at 3 mm), and large lesions weigh 3x a liver pixel.
STAGE1_LESION_WEIGHTS = {"target_area": 26.0, "max_weight": 25.0, "min_weight": 3.0}


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------
def stage1_batch(source, cfg: CascadeConfig, rng, batch=16, size=96, per_block=4):
    spacing = np.asarray(cfg.stage1_spacing)
    half = cfg.stage1.in_channels // 2
    pad = 3
    xs, ys, ws = [], [], []
    while len(xs) * per_block < batch:
        phantom = source.get()
        lo, hi = phantom.liver_bbox
        liver_center = (lo + hi) / 2
        if rng.random() < 0.7:
            cxy = liver_center[:2] + rng.normal(0, 35, 2)
        else:
            cxy = rng.uniform(phantom.extent_min[:2] + 60, phantom.extent_max[:2] - 60)
        cz = rng.uniform(lo[2] - 70, min(hi[2], phantom.liver_cuts[0][1]) + 50)
        nk = 2 * half + per_block + 2 * pad
        grid = block_grid((cxy[0], cxy[1], cz), spacing, (nk, size, size))
        hu, tissue, instances = ph.render(phantom, grid, rng)
        x = normalize_hu(_intensity_augment(hu, rng), cfg.hu_window)
        centers = np.arange(pad + half, pad + half + per_block)
        xs.append(np.stack([x[c - half:c + half + 1] for c in centers]))
        ys.append(np.isin(tissue[centers], LIVER_TISSUES).astype(np.int64))
        ws.append(np.stack([lesion_pixel_weights(instances[c], **STAGE1_LESION_WEIGHTS) for c in centers]))
    return tuple(torch.from_numpy(np.concatenate(part)[:batch]) for part in (xs, ys, ws))


def stage2_targets(tissue, instances, lesion_types):
    target = np.zeros(tissue.shape, np.int64)
    target[np.isin(tissue, LIVER_TISSUES)] = STAGE2_LIVER
    for lesion_id, lesion_type in lesion_types.items():
        target[instances == lesion_id] = STAGE2_FIRST_LESION + LESION_TYPES.index(lesion_type)
    return target


# Slice thicknesses of the phantom CTs (phantom.acquisition_grid) over 1.5 mm: an engine resamples such CTs onto
# stage 2's 1.25 mm grid, which blocks rendered straight onto it never show.
THICK_SLICES_MM = (2.0, 2.5, 3.0, 5.0)


def check_thick_fraction(thick_fraction: float):
    if not 0.0 <= thick_fraction <= 1.0:
        raise ValueError(f"thick_fraction {thick_fraction}: a share of the blocks, from 0 to 1")


def check_vessel_weight(vessel_weight: float):
    if not vessel_weight > 0.0:
        raise ValueError(f"vessel_weight {vessel_weight}: a factor on the intrahepatic vessels' weight, over 0")


def stage2_batch(source, cfg: CascadeConfig, rng, batch=16, size=96, per_block=4, thick_fraction=0.0,
                 vessel_weight=1.0):
    """``thick_fraction`` of the blocks are rendered as CTs of thick slices resampled onto stage 2's grid
    (phantom.render_thick_slices, a thickness of THICK_SLICES_MM and a slice profile drawn per block).
    ``vessel_weight`` multiplies the loss weight of the intrahepatic vessels' pixels (liver in the target): a vessel
    cut across is a bright disc in 3 slices, as a hemangioma's nodules are. The draws do not depend on it."""
    spacing = np.asarray(cfg.stage2_spacing)
    half = (cfg.stage2.in_channels - 1) // 2  # last channel is the liver prior
    pad = 5
    xs, ys, ws = [], [], []
    while len(xs) < batch:
        phantom = source.get()
        lo, hi = phantom.liver_bbox
        if phantom.lesions and rng.random() < 0.55:
            lesion = phantom.lesions[rng.integers(len(phantom.lesions))]
            center = lesion.blob.center + rng.normal(0, 1, 3) * np.minimum(lesion.blob.axes, 30) * 0.6
        else:
            center = rng.uniform(lo - 15, hi + 15)
        view = rng.choice(VIEWS, p=[0.5, 0.25, 0.25])
        depth = 2 * half + per_block + 2 * pad
        shape = {"axial": (depth, size, size), "coronal": (size, depth, size), "sagittal": (size, size, depth)}[view]
        grid = block_grid(center, spacing, shape)
        if thick_fraction and rng.random() < thick_fraction:  # 0: the draws of the shipped models' batches
            hu, tissue, instances = ph.render_thick_slices(phantom, grid, float(rng.choice(THICK_SLICES_MM)), rng,
                                                           profile=rng.uniform(0.0, 1.0))
        else:
            hu, tissue, instances = ph.render(phantom, grid, rng)
        liver = np.isin(tissue, LIVER_TISSUES)
        prior = _liver_prior(liver, rng, spacing[0], tissue)
        x = to_view(normalize_hu(_intensity_augment(hu, rng), cfg.hu_window), view)
        prior = to_view(prior, view)
        types = {les.lesion_id: les.lesion_type for les in phantom.lesions}
        target = to_view(stage2_targets(tissue, instances, types), view)
        inst = to_view(instances, view)
        vessel = to_view(tissue == ph.LIVER_VESSEL, view)
        for c in range(pad + half, pad + half + per_block):
            xs.append(np.concatenate([x[c - half:c + half + 1], prior[c:c + 1]]))
            ys.append(target[c])
            ws.append(np.where(vessel[c], np.float32(vessel_weight), np.float32(1.0)) * lesion_pixel_weights(inst[c]))
    return (torch.from_numpy(np.stack(xs[:batch])), torch.from_numpy(np.stack(ys[:batch])),
            torch.from_numpy(np.stack(ws[:batch])))


BLOCK_SLABS = 4  # training slabs cut from each rendered block
BATCH_SEED = 12345


def training_batch(part: str, seed_base: int, reuse: int, batch: int, domain, step: int,
                   config: CascadeConfig | None = None, thick_fraction: float = 0.0, vessel_weight: float = 1.0):
    """Stage ``part``'s ("stage1" or "stage2") training batch of optimiser step ``step``, a function of its
    arguments alone, so batches can be rendered ahead in worker processes and a resumed run draws what an
    uninterrupted one would. The step renders ceil(batch / BLOCK_SLABS) blocks from the phantoms a sequential
    stream from ``seed_base`` would give it (each phantom serving ``reuse`` blocks). ``config`` sets the slab
    (its stage's in_channels; default CascadeConfig()); ``thick_fraction`` and ``vessel_weight`` are stage2_batch's."""
    blocks = -(-batch // BLOCK_SLABS)
    source = PhantomSource(seed_base + step * -(-blocks // reuse), reuse=reuse, domain=domain)
    check_thick_fraction(thick_fraction)
    check_vessel_weight(vessel_weight)
    rng = np.random.default_rng([BATCH_SEED, step])
    if part == "stage1":
        if thick_fraction:
            raise ValueError("thick_fraction is stage 2's: stage 1 works at 3 mm")
        if vessel_weight != 1.0:
            raise ValueError("vessel_weight is stage 2's: stage 1's target calls the vessels liver, unweighted")
        return stage1_batch(source, config or CascadeConfig(), rng, batch, per_block=BLOCK_SLABS)
    return stage2_batch(source, config or CascadeConfig(), rng, batch, per_block=BLOCK_SLABS,
                        thick_fraction=thick_fraction, vessel_weight=vessel_weight)


def _render_worker_init():
    torch.set_num_threads(1)  # rendering is numpy; one thread per worker process


def _rendered_arrays(make_batch, step):
    return tuple(t.numpy() for t in make_batch(step))


class BatchStream:
    """The batches ``make_batch(step)`` of ``steps`` (a range), in order. With ``workers`` > 0 they are rendered
    ahead in that many processes (``make_batch`` must then pickle: a module-level function or a partial of one), at
    most two per worker waiting, so on a GPU the optimiser step no longer waits for the phantoms to be drawn."""

    def __init__(self, make_batch, steps: range, workers: int = 0):
        self.make_batch, self.steps = make_batch, iter(steps)
        self.pending, self.pool = collections.deque(), None
        if workers > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: the training process holds torch's threads, which a forked child must not inherit
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_render_worker_init)
            for _ in range(2 * workers):
                self._submit()

    def _submit(self):
        step = next(self.steps, None)
        if step is not None:
            self.pending.append(self.pool.submit(_rendered_arrays, self.make_batch, step))

    def __iter__(self):
        return self

    def __next__(self):
        if self.pool is None:
            return self.make_batch(next(self.steps))
        if not self.pending:
            raise StopIteration
        arrays = self.pending.popleft().result()
        self._submit()
        return tuple(torch.from_numpy(a) for a in arrays)

    def close(self):
        if self.pool is not None:
            for future in self.pending:
                future.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# ----------------------------------------------------------------------------------------------
# A bank of rendered slabs: stage 2's long third cycle
# ----------------------------------------------------------------------------------------------
STAGE2_BANK_SEED_BASE = TRAIN_SEED_BASE + 600_000  # phantoms no other stage, head fit or benchmark draws
BANK_DRAW_SEED = 54321


def _bank_file(folder: Path, index: int) -> Path:
    return folder / f"batch{index:05d}.npz"


def render_bank(folder, batches: int, workers: int, config: CascadeConfig, seed_base=STAGE2_BANK_SEED_BASE,
                batch=16, domain=None, log=print, thick_fraction=0.0, vessel_weight=1.0):
    """Renders stage 2's training batches 0..``batches``-1 of the phantoms from ``seed_base`` into ``folder``, in
    ``workers`` processes (0: this one). Each batch is written whole or not at all, so a rerun renders only the
    missing ones; stored in float16 / uint8 (the HU window's 600 HU in steps under 0.3 HU). ``folder``'s
    bank.json names what it holds: a folder holding another bank is refused, not mixed into this one.
    ``thick_fraction``, ``vessel_weight``: training_batch's."""
    check_thick_fraction(thick_fraction)  # before bank.json is written, not in the render workers
    check_vessel_weight(vessel_weight)
    folder = Path(folder)
    recipe = {"seed_base": seed_base, "batch": batch, "reuse": 2, "domain": domain,
              "stage2_in_channels": config.stage2.in_channels}
    if thick_fraction:  # named only when used, so that banks rendered before it stay valid
        recipe["thick_fraction"] = thick_fraction
    if vessel_weight != 1.0:
        recipe["vessel_weight"] = vessel_weight
    manifest = json.dumps(recipe, sort_keys=True, default=str)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_file = folder / "bank.json"
    if manifest_file.exists() and manifest_file.read_text() != manifest:
        raise ValueError(f"{folder} holds another bank ({manifest_file.read_text()}), not {manifest}")
    if not manifest_file.exists():
        if any(folder.glob("batch*.npz")):
            raise ValueError(f"{folder} holds batches without a bank.json: of unknown origin, not drawn from")
        manifest_file.write_text(manifest)
    for stale in folder.glob("*.partial.npz"):  # a render killed while writing
        stale.unlink()
    missing = [i for i in range(batches) if not _bank_file(folder, i).exists()]
    make_batch = functools.partial(training_batch, "stage2", seed_base, 2, batch, domain, config=config,
                                   thick_fraction=thick_fraction, vessel_weight=vessel_weight)
    pool = None
    if workers > 0 and missing:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_render_worker_init)
    started = time.time()
    try:
        rendered = (pool.map(_rendered_arrays, [make_batch] * len(missing), missing, chunksize=4) if pool else
                    (_rendered_arrays(make_batch, index) for index in missing))
        for done, (index, (x, target, weights)) in enumerate(zip(missing, rendered), 1):
            partial = folder / f"batch{index:05d}.partial.npz"
            np.savez(partial, x=x.astype(np.float16), target=target.astype(np.uint8),
                     weights=weights.astype(np.float16))
            os.replace(partial, _bank_file(folder, index))
            if done % 100 == 0 or done == len(missing):
                log(f"bank: {done}/{len(missing)} batches rendered ({time.time() - started:.0f} s)")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class SlabBank:
    """The slabs of a rendered bank, in memory (``batches`` of 16 slabs: 1.6 MB each). ``batch(step)`` draws
    ``size`` of them at random (a function of the step, so a resumed run draws what an uninterrupted one would),
    each mirrored at random along its rows and columns: a long cycle passes over each slab several times, each
    time in other company and, as often as not, another orientation.
    ``rendered_batch(step)`` gives the bank's batches as rendered instead, in turn (4 adjacent slabs of each of 4
    blocks, as training_batch makes them): the control for what the random draw adds."""

    def __init__(self, folder, batches: int):
        parts = [np.load(_bank_file(Path(folder), i)) for i in range(batches)]
        self.batches = batches
        self.x = np.concatenate([p["x"] for p in parts])
        self.target = np.concatenate([p["target"] for p in parts])
        self.weights = np.concatenate([p["weights"] for p in parts])

    def __len__(self):
        return len(self.x)

    def _slabs(self, chosen, flips):
        parts = []
        for array, dtype in ((self.x, np.float32), (self.target, np.int64), (self.weights, np.float32)):
            slabs = []
            for index, (flip_rows, flip_columns) in zip(chosen, flips):
                slab = array[index]
                slab = slab[..., ::-1, :] if flip_rows else slab
                slabs.append(slab[..., ::-1] if flip_columns else slab)
            parts.append(torch.from_numpy(np.stack(slabs).astype(dtype)))
        return tuple(parts)

    def batch(self, step: int, size: int = 16):
        rng = np.random.default_rng([BANK_DRAW_SEED, step])
        return self._slabs(rng.choice(len(self), size, replace=False), rng.random((size, 2)) < 0.5)

    def rendered_batch(self, step: int):
        size = len(self) // self.batches
        start = step % self.batches * size
        return self._slabs(range(start, start + size), np.zeros((size, 2), bool))


# ----------------------------------------------------------------------------------------------
# Loss and loop
# ----------------------------------------------------------------------------------------------
def dice_ce_loss(logits, target, pixel_weights=None):
    """Pixel-weighted cross-entropy + soft Dice over the foreground classes present in the batch."""
    ce = F.cross_entropy(logits, target, reduction="none")
    if pixel_weights is not None:
        ce = (ce * pixel_weights).sum() / pixel_weights.sum()
    else:
        ce = ce.mean()
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    present = onehot.sum(dims)[1:] > 0
    dice = (2 * inter[1:] + 1) / (denom[1:] + 1)
    dice_loss = (1 - dice[present]).mean() if present.any() else logits.sum() * 0
    return ce + dice_loss


def _save_checkpoint(path, payload):
    tmp = Path(str(path) + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def distillation_loss(logits, teacher_logits):
    """Mean per-pixel KL divergence from the teacher's class probabilities to the student's."""
    return F.kl_div(logits.float().log_softmax(1), teacher_logits.float().log_softmax(1), log_target=True,
                    reduction="none").sum(1).mean()


def train_step(net, optimizer, batch, device, teacher=None, distill_weight=1.0) -> float:
    """One optimiser step on (x, target[, weights]); bf16 autocast on CUDA. Returns the loss.

    ``teacher``: a frozen network whose pixel probabilities the student is also pulled towards
    (fine-tuning: keeps what the parent model did well on its own domain)."""
    batch = [b.to(device) for b in batch]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = net(batch[0])
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(batch[0])
    loss = dice_ce_loss(logits.float(), *batch[1:])
    if teacher is not None:
        loss = loss + distill_weight * distillation_loss(logits, teacher_logits)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_network(net, make_batch, steps, run_dir, name, device, lr=2e-3, log=print, checkpoint_every=50,
                  param_groups=None, cancel=None, workers=0, keep_every=None):
    """Generic resumable loop; ``make_batch(step)`` returns the step's (x, target[, weights]), rendered ahead in
    ``workers`` processes when > 0 (BatchStream). ``keep_every``: also keep the weights of every such step as
    ``name.step<N>.ckpt`` (a learning curve; a multiple of ``checkpoint_every``)."""
    if keep_every is not None and keep_every % checkpoint_every:
        raise ValueError(f"keep_every ({keep_every}) must be a multiple of checkpoint_every ({checkpoint_every})")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / f"{name}.ckpt"
    net.to(device)
    optimizer = torch.optim.AdamW(param_groups or net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    step, history = 0, []
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        net.load_state_dict(state["model"])
        if int(state["step"]) >= steps:  # finished: nothing to resume (such a checkpoint may hold weights only)
            net.eval()
            return int(state["step"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step = int(state["step"])
        history = json.loads((run_dir / f"{name}.history.json").read_text()) if \
            (run_dir / f"{name}.history.json").exists() else []
        log(f"[{name}] resumed at step {step}")
    net.train()
    t0, loss_sum = time.time(), 0.0
    batches = BatchStream(make_batch, range(step, steps), workers)
    try:
        while step < steps:
            if cancel is not None and cancel():
                break
            loss = train_step(net, optimizer, next(batches), device)
            schedule.step()
            step += 1
            loss_sum += loss
            if step % 10 == 0 or step == steps:
                history.append({"step": step, "loss": loss_sum / 10, "seconds": round(time.time() - t0, 1)})
                log(f"[{name}] step {step}/{steps} loss {loss_sum / 10:.4f} ({time.time() - t0:.0f} s)")
                loss_sum = 0.0
            if step % checkpoint_every == 0 or step == steps:
                _save_checkpoint(ckpt, {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                        "schedule": schedule.state_dict(), "step": step})
                (run_dir / f"{name}.history.json").write_text(json.dumps(history))
                if keep_every and step % keep_every == 0:
                    _save_checkpoint(run_dir / f"{name}.step{step}.ckpt", {"model": net.state_dict(), "step": step})
    finally:
        batches.close()
    net.eval()
    return step


# ----------------------------------------------------------------------------------------------
# Lesion classifier (three orthogonal patches through each lesion: descriptors + stage-2 pixel types)
# ----------------------------------------------------------------------------------------------
def lesion_view_inputs(x_cube, prior_cube, mask_cube, half):
    """Stage-2 inputs and lesion masks of the three orthogonal patches through the cube's centre."""
    inputs, masks = [], []
    for view in VIEWS:
        xv, pv, mv = to_view(x_cube, view), to_view(prior_cube, view), to_view(mask_cube, view)
        c = xv.shape[0] // 2
        inputs.append(np.concatenate([xv[c - half:c + half + 1], pv[c:c + 1]]))
        masks.append(mv[c:c + 1].astype(np.float32))
    return np.stack(inputs), np.stack(masks)  # (3, C, P, P), (3, 1, P, P)


@torch.no_grad()
def lesion_view_vectors(stage2: UNet2p5D, inputs, masks, device, kind: str):
    """Per view: mean stage-2 type probabilities inside the lesion mask, after the patch evidence of
    ``kind`` (CascadeConfig.classifier_features): intensity/shape descriptors of the centre slice, or
    the encoder's pooled features.

    inputs (N*3, C, P, P), masks (N*3, 1, P, P) -> list of 3 tensors (N, D) in VIEWS order.
    """
    x = torch.as_tensor(inputs, device=device)
    m = torch.as_tensor(masks, device=device)
    skips = stage2.encoder(x)
    probs = stage2.decoder(skips).float().softmax(1)[:, STAGE2_FIRST_LESION:]
    type_probs = (probs * m).sum((2, 3)) / (probs * m).sum((1, 2, 3)).clamp(min=1e-6)[:, None]
    if kind == "descriptors":
        centre = (inputs.shape[1] - 2) // 2  # channels: the slab's slices, then the liver prior
        patch = torch.as_tensor(np.stack([lesion_view_descriptors(image[centre], mask[0])
                                          for image, mask in zip(inputs, masks)]), device=device)
    else:
        patch = LesionClassifierHead.pooled([s.float() for s in skips], m)
    vec = torch.cat([patch, type_probs], dim=1)
    vec = vec.view(-1, 3, vec.shape[1])
    return [vec[:, v] for v in range(3)]


def lesion_core(mask, rng, max_depth_fraction=0.5):
    """The lesion without a random outer layer, as stage 2 segments it: its lesions hold a median 0.35
    of the reference volume on the validation phantoms, mostly missing the rim. A classifier fitted on
    reference masks alone took such metastasis cores for cysts. The whole mask when the core would
    leave one of the three centre planes."""
    depth = ndimage.distance_transform_edt(mask)
    core = depth > rng.uniform(0, max_depth_fraction) * depth.max()
    c = mask.shape[0] // 2
    return core if core[c].any() and core[:, c].any() and core[:, :, c].any() else mask


def classifier_samples(stage2, cfg: CascadeConfig, source, count, rng, device, log=print, core_fraction=0.5):
    """Feature vectors and type labels for ``count`` phantom lesions; a ``core_fraction`` of them seen
    through their core only (lesion_core)."""
    size = cfg.classifier_patch
    half = (cfg.stage2.in_channels - 1) // 2
    pad = 5
    spacing = np.asarray(cfg.stage2_spacing)
    features, labels, t0 = [], [], time.time()
    while len(labels) < count:
        phantom = source.get()
        if not phantom.lesions:
            continue
        lesion = phantom.lesions[rng.integers(len(phantom.lesions))]
        n = size + 2 * pad
        grid = block_grid(lesion.blob.center + rng.normal(0, 1.0, 3), spacing, (n, n, n))
        hu, tissue, instances = ph.render(phantom, grid, rng)
        crop = (slice(pad, pad + size),) * 3
        x = normalize_hu(_intensity_augment(hu, rng), cfg.hu_window)[crop]
        prior = _liver_prior(np.isin(tissue, LIVER_TISSUES), rng, spacing[0], tissue)[crop]
        mask = instances[crop] == lesion.lesion_id
        if mask[size // 2].sum() == 0 or mask[:, size // 2].sum() == 0 or mask[:, :, size // 2].sum() == 0:
            continue  # lesion clipped away at its nominal centre
        if rng.random() < core_fraction:
            mask = lesion_core(mask, rng)
        inputs, masks = lesion_view_inputs(x, prior, mask, half)
        features.append(torch.cat(lesion_view_vectors(stage2, inputs, masks, device, cfg.classifier_features),
                                  dim=1).cpu())
        labels.append(LESION_TYPES.index(lesion.lesion_type))
        if len(labels) % 100 == 0:
            log(f"[classifier] {len(labels)}/{count} lesion samples ({time.time() - t0:.0f} s)")
    return torch.cat(features), torch.tensor(labels)


NOT_A_LESION = len(LESION_TYPES)  # label of a reported lesion that matches no reference lesion


def engine_lesion_samples(engine, cases, log=print, include_false=False):
    """Classifier inputs and reference types of the lesions the engine itself reports on (case id, CTVolume,
    truth) triples, under its lesion rule and candidate filter: the masks the head types in use, which reference
    masks and their random cores (``classifier_samples``) only approximate. A lesion counts where the evaluation's
    one-to-one matching pairs it with a reference lesion of a known type; ``include_false``: the reported lesions
    it matches with none count too, labelled NOT_A_LESION (samples for telling false lesions apart).

    -> (features (N, D), labels (N,), per-lesion {"case_id", "gt_long_axis_mm", "pred_type"} list (false lesions:
    "gt_long_axis_mm" None, "overlaps_reference": whether any voxel is a reference lesion's), evaluate_case metrics
    of every case)."""
    from .evaluation import evaluate_case
    from .records import SegmentationResult

    features, labels, lesions, metrics, t0 = [], [], [], [], time.time()
    for case_id, ct, truth in cases:
        outputs = engine.run_networks(ct)
        result = outputs if isinstance(outputs, SegmentationResult) else engine.lesions_from(outputs,
                                                                                               keep_features=True)
        case_metrics = evaluate_case(result.as_prediction(), truth, ct.ijk_to_ras, case_id)
        metrics.append(case_metrics)
        for match in case_metrics["matches"]:
            if match["gt_type"] in LESION_TYPES:
                features.append(result.lesion_features[match["pred_id"]])
                labels.append(LESION_TYPES.index(match["gt_type"]))
                lesions.append({"case_id": case_id, "gt_long_axis_mm": match["gt_long_axis_mm"],
                                "pred_type": match["pred_type"]})
        reported_types = {r.lesion_id: r.lesion_type for r in result.lesions}
        for lesion_id in case_metrics["false_positive_ids"] if include_false else ():
            features.append(result.lesion_features[lesion_id])
            labels.append(NOT_A_LESION)
            in_lesion = truth["lesion_instances"][result.lesion_instances == lesion_id]
            lesions.append({"case_id": case_id, "gt_long_axis_mm": None, "overlaps_reference": bool(in_lesion.any()),
                            "pred_type": reported_types[lesion_id]})
        log(f"[classifier] {case_id}: {len(labels)} lesion samples so far ({time.time() - t0:.0f} s)")
    size = 3 * LesionClassifierHead.view_size(engine.config)
    return (torch.stack(features) if features else torch.zeros(0, size), torch.tensor(labels, dtype=torch.long),
            lesions, metrics)


# heads fitted on the engine's own lesions (engine_lesion_samples), tried by benchmarks/classifier_candidate.py:
# the parent's head fine-tuned for n epochs (finetune.refit_head), each also blended halfway with the parent's, or
# a head fitted from scratch
ENGINE_HEAD_RECIPES = ("refit_20", "refit_20_blend_0.5", "refit_60", "refit_60_blend_0.5", "refit_150",
                       "refit_150_blend_0.5", "scratch")
# each lesion cut down to its main body with a ball of this radius (v5.12: chosen on 48 pool phantoms, adopted on
# 24 judge and 96 fresh ones; benchmarks/lesion_appendage_candidate.py). The filter judges whole components, so
# tuning it does not depend on the radius
LESION_APPENDAGE_RADIUS_MM = 2.5
ENGINE_HEAD_RECIPE = "refit_60"  # v5.5's, chosen on the pool (benchmarks/results/candidate_v5.5.json)


def engine_lesion_head(recipe: str, parent: LesionClassifierHead, cfg: CascadeConfig, features, labels):
    """The head of ``recipe`` (ENGINE_HEAD_RECIPES) fitted on engine lesion samples; the parent's temperature
    (fit it afterwards: fit_temperature)."""
    from .finetune import blend_heads, refit_head

    if recipe == "scratch":
        torch.manual_seed(0)
        head = LesionClassifierHead(cfg)
        head.feature_mean.copy_(features.mean(0))
        head.feature_std.copy_(features.std(0).clamp(min=1e-4))
        head.temperature.copy_(parent.temperature)
        return train_head(head, features, labels, 400, lr=1e-3, batch=64)
    if recipe not in ENGINE_HEAD_RECIPES:
        raise ValueError(f"unknown head recipe {recipe!r}; one of {ENGINE_HEAD_RECIPES}")
    refit = refit_head(parent, features, labels, int(recipe.split("_")[1]), seed=0).eval()
    return blend_heads(parent, refit, 0.5) if recipe.endswith("_blend_0.5") else refit


def fresh_phantom_cases(seed_base, count, max_in_plane=None, domain=None):
    """(case id, CTVolume, truth) of ``count`` phantoms generated in memory, seeds ``seed_base`` upwards."""
    for seed in range(seed_base, seed_base + count):
        ct, truth = ph.generate_phantom_ct(seed, max_in_plane=max_in_plane, domain=domain)
        yield f"phantom_{seed}", ct, {"liver_mask": truth.liver_mask, "lesion_instances": truth.lesion_instances,
                                      "lesion_types": truth.lesion_types}


def fit_head_on_engine_lesions(model_dir, recipe, phantoms, calibration_dir, device="auto", threads=None, log=print,
                               precision="fp32", max_in_plane=384):
    """The classifier head of the model at ``model_dir`` fitted by ``recipe`` (ENGINE_HEAD_RECIPES) on the lesions
    its engine reports on ``phantoms`` fresh training phantoms (every candidate), its temperature fitted on the
    engine's lesions of the phantom cases in ``calibration_dir`` (the model's own filter). -> (state dict, info)."""
    from .datasets import find_cases
    from .engine import LiverLesionEngine

    engine = LiverLesionEngine(model_dir, device=device, threads=threads, precision=precision)
    cfg = engine.config
    own_filter = cfg.candidate_filter
    cfg.set_candidate_filter(FILTER_OFF)
    try:
        features, labels, _, _ = engine_lesion_samples(
            engine, fresh_phantom_cases(ENGINE_LESION_SEED_BASE, phantoms, max_in_plane), log)
    finally:
        cfg.set_candidate_filter(own_filter)
    if len(labels) == 0:
        raise ValueError(f"the engine matched no lesion on {phantoms} training phantoms: no head to fit")
    calibration = ((c.case_id, c.load_image(), c.load_truth()) for c in find_cases(calibration_dir))
    cal_features, cal_labels, _, _ = engine_lesion_samples(engine, calibration, log)
    head = engine_lesion_head(recipe, engine.classifier, cfg, features, labels).eval()
    with torch.no_grad():
        head.temperature.fill_(fit_temperature(head.logits(cal_features), cal_labels))
        accuracy = {name: float((h.eval().logits(cal_features).argmax(1) == cal_labels).float().mean())
                    for name, h in (("parent_head", engine.classifier), ("head", head))}
    info = {"recipe": recipe, "lesions": len(labels), "phantoms": phantoms, "seed_base": ENGINE_LESION_SEED_BASE,
            "temperature": float(head.temperature), "calibration_lesions": len(cal_labels),
            "calibration_accuracy": accuracy}
    log(f"[classifier] fitted on engine lesions: {info}")
    return head.state_dict(), info


def train_head(head: LesionClassifierHead, features, labels, epochs, lr, batch):
    """Cross-entropy epochs over (features, labels); standardisation and temperature untouched."""
    opt = torch.optim.AdamW(head.mlp.parameters(), lr=lr, weight_decay=1e-3)
    for _ in range(epochs):
        head.train()
        perm = torch.randperm(len(labels))
        for start in range(0, len(perm), batch):
            idx = perm[start:start + batch]
            loss = F.cross_entropy(head.logits(features[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    return head


# Up to v5 the grid ended at 3.0 and v5's fit sat on that edge, showing 23% of lesions as 1.00; refitted on
# held-out lesions its temperature is 3.8 (benchmarks/results/classifier_calibration_v5.json).
TEMPERATURE_GRID = torch.linspace(0.5, 12.0, 116)


@torch.no_grad()
def fit_temperature(logits, labels) -> float:
    """The calibration temperature with the lowest negative log-likelihood of ``labels``."""
    nll = torch.stack([F.cross_entropy(logits / t, labels) for t in TEMPERATURE_GRID])
    return float(TEMPERATURE_GRID[nll.argmin()])


def expected_calibration_error(probs, labels, bins=10) -> float:
    """Mean |accuracy - confidence| over confidence bins, weighted by the bins' share of lesions."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    error = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            error += float(inside.float().mean() * (correct[inside].mean() - confidence[inside].mean()).abs())
    return error


def fit_classifier(features, labels, cfg: CascadeConfig, rng, epochs=400, log=print):
    """Train the head on 85% of the samples; fit a temperature on the other 15% (calibration)."""
    torch.manual_seed(int(rng.integers(1 << 30)))
    n = len(labels)
    order = torch.from_numpy(rng.permutation(n))
    n_val = max(1, int(0.15 * n))
    val, tr = order[:n_val], order[n_val:]
    head = LesionClassifierHead(cfg)
    head.feature_mean.copy_(features[tr].mean(0))
    head.feature_std.copy_(features[tr].std(0).clamp(min=1e-4))
    train_head(head, features[tr], labels[tr], epochs, lr=1e-3, batch=64)
    with torch.no_grad():
        logits = head.logits(features[val])
        temperature = fit_temperature(logits, labels[val])
        accuracy = float((logits.argmax(1) == labels[val]).float().mean())
    log(f"[classifier] validation accuracy {accuracy:.3f}, temperature {temperature:.2f}")
    head.temperature.fill_(temperature)
    return head, {"validation_accuracy": accuracy, "temperature": temperature, "samples": n,
                  "features": cfg.classifier_features}


# ----------------------------------------------------------------------------------------------
# Stages as commands
# ----------------------------------------------------------------------------------------------
STAGE_CYCLES = ("", "_restart", "_bank")  # a stage's cycles in training order (stage 1 has no bank cycle)


def final_checkpoint(run_dir, part: str, before: str | None = None) -> Path:
    """The checkpoint of ``part`` ("stage1", "stage2") the model is assembled from: its last cycle trained
    (STAGE_CYCLES), or its last before cycle ``before`` (the parent of that cycle)."""
    run_dir = Path(run_dir)
    cycles = STAGE_CYCLES[:STAGE_CYCLES.index(before)] if before else STAGE_CYCLES
    for cycle in reversed(cycles):
        if (run_dir / f"{part}{cycle}.ckpt").exists():
            return run_dir / f"{part}{cycle}.ckpt"
    return run_dir / f"{part}.ckpt"


def train_stage(stage: str, run_dir, steps: int, device="auto", threads=None, log=print, batch=16,
                seed_offset=0, classifier_lesions=3000, domain=None, workers=0, bank_batches=2400,
                bank_thick_fraction=0.0):
    """Train one stage into ``run_dir`` (resumable): "stage1", "stage2", "stage1_restart",
    "stage2_restart", "stage2_bank" or "classifier".

    A "_restart" is a warm restart: a second cosine cycle (peak RESTART_LR) from the first cycle's
    weights, on phantoms the first never drew (of the current generator). Measured for the shipped
    models: stage 2's raised validation detection F1 0.491 -> 0.566; stage 1's on phantoms 1.1 (liver
    against the wall muscle) raised the real-CT liver Dice 0.905 -> 0.917 (README, Shipped model).
    "stage2_bank" is stage 2's third cycle, from its last one's weights: a long one (peak RESTART_LR) drawing
    each step's slabs at random from a bank of ``bank_batches`` batches rendered once (in ``workers``
    processes) into the run's stage2_bank_slabs folder (3.7 GB for 2400). 14,000 steps lifted v5.12's fit of
    held-out metastasis sections 24% -> 66% and hemangioma sections 4% -> 53% (README, "Stage 2 can learn
    metastases and hemangiomas"); its lesion rule is then chosen again (build_model). ``bank_thick_fraction`` of
    the bank's blocks are rendered as CTs of thick slices resampled onto stage 2's grid (stage2_batch)."""
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device)
    cfg = CascadeConfig()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    stage_seeds = {"stage1": 1, "stage2": 2, "classifier": 3, "stage2_restart": 4, "stage1_restart": 5,
                   "stage2_bank": 6}
    if stage not in stage_seeds:
        raise ValueError(f"unknown stage {stage!r}")
    rng = np.random.default_rng(seed_offset + stage_seeds[stage])
    if stage == "stage2_bank":
        parent = final_checkpoint(run_dir, "stage2", before="_bank")
        if not parent.exists():
            raise FileNotFoundError(f"{parent} is missing: train stage2 before its bank cycle")
        done = run_dir / "stage2_bank.ckpt"
        if done.exists() and int(torch.load(done, map_location="cpu", weights_only=True)["step"]) >= steps:
            return  # finished: the bank need not be rendered or read again
        net = UNet2p5D(cfg.stage2)
        net.load_state_dict(torch.load(parent, map_location="cpu", weights_only=True)["model"])
        render_bank(run_dir / "stage2_bank_slabs", bank_batches, workers, cfg, STAGE2_BANK_SEED_BASE + seed_offset,
                    batch, domain, log, thick_fraction=bank_thick_fraction)
        bank = SlabBank(run_dir / "stage2_bank_slabs", bank_batches)
        train_network(net, functools.partial(bank.batch, size=batch), steps, run_dir, stage, device, lr=RESTART_LR,
                      log=log)
    elif stage != "classifier":
        part = stage.removesuffix("_restart")
        net = UNet2p5D(getattr(cfg, part))
        seed_base, lr = STAGE_SEED_BASES[part] + seed_offset, 2e-3
        if stage != part:
            if not (run_dir / f"{part}.ckpt").exists():
                raise FileNotFoundError(f"{run_dir / (part + '.ckpt')} is missing: train {part} before its restart")
            net.load_state_dict(torch.load(run_dir / f"{part}.ckpt", map_location="cpu", weights_only=True)["model"])
            seed_base, lr = seed_base + RESTART_SEED_OFFSET, RESTART_LR
        # stage 1 sees each phantom in more blocks: a 3 mm block is cheap to render
        make_batch = functools.partial(training_batch, part, seed_base, 4 if part == "stage1" else 2, batch, domain)
        train_network(net, make_batch, steps, run_dir, stage, device, lr=lr, log=log, workers=workers)
    elif stage == "classifier":
        stage2 = UNet2p5D(cfg.stage2).to(device)
        stage2_ckpt = torch.load(final_checkpoint(run_dir, "stage2"), map_location=device, weights_only=True)
        stage2.load_state_dict(stage2_ckpt["model"])
        stage2.eval()
        source = PhantomSource(TRAIN_SEED_BASE + 400_000 + seed_offset, reuse=3, domain=domain)
        features, labels = classifier_samples(stage2, cfg, source, classifier_lesions, rng, device, log)
        head, info = fit_classifier(features, labels, cfg, rng, log=log)
        info["stage2"] = _checkpoint_id(run_dir, stage2_ckpt)
        _save_checkpoint(run_dir / "classifier.ckpt", {"model": head.state_dict(), "info": json.dumps(info)})


def _checkpoint_id(run_dir, payload) -> str:
    """Which stage-2 weights a classifier was fitted on, e.g. "stage2_restart@1500"."""
    return f"{final_checkpoint(run_dir, 'stage2').stem}@{int(payload['step'])}"


def classifier_is_current(run_dir) -> bool:
    """True when the run's classifier was fitted on its final stage-2 weights, with the lesion features
    of the current configuration (a classifier from before a warm restart, from a run that predates
    this record, or on pooled encoder features, must be fitted again)."""
    run_dir = Path(run_dir)
    if not (run_dir / "classifier.ckpt").exists():
        return False
    info = json.loads(torch.load(run_dir / "classifier.ckpt", weights_only=True)["info"])
    stage2 = torch.load(final_checkpoint(run_dir, "stage2"), map_location="cpu", weights_only=True)
    return (info.get("stage2") == _checkpoint_id(run_dir, stage2)
            and info.get("features", "encoder") == CascadeConfig().classifier_features)


def assemble_model(run_dir, model_dir, card_extra: dict | None = None, config_overrides: dict | None = None,
                   classifier_ckpt: Path | None = None):
    """Combine the stage checkpoints of ``run_dir`` into a model folder (safetensors + card); the classifier
    head from ``classifier_ckpt`` when given (e.g. the head fitted on engine lesions)."""
    from .model_io import save_model
    from .phantom import GENERATOR_VERSION

    run_dir = Path(run_dir)
    cfg = CascadeConfig.from_dict({**json.loads((run_dir / "config.json").read_text()), **(config_overrides or {})})
    state, steps = {}, {}
    for part in ("stage1", "stage2", "classifier"):
        ckpt = (classifier_ckpt or run_dir / "classifier.ckpt") if part == "classifier" else \
            final_checkpoint(run_dir, part)
        if not ckpt.exists():
            if part == "classifier":  # untrained head: pixel evidence only would be a different model
                head = LesionClassifierHead(cfg)
                state.update({f"classifier.{k}": v for k, v in head.state_dict().items()})
                continue
            raise FileNotFoundError(f"{ckpt} is missing: train {part} first")
        payload = torch.load(ckpt, map_location="cpu", weights_only=True)
        state.update({f"{part}.{k}": v for k, v in payload["model"].items()})
        steps[part] = int(payload.get("step", 0))
        if part != "classifier":  # every cycle up to the last, in order
            for cycle in STAGE_CYCLES[:STAGE_CYCLES.index(ckpt.stem.removeprefix(part)) + 1]:
                if (run_dir / f"{part}{cycle}.ckpt").exists():
                    steps[f"{part}{cycle}"] = int(torch.load(run_dir / f"{part}{cycle}.ckpt", map_location="cpu",
                                                             weights_only=True)["step"])
    card = {"name": "LiverLesionAI cascade", "architecture": cfg.to_dict(), "generator_version": GENERATOR_VERSION,
            "seeds": {"train_base": TRAIN_SEED_BASE, "validation_base": VALIDATION_SEED_BASE,
                      "test_base": TEST_SEED_BASE},
            "training_steps": steps}
    card.update(card_extra or {})
    return save_model(model_dir, state, card)


def shipped_lesion_rule(tuning: dict) -> dict:
    """The lesion rule a built model's card carries: ``tune_candidate_filter``'s threshold, hole filling and
    filter, and each lesion cut down to its main body (LESION_APPENDAGE_RADIUS_MM)."""
    return {**{k: tuning[k] for k in ("lesion_threshold", "fill_liver_holes", *FILTER_OFF)},
            "lesion_appendage_radius_mm": LESION_APPENDAGE_RADIUS_MM}


def build_model(run_dir, model_out, steps1=2000, steps2=1500, classifier_lesions=3000, device="auto", threads=None,
                test_seeds=range(20), real_case=None, version="1.0.0", log=print, test_max_in_plane=None,
                validation_cases=48, steps1_restart=0, steps2_restart=0, engine_head_phantoms=0,
                engine_head_recipe=ENGINE_HEAD_RECIPE, workers=0, steps2_bank=0, bank_batches=2400,
                bank_thick_fraction=0.0):
    """Rebuild a shipped-style model from scratch: train all stages (resumable; the networks' batches rendered
    in ``workers`` processes when > 0), assemble, choose the lesion rule on validation phantoms, fit the
    classifier head on the engine's own lesions of ``engine_head_phantoms`` training phantoms (0: keep the head
    fitted on reference masks), evaluate on the held-out phantom test set (and optionally a real case), and
    write the model with its card."""
    import shutil
    import tempfile

    from .cli import evaluate_model_or_predictions
    from .datasets import write_phantom_case
    from .errors import OutputError

    run_dir, model_out = Path(run_dir), Path(model_out)
    if model_out.exists():
        raise FileExistsError(f"{model_out} exists; LiverLesionAI never overwrites a model.")
    check_thick_fraction(bank_thick_fraction)  # now, not after hours of stages 1 and 2
    train_stage("stage1", run_dir, steps1, device, threads, log, workers=workers)
    if steps1_restart:
        train_stage("stage1_restart", run_dir, steps1_restart, device, threads, log, workers=workers)
    train_stage("stage2", run_dir, steps2, device, threads, log, workers=workers)
    if steps2_restart:
        train_stage("stage2_restart", run_dir, steps2_restart, device, threads, log, workers=workers)
    if steps2_bank:
        train_stage("stage2_bank", run_dir, steps2_bank, device, threads, log, workers=workers,
                    bank_batches=bank_batches, bank_thick_fraction=bank_thick_fraction)
    if not classifier_is_current(run_dir):
        train_stage("classifier", run_dir, 0, device, threads, log, classifier_lesions=classifier_lesions)
    def phantom_set(folder, base, seeds):
        folder.mkdir(exist_ok=True)
        for seed in seeds:
            if not (folder / f"phantom_{seed:05d}").exists():
                try:
                    write_phantom_case(folder / f"phantom_{seed:05d}", base + seed, max_in_plane=test_max_in_plane)
                except OutputError:
                    pass  # written meanwhile by another process: cases appear atomically
        return folder

    # the rule and filter are chosen here: 24 phantoms (~30 true lesions) were over-fitted by v5.2's choice
    validation_dir = phantom_set(run_dir / "phantom_validation", VALIDATION_SEED_BASE, range(validation_cases))
    test_dir = phantom_set(run_dir / "phantom_testset", TEST_SEED_BASE, test_seeds)
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=model_out.parent))
    try:
        assemble_model(run_dir, staging / "untuned", {"version": version})
        # float32 throughout: the card's figures must not depend on the CPU's bfloat16 support
        tuning = tune_candidate_filter(staging / "untuned", validation_dir, device, threads, log, precision="fp32")
        overrides = shipped_lesion_rule(tuning)
        assemble_model(run_dir, staging / "m", {"version": version}, overrides)
        info = json.loads(torch.load(run_dir / "classifier.ckpt", weights_only=True)["info"])
        tuned, head_ckpt = staging / "m", None
        if engine_head_phantoms:
            head_ckpt = run_dir / "classifier_engine.ckpt"
            key = json.dumps({"classifier": info, "rule": overrides, "recipe": engine_head_recipe,
                              "phantoms": engine_head_phantoms, "max_in_plane": test_max_in_plane}, sort_keys=True)
            saved = torch.load(head_ckpt, weights_only=True) if head_ckpt.exists() else None
            if saved is None or saved["key"] != key:  # resumes only the head of this very rule and recipe
                head_state, head_info = fit_head_on_engine_lesions(
                    tuned, engine_head_recipe, engine_head_phantoms, validation_dir, device, threads, log,
                    max_in_plane=test_max_in_plane)
                _save_checkpoint(head_ckpt, {"model": head_state, "info": json.dumps(head_info), "key": key})
            else:
                head_info = json.loads(saved["info"])
            info = {**info, "engine_lesion_head": head_info, "temperature": head_info["temperature"]}
            tuned = staging / "m_head"
            assemble_model(run_dir, tuned, {"version": version}, overrides, head_ckpt)
        metrics = {"phantom_test": _card_metrics(evaluate_model_or_predictions(tuned, test_dir, device,
                                                                               threads, log, precision="fp32")),
                   "candidate_filter_tuning": tuning}
        metrics["phantom_test"]["seeds"] = [TEST_SEED_BASE + s for s in test_seeds]
        if real_case:
            metrics["real_case"] = _card_metrics(evaluate_model_or_predictions(tuned, real_case, device,
                                                                               threads, log, precision="fp32"))
        hyperparameters = {"batch": 16, "lr": 2e-3, "optimizer": "AdamW",
                           "loss": "Dice + inverse-lesion-size weighted CE",
                           "steps": {"stage1": steps1, "stage1_restart": steps1_restart, "stage2": steps2,
                                     "stage2_restart": steps2_restart, "stage2_bank": steps2_bank},
                           "bank_batches": bank_batches if steps2_bank else 0,
                           "bank_thick_fraction": bank_thick_fraction if steps2_bank else 0.0,
                           "restart_lr": RESTART_LR, "classifier_lesions": classifier_lesions,
                           "engine_head_phantoms": engine_head_phantoms, "engine_head_recipe": engine_head_recipe}
        return assemble_model(run_dir, model_out, config_overrides=overrides, classifier_ckpt=head_ckpt,
                              card_extra={"version": version, "metrics": metrics, "classifier": info,
                                          "hyperparameters": hyperparameters})
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# the great-vessel rules (CascadeConfig.great_vessel_*) candidate v5.10 chose from on 48 pool phantoms
# (benchmarks/liver_vessel_candidate.py; not adopted: it took true liver out of the real case)
GREAT_VESSEL_RULES = tuple({"great_vessel_radius_mm": r, "great_vessel_min_hu_above_liver": hu, "great_vessel_rim": rim}
                           for r in (3.0, 4.0, 5.0) for hu in (15.0, 20.0) for rim in (False, True))


def great_vessel_rule_name(rule: dict | None) -> str:
    if not rule or rule.get("great_vessel_radius_mm") is None:
        return "off"
    return (f"r{rule['great_vessel_radius_mm']:g}_hu{rule['great_vessel_min_hu_above_liver']:g}"
            + ("_rim" if rule["great_vessel_rim"] else ""))


def liver_dice_by_great_vessel_rule(engine, ct, truth, rules) -> dict:
    """{rule name: {"liver_dice", "lesions_unchanged"}} of one case (CTVolume, truth dict) under each rule (None:
    off), stage 1 and 2 run once; "lesions_unchanged": the lesion instances are the first rule's. The engine's
    config is left as it was."""
    from .evaluation import dice
    from .records import SegmentationResult

    reference = (truth["liver_mask"] != 0) | (truth["lesion_instances"] != 0)
    outputs = engine.run_networks(ct)
    config = engine.config
    saved = {k: getattr(config, k) for k in GREAT_VESSEL_RULES[0]}
    row, lesions = {}, None
    try:
        for rule in rules:
            for k, v in (rule or {**saved, "great_vessel_radius_mm": None}).items():
                setattr(config, k, v)
            result = outputs if isinstance(outputs, SegmentationResult) else engine.lesions_from(outputs,
                                                                                                 classify=False)
            lesions = result.lesion_instances if lesions is None else lesions
            row[great_vessel_rule_name(rule)] = {
                "liver_dice": dice((result.liver_mask != 0) | (result.lesion_instances != 0), reference),
                "lesions_unchanged": bool(np.array_equal(lesions, result.lesion_instances))}
    finally:
        for k, v in saved.items():
            setattr(config, k, v)
    return row


def mean_liver_dice_by_rule(rows: list[dict]) -> dict:
    """Per rule name over ``liver_dice_by_great_vessel_rule`` rows: mean liver Dice, the cases that lost more than
    0.005 against "off" (where measured), and whether every case's lesions stayed unchanged."""
    def lower(name):
        return int(sum(r[name]["liver_dice"] < r["off"]["liver_dice"] - 0.005 for r in rows)) if "off" in rows[0] \
            else None

    names = [k for k in rows[0] if k != "case_id"]
    return {name: {"mean_liver_dice": float(np.mean([r[name]["liver_dice"] for r in rows])),
                   "cases_liver_dice_lower_by_0.005": lower(name),
                   "lesions_unchanged": all(r[name]["lesions_unchanged"] for r in rows)} for name in names}


def choose_great_vessel_rule(means: dict, rules=GREAT_VESSEL_RULES, include_off=True) -> dict | None:
    """The rule of highest mean liver Dice (``mean_liver_dice_by_rule``); ties: off, then the larger radius, the
    higher HU, the rim off. None: off."""
    candidates = ([None] if include_off else []) + list(rules)

    def rank(rule):
        score = round(means[great_vessel_rule_name(rule)]["mean_liver_dice"], 6)
        if rule is None:
            return score, 1, 0.0, 0.0, 1
        return (score, 0, rule["great_vessel_radius_mm"], rule["great_vessel_min_hu_above_liver"],
                int(not rule["great_vessel_rim"]))
    return max(candidates, key=rank)


def _card_metrics(summary):
    keep = ("mean_liver_dice", "global_lesion_dice", "detection", "detection_by_size", "type_accuracy",
            "type_confusion", "n_cases")
    return {k: summary[k] for k in keep if k in summary}


def candidate_evidence(engine, cases):
    """Every lesion candidate's evidence (engine._lesion_candidates) and whether it is a true positive, on
    (case id, CTVolume, truth) triples, plus the count of missed reference lesions. The engine's candidate filter is off meanwhile
    (a filter is chosen on every candidate) and left as it was."""
    threshold = engine.config.lesion_threshold
    return candidate_evidence_by_threshold(engine, cases, [threshold])[threshold]


def candidate_evidence_by_threshold(engine, cases, lesion_thresholds):
    """``candidate_evidence`` under each lesion threshold ({threshold: evidence}); the thresholds share one
    network pass per case, and lesions are not typed (detection does not need it). The engine's threshold
    and filter are left as they were."""
    from .evaluation import evaluate_case
    from .records import SegmentationResult

    cfg = engine.config
    current_threshold, current_filter = cfg.lesion_threshold, cfg.candidate_filter
    cfg.set_candidate_filter(FILTER_OFF)  # every candidate
    found = {t: [] for t in lesion_thresholds}  # (lesion evidence, evaluate_case metrics) per case
    try:
        for case_id, ct, truth in cases:
            outputs = engine.run_networks(ct)
            for threshold in lesion_thresholds:
                engine.config.lesion_threshold = threshold
                result = outputs if isinstance(outputs, SegmentationResult) else \
                    engine.lesions_from(outputs, classify=False)
                metrics = evaluate_case(result.as_prediction(), truth, ct.ijk_to_ras, case_id)
                found[threshold].append((result.lesion_evidence, metrics))
    finally:
        cfg.lesion_threshold = current_threshold
        cfg.set_candidate_filter(current_filter)
    return {t: evidence_of(runs) for t, runs in found.items()}


def evidence_of(runs):
    """``candidate_evidence`` from (lesion evidence of a result made without a candidate filter, its
    ``evaluate_case`` metrics) pairs: ({evidence key: array over candidates}, true positive?, missed)."""
    evidence, is_tp, missed = {key: [] for key in EVIDENCE_KEYS}, [], 0
    for lesion_evidence, metrics in runs:
        matched = {m["pred_id"] for m in metrics["matches"]}
        missed += metrics["detection"]["fn"]
        for lesion_id, values in lesion_evidence.items():
            for key in EVIDENCE_KEYS:
                evidence[key].append(values[key])
            is_tp.append(lesion_id in matched)
    return {key: np.array(v, float) for key, v in evidence.items()}, np.array(is_tp, bool), missed


def filtered_prediction(result, thresholds: dict) -> dict:
    """``result.as_prediction()`` keeping only the candidates that pass the filter ``thresholds``; ``result``
    was made without one. Dropped candidates become liver, as in the engine, which differs from this at most
    where a dropped candidate touched a kept one. One network pass thus serves both choosing a filter and
    measuring it."""
    prediction = result.as_prediction()
    dropped = [i for i, e in result.lesion_evidence.items() if not passes_candidate_filter(e, thresholds)]
    if not dropped:
        return prediction
    gone = np.isin(prediction["lesion_instances"], dropped)
    return {"liver_mask": np.where(gone, 1, prediction["liver_mask"]).astype(np.uint8),
            "lesion_instances": np.where(gone, 0, prediction["lesion_instances"]).astype(np.uint16),
            "lesion_types": {i: t for i, t in prediction["lesion_types"].items() if i not in dropped}}


# the thresholds choose_candidate_filter tries, each grid's most permissive value first
FILTER_GRID = {"min_lesion_confidence": tuple(round(c, 2) for c in np.arange(0.0, 0.96, 0.05)),
               "max_surface_fraction": tuple(round(m, 2) for m in np.arange(1.0, 0.19, -0.1))}


def filtered_detection(evidence, thresholds: dict) -> dict:
    """Detection counts and F1 of the candidates of ``candidate_evidence`` that pass the filter ``thresholds``."""
    values, is_tp, missed = evidence
    passing = passes_candidate_filter(values, thresholds)
    tp, fp = int((passing & is_tp).sum()), int((passing & ~is_tp).sum())
    fn = missed + int(is_tp.sum()) - tp
    return {"tp": tp, "fp": fp, "fn": fn, "f1": 2 * tp / max(2 * tp + fp + fn, 1)}


def choose_candidate_filter(evidence, log=print):
    """The lesion candidate filter thresholds (FILTER_GRID) that maximise detection F1 on the candidates of
    ``candidate_evidence``; ties go to the most permissive (confidence first, then surface)."""
    is_tp = evidence[1]

    def f1(thresholds):
        return filtered_detection(evidence, thresholds)["f1"]

    keys = list(FILTER_GRID)
    grid = [dict(zip(keys, combo)) for combo in itertools.product(*FILTER_GRID.values())]
    scores = [round(f1(t), 4) for t in grid]
    best = grid[max(range(len(grid)), key=lambda i: (scores[i], -i))]  # the grid runs strictest last
    log(f"[filter] validation detection F1 {f1(FILTER_OFF):.3f} -> {f1(best):.3f} with min confidence "
        f"{best['min_lesion_confidence']}, max surface fraction {best['max_surface_fraction']} ({len(is_tp)} candidates)")
    return {**{k: float(v) for k, v in best.items()}, "validation_f1_unfiltered": f1(FILTER_OFF),
            "validation_f1": f1(best), "candidates": int(len(is_tp))}


# lesion thresholds on the summed type probabilities that build_model tries, strictest first (None: the
# per-pixel argmax of models up to v5.1), each without and with stage 1's liver holes filled; v5.2's F1 rose
# down to its grid's end (0.2), v5.3's choice on 48 phantoms was 0.15 (benchmarks/lesion_rule_candidate.py)
LESION_THRESHOLDS = (None, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1)
FILL_LIVER_HOLES = (False, True)


def tune_candidate_filter(model_dir, cases_dir, device="auto", threads=None, log=print, precision="auto",
                          lesion_thresholds=LESION_THRESHOLDS, fill_liver_holes=FILL_LIVER_HOLES):
    """The lesion rule (threshold, holes filled) and candidate filter that maximise detection F1 on validation
    phantoms (ties: holes as stage 1 left them, then the stricter threshold), whatever filter the model at
    ``model_dir`` has."""
    from .datasets import find_cases
    from .engine import LiverLesionEngine

    engine = LiverLesionEngine(model_dir, device=device, threads=threads, precision=precision)
    best, f1_by_rule = None, {}
    for fill in fill_liver_holes:  # hole filling changes stage 2's input: one network pass per setting
        engine.config.fill_liver_holes = fill
        cases = ((case.case_id, case.load_image(), case.load_truth()) for case in find_cases(cases_dir))
        evidence = candidate_evidence_by_threshold(engine, cases, lesion_thresholds)
        for threshold in lesion_thresholds:
            rule = ("argmax" if threshold is None else str(threshold)) + (", holes filled" if fill else "")
            log(f"[filter] lesion rule {rule}")
            tuning = choose_candidate_filter(evidence[threshold], log)
            f1_by_rule[rule] = tuning["validation_f1"]
            if best is None or round(tuning["validation_f1"], 4) > round(best["validation_f1"], 4):
                best = {"lesion_threshold": threshold, "fill_liver_holes": fill, **tuning}
    return {**best, "validation_f1_by_lesion_rule": f1_by_rule}
