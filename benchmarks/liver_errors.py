"""Where a model's liver errors lie on phantoms: false-positive and missed liver by the generator's tissue.

The liver compared is the organ (liver and lesions), as ``evaluate``'s liver Dice; the tissue labels are the
generator's (GroundTruth.tissue).

    python benchmarks/liver_errors.py --model LiverLesionAI/Resources/Models/liverlesionai-v5.5 --seeds 0-19 \\
        --out benchmarks/results/liver_errors_v5.5_test.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv=None):
    from liverlesionai import phantom as ph
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.evaluation import dice

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--seeds", default="0-19", help="first-last")
    parser.add_argument("--max-in-plane", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: not overwriting an earlier result")
    first, last = (int(v) for v in args.seeds.split("-"))
    tissue_names = {getattr(ph, k): k.lower() for k in (
        "AIR", "BODY_FAT", "MUSCLE", "VISCERAL_FAT", "BONE", "LUNG", "HEART", "SPLEEN", "KIDNEY", "STOMACH", "BOWEL",
        "PANCREAS", "GALLBLADDER", "VESSEL", "LIVER", "LIVER_VESSEL", "LESION", "TABLE")}  # phantom's tissue labels
    engine = LiverLesionEngine(args.model, device="cpu", threads=args.threads, precision="fp32")
    cases = []
    for seed in range(first, last + 1):
        started = time.perf_counter()
        ct, truth = ph.generate_phantom_ct(seed, max_in_plane=args.max_in_plane)
        tissue = truth.tissue
        reference = truth.liver_mask > 0
        result = engine.segment(ct)
        organ = (result.liver_mask > 0) | (result.lesion_instances > 0)
        ml = abs(np.linalg.det(ct.ijk_to_ras[:3, :3])) / 1000

        def by_tissue(mask):
            labels, counts = np.unique(tissue[mask], return_counts=True)
            return {tissue_names.get(int(t), str(t)): round(float(c * ml), 1) for t, c in zip(labels, counts)}

        cases.append({"seed": seed, "liver_dice": dice(organ, reference), "reference_ml": round(float(reference.sum() * ml)),
                      "false_positive_ml": by_tissue(organ & ~reference), "missed_ml": by_tissue(reference & ~organ),
                      "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(cases[-1]), flush=True)
    tissues = sorted({t for c in cases for key in ("false_positive_ml", "missed_ml") for t in c[key]})
    summary = {key: {t: round(float(np.mean([c[key].get(t, 0.0) for c in cases])), 1) for t in tissues
                     if any(t in c[key] for c in cases)} for key in ("false_positive_ml", "missed_ml")}
    report = {"model": args.model, "seeds": [first, last], "max_in_plane": args.max_in_plane,
              "mean_liver_dice": float(np.mean([c["liver_dice"] for c in cases])),
              "mean_ml_per_case": summary, "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.rename(args.out)
    print(json.dumps({k: report[k] for k in ("mean_liver_dice", "mean_ml_per_case")}, indent=1))


if __name__ == "__main__":
    main()
