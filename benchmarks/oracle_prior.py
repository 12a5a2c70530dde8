"""How much of a model's error is stage 1's: the cascade with the reference liver as its stage-1 prior.

Runs the engine on a folder of cases (image + ground truth) with ``liver_prior`` set to the reference liver
(lesions included), so stage 2 sees a perfect liver, and reports the same metrics as ``liverlesionai
evaluate`` (compare with that command's output on the same folder). The gap between the two is what a
perfect stage 1 would give; what remains is stage 2's and the classifier's.

    liverlesionai phantoms VAL --seeds 500000-500023 --max-in-plane 384
    python benchmarks/oracle_prior.py --model LiverLesionAI/Resources/Models/liverlesionai-v5.1 --cases VAL \\
        --out benchmarks/results/oracle_prior_v5.1_validation.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--cases", required=True, type=Path, help="folder of cases with ground truth")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from liverlesionai.datasets import find_cases
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.evaluation import aggregate, evaluate_case

    engine = LiverLesionEngine(args.model, device="cpu", threads=args.threads, precision="fp32")
    started, per_case = time.time(), []
    for case in find_cases(args.cases):
        ct, truth = case.load_image(), case.load_truth()
        result = engine.segment(ct, liver_prior=(truth["liver_mask"] > 0) | (truth["lesion_instances"] > 0))
        prediction = {"liver_mask": result.liver_mask, "lesion_instances": result.lesion_instances,
                      "lesion_types": {r.lesion_id: r.lesion_type for r in result.lesions}}
        metrics = evaluate_case(prediction, truth, ct.ijk_to_ras, case.case_id)
        print(f"{case.case_id}: liver Dice {metrics['liver_dice']:.3f}, detection {metrics['detection']}", flush=True)
        per_case.append(metrics)
    summary = aggregate(per_case)
    keep = ("mean_liver_dice", "global_lesion_dice", "detection", "detection_by_size", "type_accuracy",
            "type_confusion", "n_cases")
    result = {"model": str(args.model), "cases": str(args.cases), "stage1": "reference liver (oracle)",
              **{k: summary[k] for k in keep if k in summary}, "seconds": round(time.time() - started)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
