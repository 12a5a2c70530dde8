"""Exploratory: why does a fine-tuned site expert find fewer lesions of the shifted domain than its parent? Its
candidate filter is re-tuned on a few validation cases; this measures on the test cases themselves what any filter
could do. Every candidate of the model (filter off) on each case, matched to the reference, then detection under
the model's own filter, with no filter, and under the filter chosen on these very cases (an oracle: the ceiling of
any re-tuning, ``training.choose_candidate_filter``), plus a small grid. The filter reads a candidate's mean lesion
probability and its share at the liver surface only; ``by_min_volume`` asks whether a minimum size as a third
threshold would raise that ceiling (each row: the oracle among the candidates of at least that volume).

    python benchmarks/finetune_detection_ceiling.py LiverLesionAI/Resources/Models/liverlesionai-v5.12 \\
        /tmp/llai_old60/shifted_test_0a269a76 --out benchmarks/results/finetune_detection_ceiling_v5.12_parent.json
    python benchmarks/finetune_detection_ceiling.py /tmp/llai_v512_s0/registry/versions/v0001 \\
        /tmp/llai_old60/shifted_test_0a269a76 --out benchmarks/results/finetune_detection_ceiling_v5.12_seed0.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

GRID_CONFIDENCE = (0.3, 0.35, 0.4, 0.45, 0.5)
GRID_SURFACE = (0.3, 0.5, 0.7)
MIN_VOLUMES_ML = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def candidate_volumes_ml(prediction, ijk_to_ras, candidate_ids) -> dict:
    """Volume (mL) of each candidate of a prediction made without a filter."""
    voxel_ml = abs(np.linalg.det(np.asarray(ijk_to_ras)[:3, :3])) / 1000.0
    counts = np.bincount(prediction["lesion_instances"].ravel().astype(np.int64))
    return {i: float(counts[i] * voxel_ml) if i < len(counts) else 0.0 for i in candidate_ids}


def at_least(evidence, volumes, min_ml):
    """``evidence`` (training.evidence_of) without the candidates under ``min_ml``; true ones dropped count as missed."""
    values, is_tp, missed = evidence
    keep = volumes >= min_ml
    return {k: v[keep] for k, v in values.items()}, is_tp[keep], missed + int((is_tp & ~keep).sum())


def detection_under_filters(evidence, own_filter: dict, log=print) -> dict:
    """Of candidate evidence (``training.evidence_of``): the candidates, how many are true, the reference lesions
    without one, and detection under ``own_filter``, with no filter and under the filter of best F1 chosen on these
    very candidates (the oracle)."""
    from liverlesionai.networks import FILTER_OFF
    from liverlesionai.training import choose_candidate_filter, filtered_detection

    oracle = choose_candidate_filter(evidence, log=log)
    oracle_filter = {key: oracle[key] for key in FILTER_OFF}
    return {"candidates": int(len(evidence[1])), "true_candidates": int(evidence[1].sum()),
            "reference_lesions_without_candidate": int(evidence[2]),
            "own": filtered_detection(evidence, own_filter), "unfiltered": filtered_detection(evidence, FILTER_OFF),
            "oracle_filter": oracle_filter, "oracle": filtered_detection(evidence, oracle_filter)}


def detection_benchmark_arguments(description, argv, *models, options=None):
    """The command line of the detection benchmarks: model folders (name, help) first, then the cases;
    ``options``: further {flag: add_argument keywords}."""
    parser = argparse.ArgumentParser(description=description)
    for name, text in models:
        parser.add_argument(name, help=text)
    for flag, keywords in (options or {}).items():
        parser.add_argument(flag, **keywords)
    parser.add_argument("cases", help="a folder of phantom cases (finetune_domain_shift.py's shifted test set)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def write_report(report: dict, out):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


def main(argv=None):
    args = detection_benchmark_arguments(__doc__.splitlines()[0], argv, ("model", "a model folder (shipped, or a registry version)"))

    from liverlesionai.datasets import find_cases
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.evaluation import evaluate_case
    from liverlesionai.networks import FILTER_OFF
    from liverlesionai.training import choose_candidate_filter, evidence_of, filtered_detection

    engine = LiverLesionEngine(args.model, device="cpu", threads=args.threads)
    own_filter = dict(engine.config.candidate_filter)
    engine.config.set_candidate_filter(FILTER_OFF)
    runs, volumes, experts, started = [], [], set(), time.time()
    for case in find_cases(args.cases):
        ct, truth = case.load_image(), case.load_truth()
        result = engine.segment(ct)
        prediction = result.as_prediction()
        runs.append((result.lesion_evidence, evaluate_case(prediction, truth, ct.ijk_to_ras, case.case_id)))
        volumes.extend(candidate_volumes_ml(prediction, ct.ijk_to_ras, result.lesion_evidence).values())
        experts.add(result.expert)
        print(f"{case.case_id}: {len(result.lesion_evidence)} candidates", flush=True)
    evidence, volumes = evidence_of(runs), np.array(volumes)  # the same candidate order
    report = {
        "model": args.model, "cases": args.cases, "n_cases": len(runs), "experts": sorted(experts),
        "own_filter": own_filter, **detection_under_filters(evidence, own_filter),
        "grid": [{"min_lesion_confidence": c, "max_surface_fraction": s,
                  **filtered_detection(evidence, {"min_lesion_confidence": c, "max_surface_fraction": s})}
                 for c in GRID_CONFIDENCE for s in GRID_SURFACE],
        "by_min_volume": [],
        "seconds": round(time.time() - started),
    }
    for min_ml in MIN_VOLUMES_ML:
        subset = at_least(evidence, volumes, min_ml)
        chosen = choose_candidate_filter(subset, log=lambda m: None)
        report["by_min_volume"].append({"min_volume_ml": min_ml, "candidates": int(len(subset[1])),
                                        **{key: chosen[key] for key in FILTER_OFF},
                                        **filtered_detection(subset, {key: chosen[key] for key in FILTER_OFF})})
    write_report(report, args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "grid"}, indent=1))


if __name__ == "__main__":
    main()
