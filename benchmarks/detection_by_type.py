"""Exploratory: the shipped model's detection and typing per reference lesion type and size, on many phantoms.

The test set holds 4 matched hemangiomas (all typed wrong) and 16 in all: too few to say where hemangiomas are
lost. This runs the model on phantom case folders (the judge and fresh validation phantoms of
lesion_rule_candidate.py / lesion_split_candidate.py, never used for training) and counts, per reference type
and size bin, the lesions found and the types given to them.

    python benchmarks/detection_by_type.py LiverLesionAI/Resources/Models/liverlesionai-v5.12 \\
        /tmp/v510/judge /tmp/v510/second_test_500600 --out benchmarks/results/detection_by_type_v5.12.json
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

_ENGINE = {}


def _case(args) -> list[dict]:
    """Per reference lesion of one case folder: type, size bin, found, predicted type."""
    import torch

    from liverlesionai.datasets import find_cases
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.evaluation import evaluate_case, size_bin
    from liverlesionai.lesions import lesion_axes_mm

    torch.set_num_threads(1)
    model, folder = args
    engine = _ENGINE.get(model) or _ENGINE.setdefault(model, LiverLesionEngine(model, device="cpu", threads=1,
                                                                                 precision="fp32"))
    case = find_cases(folder)[0]
    ct, truth = case.load_image(), case.load_truth()
    metrics = evaluate_case(engine.segment(ct).as_prediction(), truth, ct.ijk_to_ras, case.case_id)
    matched = {m["gt_id"]: m for m in metrics["matches"]}
    axes = lesion_axes_mm(truth["lesion_instances"], ct.ijk_to_ras)
    return [{"type": gt_type, "size": size_bin(axes[int(gt_id)][0]), "found": int(gt_id) in matched,
             "predicted_type": matched[int(gt_id)]["pred_type"] if int(gt_id) in matched else None}
            for gt_id, gt_type in truth["lesion_types"].items() if int(gt_id) in axes]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("cases", nargs="+", help="folders of phantom case folders")
    parser.add_argument("--threads", type=int, default=2, help="processes (one thread each)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: not overwriting an earlier result")
    from liverlesionai.evaluation import SIZE_BINS
    from liverlesionai.records import LESION_TYPES

    folders = sorted(p for root in args.cases for p in Path(root).iterdir() if p.is_dir())
    started = time.time()
    with ProcessPoolExecutor(args.threads) as pool:
        lesions = [lesion for case in pool.map(_case, [(args.model, f) for f in folders]) for lesion in case]
    table = {}
    for lesion_type in LESION_TYPES:
        of_type = [x for x in lesions if x["type"] == lesion_type]
        found = [x for x in of_type if x["found"]]
        table[lesion_type] = {
            "lesions": len(of_type), "found": len(found),
            "found_by_size": {b: f"{sum(x['found'] for x in of_type if x['size'] == b)} of "
                                 f"{sum(x['size'] == b for x in of_type)}" for b in SIZE_BINS},
            "typed_as": {t: sum(x["predicted_type"] == t for x in found) for t in LESION_TYPES}}
    report = {"model": args.model, "cases": [str(c) for c in args.cases], "n_cases": len(folders),
              "by_reference_type": table, "seconds": round(time.time() - started)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
