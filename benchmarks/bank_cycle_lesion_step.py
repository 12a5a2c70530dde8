"""Exploratory, pool only: which lesion step suits the bank cycle's stage 2 (README, "Stage 2 can learn metastases
and hemangiomas").

With v5.12's lesion step unchanged, the bank cycle's stage 2 found no more lesions than v5.12's, and most of the
lesions its reported lesions reach without finding are merged with their neighbours (unmatched_misses.py). This
applies, to one network pass per case, two lesion thresholds x two splits of touching lesions (the variants of
candidates v5.13 and v5.14, engine.split_touching_lesions) or none, with v5.12's candidate filter (and, unsplit,
without a filter: how many lesions any filter could keep), and reports
detection, lesion Dice and type accuracy per variant: where a candidate's choice should look. It is run on the 48
pool phantoms (lesion_rule_candidate.POOL_SEEDS), where candidates choose, never on the judge phantoms; nothing is
chosen here.

    python benchmarks/bank_cycle_lesion_step.py /tmp/bankcycle/model --cases /tmp/v510/pool \\
        --out benchmarks/results/bank_cycle_lesion_step_pool.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from lesion_appendage_candidate import case_results, summary

from liverlesionai.networks import FILTER_OFF

THRESHOLDS = (0.3, 0.15)
SPLITS = {"no split": {}, "d3.75": {"lesion_split_dynamic_mm": 3.75},
          "d2.5 n0.5": {"lesion_split_dynamic_mm": 2.5, "lesion_split_max_neck_ratio": 0.5}}
V5_12_FILTER = {"min_lesion_confidence": 0.4, "max_surface_fraction": 0.5}
VARIANTS = {**{f"t{t:g}, {split}, v5.12's filter": {"lesion_threshold": t, **SPLITS[split], **V5_12_FILTER}
               for t, split in itertools.product(THRESHOLDS, SPLITS)},
            **{f"t{t:g}, no split, filter off": {"lesion_threshold": t, **FILTER_OFF} for t in THRESHOLDS}}


def _case(args):
    model, folder = args
    return case_results(model, folder, VARIANTS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--cases", type=Path, required=True, help="the pool phantoms' folder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: not overwriting a result")
    folders = sorted(p for p in args.cases.iterdir() if p.is_dir())
    started = time.time()
    with ProcessPoolExecutor(args.workers) as pool:
        cases = list(pool.map(_case, [(args.model, f) for f in folders]))
    by_variant = {name: summary([case[name] for case in cases]) for name in VARIANTS}
    for name, s in by_variant.items():
        d = s["detection"]
        print(f"{name:38s} F1 {d['f1']:.3f}  TP {d['tp']:3d}  FP {d['fp']:3d}  lesion Dice {s['global_lesion_dice']:.3f}"
              f"  type acc {s['type_accuracy']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "cases": str(args.cases), "n_cases": len(folders),
                                    "variants": VARIANTS, "by_variant": by_variant,
                                    "seconds": round(time.time() - started)}, indent=1))


if __name__ == "__main__":
    main()
