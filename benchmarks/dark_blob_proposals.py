"""Exploratory: could lesion proposals read from the CT itself add the visible lesions stage 2 calls liver?

Most missed lesions are visible (contrast-to-noise 2 or more) and stage 2 gives them no lesion probability
(detection_by_type.py). This tries the simplest image-based proposal: inside stage 2's liver, more than 3 mm from
its edge, the CT smoothed at 1.5 mm minus the lesion-free liver's level around it (normalised Gaussian at 15 mm,
voxels within 3 robust SDs of the liver's median HU) is the local contrast; a component where it falls below -k of
its own robust SD, and at least a 3 mm ball in volume, is a proposal. A proposal counts as a new true lesion when
over 30% of it is a reference lesion the shipped model missed, a duplicate when 30% of it is a reported lesion or
a found reference, else false. Detection counts are the shipped model's, in stage 2's grid, plus the proposals'.

    python benchmarks/dark_blob_proposals.py LiverLesionAI/Resources/Models/liverlesionai-v5.12 /tmp/v510/pool \\
        --out benchmarks/results/dark_blob_proposals_v5.12_pool.json
    python benchmarks/dark_blob_proposals.py LiverLesionAI/Resources/Models/liverlesionai-v5.12 \\
        ../shared/data/ircadb-01/case_01 --out benchmarks/results/dark_blob_proposals_v5.12_real.json
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

from detection_by_type import in_stage2_grid

CONTRAST_THRESHOLDS = (3.0, 4.0, 5.0, 6.0)  # k, in robust SDs of the local contrast
EDGE_MM, SMOOTH_MM, BACKGROUND_MM, MIN_PROPOSAL_MM3 = 3.0, 1.5, 15.0, 14.0
_ENGINE = {}


def local_contrast(hu, liver, spacing_mm):
    """The CT smoothed at SMOOTH_MM minus the lesion-free liver's level at BACKGROUND_MM (both normalised within
    the liver, so its edge does not pull the level toward the fat outside)."""
    median = float(np.median(hu[liver]))
    spread = 1.4826 * float(np.median(np.abs(hu[liver] - median)))
    background = (liver & (np.abs(hu - median) < 3 * spread)).astype(np.float32)

    def normalised(weights, sigma_mm):
        return (ndimage.gaussian_filter(hu * weights, sigma_mm / spacing_mm)
                / np.maximum(ndimage.gaussian_filter(weights, sigma_mm / spacing_mm), 1e-3))

    return normalised(liver.astype(np.float32), SMOOTH_MM) - normalised(background, BACKGROUND_MM)


def _case(args) -> dict:
    import torch

    from liverlesionai.datasets import find_cases
    from liverlesionai.engine import LiverLesionEngine, stage2_liver_region
    from liverlesionai.evaluation import evaluate_case
    from liverlesionai.preprocessing import denormalize_hu

    torch.set_num_threads(1)
    model, folder = args
    engine = _ENGINE.get(model) or _ENGINE.setdefault(model, LiverLesionEngine(model, device="cpu", threads=1,
                                                                                 precision="fp32"))
    cfg = engine.config
    case = find_cases(folder)[0]
    ct, truth = case.load_image(), case.load_truth()
    outputs = engine.run_networks(ct)
    result = engine.lesions_from(outputs, classify=False)
    metrics = evaluate_case(result.as_prediction(), truth, ct.ijk_to_ras, case.case_id)
    found = {m["gt_id"] for m in metrics["matches"]}
    reference2 = in_stage2_grid(outputs, truth["lesion_instances"])
    reported2 = in_stage2_grid(outputs, result.lesion_instances) > 0
    spacing = float(cfg.stage2_spacing[0])
    hu = denormalize_hu(outputs.hu2, cfg.hu_window).astype(np.float32)
    liver = stage2_liver_region(outputs.probs2.argmax(0), outputs.prior2, spacing)
    inner = ndimage.distance_transform_edt(liver, sampling=spacing) > EDGE_MM
    contrast = local_contrast(hu, liver, spacing)
    spread = 1.4826 * float(np.median(np.abs(contrast[inner] - np.median(contrast[inner]))))
    rows = {}
    for k in CONTRAST_THRESHOLDS:
        proposals, n = ndimage.label((contrast < -k * spread) & inner)
        sizes = np.bincount(proposals.ravel(), minlength=n + 1)
        new, false, duplicate = set(), 0, 0
        for label in np.flatnonzero(sizes * spacing ** 3 >= MIN_PROPOSAL_MM3):
            if label == 0:
                continue
            region = proposals == label
            hits = np.bincount(reference2[region]).astype(float)
            hits[0] = 0
            if reported2[region].mean() > 0.3 or (hits.max() > 0.3 * region.sum() and int(hits.argmax()) in found):
                duplicate += 1
            elif hits.max() > 0.3 * region.sum():
                new.add(int(hits.argmax()))
            else:
                false += 1
        rows[str(k)] = {"new_true": len(new), "false": false, "duplicates": duplicate}
    return {"case": case.case_id, "detection": metrics["detection"], "proposals": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("cases", help="a folder of case folders, or one case folder")
    parser.add_argument("--threads", type=int, default=2, help="processes (one thread each)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: not overwriting an earlier result")
    from liverlesionai.datasets import find_cases

    started = time.time()
    with ProcessPoolExecutor(args.threads) as pool:
        cases = list(pool.map(_case, [(args.model, c.folder) for c in find_cases(args.cases)]))
    tp, fp, fn = (sum(c["detection"][key] for c in cases) for key in ("tp", "fp", "fn"))
    table = {"shipped": {"tp": tp, "fp": fp, "fn": fn, "f1": round(2 * tp / max(2 * tp + fp + fn, 1), 3)}}
    for k in map(str, CONTRAST_THRESHOLDS):
        new, false = (sum(c["proposals"][k][key] for c in cases) for key in ("new_true", "false"))
        table[f"with proposals at -{k} SD"] = {
            "new_true": new, "false": false,
            "f1": round(2 * (tp + new) / max(2 * (tp + new) + fp + false + fn - new, 1), 3)}
    report = {"model": args.model, "cases": args.cases, "n_cases": len(cases), "detection": table,
              "per_case": cases, "seconds": round(time.time() - started)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
