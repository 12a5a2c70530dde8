"""Exploratory: why a reported lesion reaches a reference lesion and still does not find it.

detection_by_type.py calls a missed reference lesion "reported, not matched" when the engine's reported lesions
cover at least a tenth of it yet none is matched to it (evaluation.match_lesions: IoU >= 0.1, one to one). With
the bank cycle's stage 2 (README, "Stage 2 can learn metastases and hemangiomas") and v5.12's lesion rule such
misses went from 58 to 147 of 544; the README read them as masks running together, unchecked. This reads them
one by one: the reported lesion covering most of the miss, and what else it covers. Each miss gets the first
reading that holds:

- "merged, matched elsewhere": that reported lesion reaches other reference lesions too and was matched to one
- "merged, matched to none": it reaches other reference lesions too (each covered a tenth or more), none matched
- "spills into the liver": it reaches no other, but most of it lies outside every reference lesion
- "fragmented": several reported lesions share the miss, none with IoU 0.1
- "other"

A merged lesion is one lesion_split_* (engine.split_touching_lesions) could part; a spill is one a higher lesion
threshold trims. Run it on the pool phantoms (lesion_rule_candidate.POOL_SEEDS), where a rule is chosen, never on
the judge phantoms.

    python benchmarks/unmatched_misses.py /tmp/bankcycle/model LiverLesionAI/Resources/Models/liverlesionai-v5.12 \\
        --cases /tmp/v510/pool --out benchmarks/results/unmatched_misses_bank_cycle_pool.json
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from detection_by_type import MIN_OVERLAP, engine_and_case

READINGS = ("merged, matched elsewhere", "merged, matched to none", "spills into the liver", "fragmented", "other")


def read_miss(reference, reported, gt_id: int, matched_pred_of: dict) -> dict:
    """The reading of one missed reference lesion ``gt_id`` that reported lesions reach; ``matched_pred_of``
    {reported id: the reference id it was matched to}."""
    inside = reference == gt_id
    covering = collections.Counter(reported[inside][reported[inside] > 0].tolist())
    best, overlap = covering.most_common(1)[0]
    best_mask = reported == best
    reached = collections.Counter(reference[best_mask][reference[best_mask] > 0].tolist())
    others = [g for g, n in reached.items() if g != gt_id and n >= MIN_OVERLAP * np.count_nonzero(reference == g)]
    best_voxels, gt_voxels = int(best_mask.sum()), int(inside.sum())
    outside_share = float(np.mean(reference[best_mask] == 0))
    ious = [n / (np.count_nonzero(reported == p) + gt_voxels - n) for p, n in covering.items()]
    if others and best in matched_pred_of:
        reading = READINGS[0]
    elif others:
        reading = READINGS[1]
    elif outside_share > 0.5:
        reading = READINGS[2]
    elif len(covering) > 1:
        reading = READINGS[3]
    else:
        reading = READINGS[4]
    return {"reading": reading, "reported_lesions_covering": len(covering),
            "covered_share": round(float(np.isin(reported[inside], list(covering)).mean()), 3),
            "best_iou": round(max(ious), 3), "best_volume_ratio": round(best_voxels / gt_voxels, 2),
            "best_share_outside_reference": round(outside_share, 3), "other_reference_lesions_reached": len(others)}


def _case(args) -> list[dict]:
    from liverlesionai.evaluation import evaluate_case, size_bin
    from liverlesionai.lesions import lesion_axes_mm

    engine, case, ct, truth = engine_and_case(*args)
    result = engine.segment(ct)
    metrics = evaluate_case(result.as_prediction(), truth, ct.ijk_to_ras, case.case_id)
    matched_gt = {m["gt_id"] for m in metrics["matches"]}
    matched_pred_of = {m["pred_id"]: m["gt_id"] for m in metrics["matches"]}
    reference, reported = truth["lesion_instances"], result.lesion_instances
    axes = lesion_axes_mm(reference, ct.ijk_to_ras)
    rows = []
    for gt_id, gt_type in truth["lesion_types"].items():
        gt_id = int(gt_id)
        if gt_id in matched_gt or gt_id not in axes or np.mean(reported[reference == gt_id] > 0) < MIN_OVERLAP:
            continue
        rows.append({"case": case.case_id, "id": gt_id, "type": gt_type, "long_axis_mm": round(axes[gt_id][0], 1),
                     "size": size_bin(axes[gt_id][0]), **read_miss(reference, reported, gt_id, matched_pred_of)})
    return [{"case": case.case_id, "reference_lesions": len(axes), "found": len(matched_gt),
             "reported": len(result.lesions)}, rows]


def summary(rows: list[dict]) -> dict:
    by_reading = {reading: [r for r in rows if r["reading"] == reading] for reading in READINGS}
    return {reading: {"misses": len(group),
                      "by_size": dict(collections.Counter(r["size"] for r in group)),
                      "median_best_iou": float(np.median([r["best_iou"] for r in group])) if group else None,
                      "median_best_volume_ratio": float(np.median([r["best_volume_ratio"] for r in group]))
                      if group else None,
                      "median_other_lesions_reached": float(np.median([r["other_reference_lesions_reached"]
                                                                       for r in group])) if group else None}
            for reading, group in by_reading.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders")
    parser.add_argument("--cases", type=Path, required=True, help="a folder of phantom case folders")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: not overwriting a result")
    cases = sorted(p for p in args.cases.iterdir() if p.is_dir())
    report = {"cases": str(args.cases), "n_cases": len(cases), "readings": READINGS, "models": {}}
    for model in args.models:
        started = time.time()
        with ProcessPoolExecutor(args.workers) as pool:
            outcomes = list(pool.map(_case, [(model, c) for c in cases]))
        rows = [row for _, case_rows in outcomes for row in case_rows]
        report["models"][model] = {
            "reference_lesions": sum(o[0]["reference_lesions"] for o in outcomes),
            "found": sum(o[0]["found"] for o in outcomes), "reported": sum(o[0]["reported"] for o in outcomes),
            "reported_not_matched": len(rows), "by_reading": summary(rows), "misses": rows,
            "seconds": round(time.time() - started)}
        print(model, json.dumps({k: v for k, v in report["models"][model].items() if k != "misses"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
