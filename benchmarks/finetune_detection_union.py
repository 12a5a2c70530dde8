"""Exploratory: would a fine-tuned version find more of the shifted domain's lesions if it also reported the
parent's lesions that its site expert misses? Per case: the version's prediction, the parent's, and their union
(the version's lesions, plus each parent lesion that overlaps none of them, with the parent's type), each
scored against the reference: lesion Dice, detection F1 and type accuracy (``evaluation.aggregate``).

    python benchmarks/finetune_detection_union.py /tmp/llai_v512_s0/registry/versions/v0001 \\
        LiverLesionAI/Resources/Models/liverlesionai-v5.12 /tmp/llai_old60/shifted_test_0a269a76 \\
        --out benchmarks/results/finetune_detection_union_v5.12_seed0.json
"""

from __future__ import annotations

import json
import time

import numpy as np
from finetune_detection_ceiling import detection_benchmark_arguments, write_report


def union_prediction(primary: dict, secondary: dict) -> dict:
    """``primary``'s lesions plus each of ``secondary``'s that overlaps none of them (renumbered after
    ``primary``'s), on ``primary``'s liver."""
    instances = primary["lesion_instances"].astype(np.uint16)
    types = dict(primary["lesion_types"])
    next_id = int(instances.max()) + 1
    for lesion_id, lesion_type in secondary["lesion_types"].items():
        voxels = secondary["lesion_instances"] == lesion_id
        if not voxels.any() or instances[voxels].any():
            continue
        instances = np.where(voxels, next_id, instances).astype(np.uint16)
        types[next_id] = lesion_type
        next_id += 1
    return {"liver_mask": primary["liver_mask"], "lesion_instances": instances, "lesion_types": types}


def _scores(results) -> dict:
    from liverlesionai.evaluation import aggregate

    summary = aggregate(results)
    return {"lesion_dice": summary["global_lesion_dice"], "type_accuracy": summary["type_accuracy"],
            "detection": summary["detection"], "type_confusion": summary.get("type_confusion")}


def main(argv=None):
    args = detection_benchmark_arguments(__doc__.splitlines()[0], argv, ("version", "a fine-tuned version's folder"),
                                         ("parent", "its parent's model folder"))

    from liverlesionai.datasets import find_cases
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.evaluation import evaluate_case

    version = LiverLesionEngine(args.version, device="cpu", threads=args.threads)
    parent = LiverLesionEngine(args.parent, device="cpu", threads=args.threads)
    results = {"version": [], "parent": [], "union": []}
    started = time.time()
    for case in find_cases(args.cases):
        ct, truth = case.load_image(), case.load_truth()
        predictions = {"version": version.segment(ct).as_prediction(), "parent": parent.segment(ct).as_prediction()}
        predictions["union"] = union_prediction(predictions["version"], predictions["parent"])
        for name, prediction in predictions.items():
            results[name].append(evaluate_case(prediction, truth, ct.ijk_to_ras, case.case_id))
        print(case.case_id, {name: len(p["lesion_types"]) for name, p in predictions.items()}, flush=True)
    report = {"version": args.version, "parent": args.parent, "cases": args.cases, "n_cases": len(results["union"]),
              **{name: _scores(r) for name, r in results.items()}, "seconds": round(time.time() - started)}
    write_report(report, args.out)
    print(json.dumps({name: report[name] for name in results}, indent=1))


if __name__ == "__main__":
    main()
