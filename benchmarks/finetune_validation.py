"""Fine-tuning validation time: one network pass per case (the filter re-tuned on it and applied to it) vs two.

Each fine-tuning epoch is measured with the lesion candidate filter re-tuned for it on the guard phantoms
(``finetune.retuned_validation_metrics``). This times that against the earlier way, which tuned the filter on
a pass without a filter and then ran the engine again with it, alternating the two ``--repeats`` times on the
same guard phantoms, and checks that both choose the same filter and give the same metrics.

    python benchmarks/finetune_validation.py --model LiverLesionAI/Resources/Models/liverlesionai-v5.5 \\
        --guard 4 --max-in-plane 256 --threads 1 --out benchmarks/results/finetune_validation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--guard", type=int, default=4, help="guard phantoms (validation seeds)")
    parser.add_argument("--max-in-plane", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.finetune import guard_phantoms, retuned_validation_metrics, validation_metrics
    from liverlesionai.networks import FILTER_OFF
    from liverlesionai.training import candidate_evidence, choose_candidate_filter

    engine = LiverLesionEngine(args.model, device="cpu", threads=args.threads, precision="fp32")
    guard = guard_phantoms(args.guard, args.max_in_plane)
    parent_filter = engine.config.candidate_filter

    def two_passes():
        engine.config.set_candidate_filter(FILTER_OFF)
        tuning = choose_candidate_filter(candidate_evidence(engine, guard), log=lambda m: None)
        engine.config.set_candidate_filter(tuning)
        return validation_metrics(engine, [], guard), tuning

    def one_pass():
        engine.config.set_candidate_filter(parent_filter)
        return retuned_validation_metrics(engine, [], guard)

    runs = {"two_passes": [], "one_pass": []}
    for _ in range(args.repeats):
        for name, validate in (("two_passes", two_passes), ("one_pass", one_pass)):
            started = time.perf_counter()
            metrics, tuning = validate()
            runs[name].append({"seconds": round(time.perf_counter() - started, 2), "metrics": metrics,
                               "filter": {key: tuning[key] for key in FILTER_OFF}})
            print(name, json.dumps(runs[name][-1]), flush=True)
    medians = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    result = {"model": args.model, "guard_phantoms": args.guard, "max_in_plane": args.max_in_plane,
              "threads": args.threads, "median_seconds": medians,
              "ratio": round(medians["one_pass"] / medians["two_passes"], 3),
              "same_filter": all(a["filter"] == b["filter"] for a, b in zip(runs["one_pass"], runs["two_passes"])),
              "largest_metric_difference": max(abs(a["metrics"][k] - b["metrics"][k]) for a, b in
                                               zip(runs["one_pass"], runs["two_passes"]) for k in a["metrics"]),
              "runs": runs}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
