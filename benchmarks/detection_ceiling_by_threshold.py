"""Exploratory: how many of the lesions the shipped model misses does stage 2 give any candidate at all, at its
lesion threshold and below it? For each threshold, every candidate (filter off, lesions not typed) on the cases,
matched to the reference: the reference lesions with no candidate (the misses no filter or scorer can recover),
the candidates, and detection under the model's filter, with no filter and under the best filter of
``training.choose_candidate_filter`` chosen on these very cases (an oracle, the ceiling of the two-threshold
filter). Run on the 48 pool phantoms of lesion_rule_candidate.py, the choice set. ``--thresholds`` replaces the
default ones (a network whose lesion probability runs higher, gpu_stage2_cycle.py --lesion-min-weight, is
judged above them as well). ``--config KEY=VALUE ...`` overrides fields of the model's CascadeConfig (JSON values),
e.g. ``stage2_spacing=[0.9,0.9,0.9]`` (stage 2 shown the liver zoomed in: a test-time scale) or
``liver_closing_mm=20``.

    python benchmarks/detection_ceiling_by_threshold.py LiverLesionAI/Resources/Models/liverlesionai-v5.12 \\
        /tmp/v510/pool --out benchmarks/results/detection_ceiling_by_threshold_v5.12_pool.json
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from finetune_detection_ceiling import detection_benchmark_arguments, detection_under_filters, write_report

THRESHOLDS = (0.15, 0.1, 0.07, 0.05, 0.03)


def _evidence(args):
    """{threshold: candidate evidence} of some case folders, in a worker process with one thread."""
    import torch

    from lesion_rule_candidate import triples
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.training import candidate_evidence_by_threshold

    torch.set_num_threads(1)
    model, folders, thresholds, overrides = args
    engine = LiverLesionEngine(model, device="cpu", threads=1, precision="fp32")
    for key, value in overrides.items():
        setattr(engine.config, key, tuple(value) if isinstance(value, list) else value)
    cases = (triple for folder in folders for triple in triples(folder))
    return candidate_evidence_by_threshold(engine, cases, thresholds)


def merged(parts):
    """Candidate evidence of several case sets as one."""
    values = {key: np.concatenate([p[0][key] for p in parts]) for key in parts[0][0]}
    return values, np.concatenate([p[1] for p in parts]), sum(p[2] for p in parts)


def main(argv=None):
    from pathlib import Path

    args = detection_benchmark_arguments(__doc__.splitlines()[0], argv, ("model", "a model folder"),
                                         options={"--thresholds": {"type": float, "nargs": "+",
                                                                   "default": list(THRESHOLDS),
                                                                   "help": "lesion thresholds to try"},
                                                  "--config": {"nargs": "*", "default": [], "metavar": "KEY=VALUE",
                                                               "help": "CascadeConfig fields to override (JSON "
                                                                       "values)"}})
    import json

    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.networks import CascadeConfig

    overrides = {}
    for item in args.config:
        key, _, value = item.partition("=")
        if key not in CascadeConfig.__dataclass_fields__:
            raise SystemExit(f"--config {item!r}: {key!r} is not a CascadeConfig field")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            raise SystemExit(f"--config {item!r}: the value is not JSON (e.g. 20, [0.9,0.9,0.9], null)") from None
    own_filter = dict(LiverLesionEngine(args.model, device="cpu").config.candidate_filter)
    folders = sorted(p for p in Path(args.cases).iterdir() if p.is_dir())
    started = time.time()
    workers = max(args.threads, 1)
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_evidence, [(args.model, folders[w::workers], args.thresholds, overrides)
                                       for w in range(workers)]))
    report = {"model": args.model, "cases": args.cases, "n_cases": len(folders), "own_filter": own_filter,
              "config_overrides": overrides, "thresholds": []}
    for threshold in args.thresholds:
        row = detection_under_filters(merged([part[threshold] for part in parts]), own_filter, log=lambda m: None)
        true = row["true_candidates"]
        ceiling = true / max(true + row["reference_lesions_without_candidate"], 1)
        report["thresholds"].append({"lesion_threshold": threshold, **row, "recall_ceiling": ceiling})
        print(report["thresholds"][-1], flush=True)
    report["seconds"] = round(time.time() - started)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
