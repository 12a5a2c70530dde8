"""Exploratory: the shipped model's detection and typing per reference lesion type, size and conspicuity.

The test set holds 4 matched hemangiomas (all typed wrong) and 16 in all: too few to say where hemangiomas are
lost. This runs the model on phantom case folders (the judge and fresh validation phantoms of
lesion_rule_candidate.py / lesion_split_candidate.py, never used for training) and counts, per reference type
and size bin, the lesions found and the types given to them; and per conspicuity bin (how far a lesion stands
out of the liver around it in units of that liver's noise, ``evaluation.lesion_conspicuity``) and size bin, the
lesions found, so that a miss the image hardly shows is told from one the network overlooks. ``--real`` adds
the real case's lesions one by one.

    python benchmarks/detection_by_type.py LiverLesionAI/Resources/Models/liverlesionai-v5.12 \\
        /tmp/v510/judge /tmp/v510/second_test_500600 --real ../shared/data/ircadb-01/case_01 \\
        --out benchmarks/results/detection_by_conspicuity_v5.12.json
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

_ENGINE = {}


MIN_OVERLAP = 0.1  # a lesion mask "reaches" a reference lesion that it covers this share of
MISS_CAUSES = ("reported, not matched", "dropped by the candidate filter", "stage 2: outside the liver",
               "stage 2: liver", "stage 2: lesion below the rule")


def in_stage2_grid(outputs, instances):
    """A lesion map in the input's grid (reference or reported), resampled (nearest) onto stage 2's grid."""
    from liverlesionai.geometry import canonicalize, resample_separable

    canon = canonicalize(instances.astype(np.float32), outputs.ct.ijk_to_ras)
    return np.rint(resample_separable(canon.array, canon.grid, outputs.grid2, 0)).astype(np.int64)


def miss_causes(engine, outputs, result, truth, matched_ids) -> tuple[dict[int, dict], float]:
    """Why each missed reference lesion was missed, first cause first: a reported lesion reaches it but was
    matched elsewhere or covers too little; a candidate reached it but the filter dropped it; else what stage 2's
    argmax calls most of it (outside the liver, liver, or lesion the rule still leaves out). With the share of it
    stage 1 calls liver (p > 0.5), in stage 2's grid, and its mean summed lesion probability; and that
    probability's median over the lesion-free liver (stage 2's liver or lesion where stage 1's liver probability
    is over 0.5, 3 voxels clear of any reference lesion), the floor a missed lesion's probability would have to
    rise above."""
    from scipy import ndimage

    from liverlesionai.networks import FILTER_OFF, STAGE2_FIRST_LESION

    reference = truth["lesion_instances"]
    own_filter = dict(engine.config.candidate_filter)
    engine.config.set_candidate_filter(FILTER_OFF)
    try:
        candidates = engine.lesions_from(outputs, classify=False).lesion_instances
    finally:
        engine.config.set_candidate_filter(own_filter)
    reference2 = in_stage2_grid(outputs, reference)
    labels2 = outputs.probs2.argmax(0)
    lesion_prob2 = outputs.probs2[STAGE2_FIRST_LESION:].astype(np.float32).sum(0)
    lesion_free = (labels2 >= 1) & (outputs.prior2 > 0.5) & ~ndimage.binary_dilation(reference2 > 0, iterations=3)
    floor = round(float(np.median(lesion_prob2[lesion_free])), 4) if lesion_free.any() else None
    causes = {}
    for gt_id in np.unique(reference[reference > 0]).tolist():
        if gt_id in matched_ids:
            continue
        inside = reference == gt_id
        inside2 = reference2 == gt_id
        record = {"stage1_liver_share": None, "lesion_probability": None}
        if inside2.any():
            record.update(stage1_liver_share=round(float((outputs.prior2[inside2] > 0.5).mean()), 3),
                          lesion_probability=round(float(lesion_prob2[inside2].mean()), 3))
        if np.mean(result.lesion_instances[inside] > 0) >= MIN_OVERLAP:
            record["cause"] = MISS_CAUSES[0]
        elif np.mean(candidates[inside] > 0) >= MIN_OVERLAP:
            record["cause"] = MISS_CAUSES[1]
        elif inside2.any():
            shares = np.bincount(np.minimum(labels2[inside2], STAGE2_FIRST_LESION), minlength=3)
            record["cause"] = MISS_CAUSES[2 + int(shares.argmax())]
        else:
            record["cause"] = MISS_CAUSES[2]  # outside stage 2's box around stage 1's liver
        causes[gt_id] = record
    return causes, floor


def engine_and_case(model, folder):
    """In a worker process: its engine of ``model`` (one thread, float32; made once per process) and the case
    folder's (case, ct, truth)."""
    import torch

    from liverlesionai.datasets import find_cases
    from liverlesionai.engine import LiverLesionEngine

    torch.set_num_threads(1)
    engine = _ENGINE.get(model) or _ENGINE.setdefault(model, LiverLesionEngine(model, device="cpu", threads=1,
                                                                                 precision="fp32"))
    case = find_cases(folder)[0]
    return engine, case, case.load_image(), case.load_truth()


def _case(args) -> list[dict]:
    """Per reference lesion of one case folder: type, size, conspicuity, found, predicted type, cause of a miss."""
    from liverlesionai.evaluation import evaluate_case, lesion_conspicuity, size_bin
    from liverlesionai.lesions import lesion_axes_mm
    from liverlesionai.records import SegmentationResult

    engine, case, ct, truth = engine_and_case(*args)
    outputs = engine.run_networks(ct)
    result = outputs if isinstance(outputs, SegmentationResult) else engine.lesions_from(outputs)
    metrics = evaluate_case(result.as_prediction(), truth, ct.ijk_to_ras, case.case_id)
    matched = {m["gt_id"]: m for m in metrics["matches"]}
    causes, floor = (({}, None) if isinstance(outputs, SegmentationResult) else
                     miss_causes(engine, outputs, result, truth, set(matched)))
    axes = lesion_axes_mm(truth["lesion_instances"], ct.ijk_to_ras)
    conspicuity = lesion_conspicuity(ct.voxels, truth["liver_mask"], truth["lesion_instances"], ct.ijk_to_ras)
    return [{"case": case.case_id, "id": int(gt_id), "type": gt_type, "long_axis_mm": round(axes[int(gt_id)][0], 1),
             "size": size_bin(axes[int(gt_id)][0]), "found": int(gt_id) in matched,
             "predicted_type": matched[int(gt_id)]["pred_type"] if int(gt_id) in matched else None,
             **conspicuity[int(gt_id)], **causes.get(int(gt_id), {}), "case_lesion_free_probability": floor}
            for gt_id, gt_type in truth["lesion_types"].items() if int(gt_id) in axes]


CNR_BINS = (0.0, 0.5, 1.0, 2.0, 4.0)  # lower edges


def cnr_bin(cnr: float | None) -> str:
    if cnr is None:
        return "no liver around"
    lower = max(edge for edge in CNR_BINS if cnr >= edge)
    upper = [edge for edge in CNR_BINS if edge > lower]
    return f"{lower:g}-{upper[0]:g}" if upper else f">={lower:g}"


def found_table(lesions: list[dict], row_of, rows) -> dict:
    """'found of n' per row and size bin, and the row's total."""
    from liverlesionai.evaluation import SIZE_BINS

    table = {}
    for row in rows:
        in_row = [x for x in lesions if row_of(x) == row]
        if in_row:
            table[row] = {"all": f"{sum(x['found'] for x in in_row)} of {len(in_row)}",
                          **{b: f"{sum(x['found'] for x in in_row if x['size'] == b)} of "
                                f"{sum(x['size'] == b for x in in_row)}" for b in SIZE_BINS}}
    return table


def tables(lesions: list[dict]) -> dict:
    """The report's tables from the per-lesion records of ``_case``."""
    from liverlesionai.evaluation import SIZE_BINS
    from liverlesionai.records import LESION_TYPES

    by_type = {}
    for lesion_type in LESION_TYPES:
        of_type = [x for x in lesions if x["type"] == lesion_type]
        found = [x for x in of_type if x["found"]]
        by_type[lesion_type] = {
            "lesions": len(of_type), "found": len(found),
            "found_by_size": {b: f"{sum(x['found'] for x in of_type if x['size'] == b)} of "
                                 f"{sum(x['size'] == b for x in of_type)}" for b in SIZE_BINS},
            "typed_as": {t: sum(x["predicted_type"] == t for x in found) for t in LESION_TYPES}}
    bins = [cnr_bin(edge) for edge in CNR_BINS] + [cnr_bin(None)]
    missed = [x for x in lesions if not x["found"]]
    causes = {"all misses": found_table(missed, lambda x: x["cause"], MISS_CAUSES),
              "misses with cnr >= 2": found_table([x for x in missed if (x["cnr"] or 0) >= 2], lambda x: x["cause"],
                                                  MISS_CAUSES)}
    causes = {name: {cause: {key: value.split(" of ")[1] for key, value in row.items()}  # found is 0: keep n
                     for cause, row in counts.items()} for name, counts in causes.items()}
    called_liver = [x for x in missed if x["cause"] == MISS_CAUSES[3]]
    floors = {x["case"]: x["case_lesion_free_probability"] for x in lesions
              if x["case_lesion_free_probability"] is not None}
    signal = {"misses stage 2 calls liver: median mean lesion probability":
              float(np.median([x["lesion_probability"] for x in called_liver])) if called_liver else None,
              "cases' lesion-free liver: median lesion probability, median and range over cases":
              [float(np.median(list(floors.values()))), min(floors.values()), max(floors.values())] if floors else None}
    visible = {}  # what the visible lesions stage 2 calls liver look like, beside the found ones
    for lesion_type in LESION_TYPES:
        for name, group in (("found", [x for x in lesions if x["found"]]), ("called liver", called_liver)):
            group = [x for x in group if x["type"] == lesion_type and (x["cnr"] or 0) >= 2]
            if group:
                visible[f"{lesion_type}, {name}"] = {
                    "lesions": len(group),
                    **{f"median {key}": round(float(np.median([x[key] for x in group])), 1)
                       for key in ("contrast_hu", "contrast_energy_hu", "noise_hu", "long_axis_mm")}}
    return {"by_reference_type": by_type, "cnr_bins": "contrast energy / noise of the liver 1.5-6 mm around",
            "by_conspicuity": found_table(lesions, lambda x: cnr_bin(x["cnr"]), bins),
            "by_type_and_conspicuity": {t: found_table([x for x in lesions if x["type"] == t],
                                                       lambda x: cnr_bin(x["cnr"]), bins) for t in LESION_TYPES},
            "miss_causes": causes, "stage2_signal": signal, "visible_lesions_cnr_2_or_more": visible}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("cases", nargs="+", help="folders of phantom case folders")
    parser.add_argument("--real", type=Path, help="a real case folder: its lesions are listed one by one")
    parser.add_argument("--threads", type=int, default=2, help="processes (one thread each)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: not overwriting an earlier result")

    folders = sorted(p for root in args.cases for p in Path(root).iterdir() if p.is_dir())
    started = time.time()
    jobs = [(args.model, f) for f in folders] + ([(args.model, args.real)] if args.real else [])
    with ProcessPoolExecutor(args.threads) as pool:
        per_case = list(pool.map(_case, jobs))
    real_lesions = per_case.pop() if args.real else []
    lesions = [lesion for case in per_case for lesion in case]
    summary = tables(lesions)
    report = {"model": args.model, "cases": [str(c) for c in args.cases], "n_cases": len(folders), **summary,
              "real_case": {"folder": str(args.real), "lesions": real_lesions} if args.real else None,
              "lesions": lesions, "seconds": round(time.time() - started)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({**summary, "real_case": real_lesions}, indent=1))


if __name__ == "__main__":
    main()
