"""Exploratory: how well stage 2 calls lesion pixels lesion, on the blocks it is trained on and on whole CTs.

Stage 2 calls most visible lesions it misses liver (README, "By conspicuity"). Is that a gap between the trainer's
blocks (rendered straight onto stage 2's 1.25 mm grid, an imitated liver prior) and whole phantom CTs (rendered on
the scanner's grid, resampled, stage 1's prior), or does stage 2 fit its own training distribution no better?

A lesion section is a connected piece of one lesion in one slab's centre slice, of at least 8 pixels (~4 mm
across); per section: its equivalent diameter, its mean summed lesion-type probability and the share of its pixels
at the shipped lesion threshold (0.15). Summaries of all sections, by size, and by reference type and size: the
median mean probability, the share of sections whose mean reaches the shipped filter's confidence (0.4), the share
at least half covered; and the share of liver pixels at 0.15 (the false side). Sources:
- blocks: ``--blocks`` training batches of 16 slabs (all three slab views, as trained) from phantoms no stage
  drew (seeds from BLOCK_SEED_BASE), through the model's stage 2 and through each ``--checkpoint``;
  ``--block-thick-slices 1`` renders them all as CTs of thick slices resampled onto stage 2's grid;
- cases (``--cases``): every axial slice of each case's reference lesions on stage 2's grid, the engine's pass with
  stage 1's liver prior, and again with the reference liver as prior (the engine's ``liver_prior``).

    python benchmarks/stage2_section_fit.py LiverLesionAI/Resources/Models/liverlesionai-v5.12 --blocks 100 \\
        --cases /tmp/v510/pool --every 3 --out benchmarks/results/stage2_section_fit_v5.12.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

BLOCK_SEED_BASE = 1_990_000  # phantoms no training stage, cycle, head fit or other benchmark has drawn
MIN_SECTION_PIXELS = 8
SIZE_BINS_MM = ((4, 10), (10, 20), (20, 40), (40, float("inf")))
TYPE_SIZE_BINS_MM = ((4, 10), (10, 20), (20, float("inf")))
CONFIDENT = 0.4  # the shipped filter's least mean lesion probability
THRESHOLD = 0.15  # the shipped lesion threshold
THICKNESS_GROUPS_MM = {"0.8-1.5 mm": (0.0, 1.6), "2-3 mm": (1.6, 3.1), "5 mm": (3.1, np.inf)}
CONTRAST_BINS_HU = ((-np.inf, -40), (-40, -20), (-20, 0), (0, 20), (20, np.inf))


def sections(lesion_probability, instances, types, spacing_mm, means_of=()):
    """(type index, equivalent diameter mm, mean lesion probability, share at THRESHOLD, then the section's mean of
    each map of ``means_of``) of each lesion section of a slice: each connected piece of each lesion of
    ``instances`` (``types``: lesion id -> type index)."""
    rows = []
    for lesion_id in np.unique(instances[instances > 0]):
        pieces, n = ndimage.label(instances == lesion_id)
        for piece in range(1, n + 1):
            inside = pieces == piece
            area = int(inside.sum())
            if area >= MIN_SECTION_PIXELS:
                p = lesion_probability[inside]
                rows.append((types[int(lesion_id)], 2 * np.sqrt(area * spacing_mm ** 2 / np.pi), float(p.mean()),
                             float((p >= THRESHOLD).mean()), *(float(m[inside].mean()) for m in means_of)))
    return rows


def _fit(table):
    if not len(table):
        return {"sections": 0}
    return {"sections": len(table), "median_mean_probability": round(float(np.median(table[:, 2])), 3),
            "confident_share": round(float(np.mean(table[:, 2] >= CONFIDENT)), 3),
            "half_covered_share": round(float(np.mean(table[:, 3] >= 0.5)), 3)}


def summary(rows, liver_hits, liver_pixels):
    """The fit of all sections, by size, and by reference type and size."""
    from liverlesionai.records import LESION_TYPES

    table = np.array(rows, float).reshape(-1, 4)

    def sized(part, bins):
        return {f"{lo}-{hi:g} mm": _fit(part[(part[:, 1] >= lo) & (part[:, 1] < hi)]) for lo, hi in bins}

    return {"liver_pixels_at_threshold": round(liver_hits / max(liver_pixels, 1), 4), "all": _fit(table),
            "by_size": sized(table, SIZE_BINS_MM),
            "by_type": {name: {"all": _fit(table[table[:, 0] == index]),
                               **sized(table[table[:, 0] == index], TYPE_SIZE_BINS_MM)}
                        for index, name in enumerate(LESION_TYPES)}}


def headline(fit: dict) -> dict:
    """The share of each type's sections reaching CONFIDENT, and of liver pixels at THRESHOLD."""
    return {**{name: part["all"].get("confident_share") for name, part in fit["by_type"].items()},
            "liver pixels": fit["liver_pixels_at_threshold"]}


def block_fit(net, batches, spacing_mm, hu_window=(-250.0, 350.0)):
    """The fit of the batches' lesion sections (``summary``), and of the sections of each type by where its liver
    prior puts them (``by_prior``: the section's mean prior under or over 0.5; the trainer's prior leaves some
    lesions out, as stage 1 does) and, those the prior holds, by their contrast (``by_contrast_in_prior``: the
    section's mean HU less the median of the slab's liver, in its centre slice)."""
    from liverlesionai.networks import STAGE2_FIRST_LESION, STAGE2_LIVER
    from liverlesionai.records import LESION_TYPES

    rows, context, liver_hits, liver_pixels = [], [], 0, 0
    half_window_hu = (hu_window[1] - hu_window[0]) / 2
    net.eval()
    for x, target, _ in batches:
        with torch.inference_mode():
            probs = net(x.contiguous(memory_format=torch.channels_last)).float().softmax(1)
        lesion_probability = probs[:, STAGE2_FIRST_LESION:].sum(1).numpy()
        target, x = target.numpy(), x.numpy()
        centre, prior = x[:, (x.shape[1] - 1) // 2], x[:, -1]
        liver = target == STAGE2_LIVER
        liver_hits += int((lesion_probability[liver] >= THRESHOLD).sum())
        liver_pixels += int(liver.sum())
        for slab in range(len(target)):
            liver_level = float(np.median(centre[slab][liver[slab]])) if liver[slab].any() else np.nan
            # the target holds types, not lesion ids: each type's connected pieces stand for its lesions
            for index in range(len(LESION_TYPES)):
                pieces, n = ndimage.label(target[slab] == STAGE2_FIRST_LESION + index)
                for row in sections(lesion_probability[slab], pieces, dict.fromkeys(range(1, n + 1), index), spacing_mm,
                                    means_of=(prior[slab], centre[slab])):
                    rows.append(row[:4])
                    context.append((row[4], (row[5] - liver_level) * half_window_hu))
    report = summary(rows, liver_hits, liver_pixels)
    table, context = np.array(rows, float).reshape(-1, 4), np.array(context, float).reshape(-1, 2)
    in_prior = context[:, 0] >= 0.5
    report["by_prior"] = {name: {"prior under 0.5": _fit(table[(table[:, 0] == index) & ~in_prior]),
                                 "prior 0.5 or more": _fit(table[(table[:, 0] == index) & in_prior])}
                          for index, name in enumerate(LESION_TYPES)}
    report["by_contrast_in_prior"] = {
        name: {f"{lo:g} to {hi:g} HU": _fit(table[(table[:, 0] == index) & in_prior & (context[:, 1] >= lo)
                                                  & (context[:, 1] < hi)]) for lo, hi in CONTRAST_BINS_HU}
        for index, name in enumerate(LESION_TYPES)}
    return report


def case_fit(engine, cases, reference_prior):
    """The fit of the cases' lesion sections (``summary``), and by the cases' slice thickness
    (``by_slice_thickness``): blocks are rendered straight onto stage 2's grid, a CT of thick slices is resampled
    onto it."""
    from liver_refinement_head import case_voxels
    from liverlesionai.records import LESION_TYPES

    spacing_mm = float(engine.config.stage2_spacing[0])
    tallies = {}  # slice-thickness group -> [rows, liver hits, liver pixels]
    for _, ct, truth in cases:
        v = case_voxels(engine, ct, reference_organ=truth["liver_mask"], lesion_instances=truth["lesion_instances"],
                        liver_prior=truth["liver_mask"] if reference_prior else None)
        lesion_probability, instances = v["lesion_probability"], v["instances"]
        types = {lesion_id: LESION_TYPES.index(name) for lesion_id, name in truth["lesion_types"].items()}
        liver = v["reference"] & (instances == 0)
        thickness_mm = float(np.linalg.norm(ct.ijk_to_ras[:3, 2]))
        group = next(name for name, (lo, hi) in THICKNESS_GROUPS_MM.items() if lo <= thickness_mm < hi)
        tally = tallies.setdefault(group, [[], 0, 0])
        tally[1] += int((lesion_probability[liver] >= THRESHOLD).sum())
        tally[2] += int(liver.sum())
        for k in np.nonzero(instances.reshape(len(instances), -1).max(1))[0]:
            tally[0] += sections(lesion_probability[k], instances[k], types, spacing_mm)
    report = summary(sum((t[0] for t in tallies.values()), []), sum(t[1] for t in tallies.values()),
                     sum(t[2] for t in tallies.values()))
    report["by_slice_thickness"] = {name: {"sections": len(tallies[name][0]),
                                           **headline(summary(*tallies[name]))}
                                    for name in THICKNESS_GROUPS_MM if name in tallies}
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model folder (its stage 2 and stage 1)")
    parser.add_argument("--blocks", type=int, default=100, help="training batches of 16 slabs to judge on")
    parser.add_argument("--block-thick-slices", type=float, default=0.0, metavar="FRACTION",
                        help="render this fraction of the blocks as CTs of 2-5 mm slices resampled onto stage 2's grid "
                             "(training.stage2_batch's thick_fraction; default 0: as stage 2's first cycles drew them)")
    parser.add_argument("--checkpoint", nargs="*", default=[],
                        help="stage-2 training checkpoints (train_network's .ckpt) judged on the same blocks")
    parser.add_argument("--cases", type=Path, help="a folder of phantom cases")
    parser.add_argument("--every", type=int, default=1, help="every n-th case of --cases")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from liverlesionai import training as T
    from liverlesionai.datasets import find_cases
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.networks import UNet2p5D

    torch.set_num_threads(args.threads)
    started = time.time()
    engine = LiverLesionEngine(args.model, device="cpu", precision="fp32")
    config = engine.config
    batches = [T.training_batch("stage2", BLOCK_SEED_BASE, 2, 16, None, step, config=config,
                                thick_fraction=args.block_thick_slices) for step in range(args.blocks)]
    spacing_mm = float(config.stage2_spacing[0])
    fit = functools.partial(block_fit, batches=batches, spacing_mm=spacing_mm, hu_window=config.hu_window)
    report = {"model": args.model, "block_seed_base": BLOCK_SEED_BASE, "blocks": args.blocks,
              "block_thick_fraction": args.block_thick_slices,
              "block_fit": {"model": fit(engine.stage2)}}
    print("blocks, model:", headline(report["block_fit"]["model"]), flush=True)
    for checkpoint in args.checkpoint:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        net = UNet2p5D(config.stage2)
        net.load_state_dict(saved["model"])
        name = f"{Path(checkpoint).name} (step {saved['step']})"
        report["block_fit"][name] = fit(net)
        print(f"blocks, {name}:", headline(report["block_fit"][name]), flush=True)
    if args.cases:
        chosen = find_cases(args.cases)[::args.every]
        report["cases"] = [case.case_id for case in chosen]

        def cases():
            return ((case.case_id, case.load_image(), case.load_truth()) for case in chosen)

        report["case_fit"] = {"stage-1 prior": case_fit(engine, cases(), reference_prior=False),
                              "reference liver prior": case_fit(engine, cases(), reference_prior=True)}
        print("cases:", {prior: {**headline(fit), "by slice thickness": fit["by_slice_thickness"]}
                         for prior, fit in report["case_fit"].items()}, flush=True)
    report["seconds"] = round(time.time() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
