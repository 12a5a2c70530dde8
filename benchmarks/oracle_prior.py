"""How much of a model's error is stage 1's: the cascade with the reference liver as its stage-1 prior.

Runs the engine on a folder of cases (image + ground truth) with ``liver_prior`` set to the reference liver
(lesions included), so stage 2 sees a perfect liver, and reports the same metrics as ``liverlesionai
evaluate`` (compare with that command's output on the same folder). The gap between the two is what a
perfect stage 1 would give; what remains is stage 2's and the classifier's. ``--per-lesion`` also runs the
normal cascade and lists, per reference lesion, whether each run found it and how close it lies to the liver
surface (does stage 1 cost the lesions at the liver's edge, or inside it too?).

    liverlesionai phantoms VAL --seeds 500000-500023 --max-in-plane 384
    python benchmarks/oracle_prior.py --model LiverLesionAI/Resources/Models/liverlesionai-v5.5 --cases VAL \\
        --per-lesion --out benchmarks/results/oracle_prior_v5.2_validation.json
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
    parser.add_argument("--per-lesion", action="store_true", help="also run stage 1; a row per reference lesion")
    args = parser.parse_args(argv)

    import numpy as np
    from scipy import ndimage

    from liverlesionai.datasets import find_cases
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.evaluation import aggregate, evaluate_case

    engine = LiverLesionEngine(args.model, device="cpu", threads=args.threads, precision="fp32")
    def run(case_id, ct, truth, liver_prior):
        return evaluate_case(engine.segment(ct, liver_prior=liver_prior).as_prediction(), truth, ct.ijk_to_ras, case_id)

    started, per_case, lesions = time.time(), [], []
    for case in find_cases(args.cases):
        ct, truth = case.load_image(), case.load_truth()
        organ = (truth["liver_mask"] > 0) | (truth["lesion_instances"] > 0)
        metrics = run(case.case_id, ct, truth, organ)
        print(f"{case.case_id}: liver Dice {metrics['liver_dice']:.3f}, detection {metrics['detection']}", flush=True)
        per_case.append(metrics)
        if args.per_lesion:
            found = {"reference_liver": {m["gt_id"] for m in metrics["matches"]},
                     "stage1": {m["gt_id"] for m in run(case.case_id, ct, truth, None)["matches"]}}
            spacing = np.linalg.norm(ct.ijk_to_ras[:3, :3], axis=0)[::-1]
            depth_mm = ndimage.distance_transform_edt(organ, sampling=spacing)
            instances = truth["lesion_instances"]
            for lesion_id in np.unique(instances[instances > 0]).tolist():
                depth = depth_mm[instances == lesion_id]
                lesions.append({"case": case.case_id, "lesion": lesion_id, "min_depth_mm": round(float(depth.min()), 2),
                                "within_5mm_of_surface": round(float((depth <= 5.0).mean()), 3),
                                **{f"found_with_{k}": lesion_id in v for k, v in found.items()}})
    summary = aggregate(per_case)
    keep = ("mean_liver_dice", "global_lesion_dice", "detection", "detection_by_size", "type_accuracy",
            "type_confusion", "n_cases")
    result = {"model": str(args.model), "cases": str(args.cases), "stage1": "reference liver (oracle)",
              **{k: summary[k] for k in keep if k in summary}, "seconds": round(time.time() - started)}
    if args.per_lesion:
        # touching: some voxel within ~1 voxel of the liver's surface
        groups = {"all": lambda r: True, "touching the surface": lambda r: r["min_depth_mm"] <= 1.5,
                  "inside": lambda r: r["min_depth_mm"] > 1.5}
        result["by_position"] = {
            name: {"lesions": sum(map(test, lesions)),
                   "found_with_stage1": sum(r["found_with_stage1"] for r in lesions if test(r)),
                   "found_with_reference_liver": sum(r["found_with_reference_liver"] for r in lesions if test(r))}
            for name, test in groups.items()}
        result["lesions"] = lesions
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
