"""Exploratory (nothing adopted): does noise limit the site expert's lesion typing? The head's view descriptors
computed on a Gaussian-smoothed view (sigma in stage-2 pixels), on a fine-tuned version from
finetune_domain_shift.py (its site expert keeps the parent's head).

``reference``: phantom lesions through their reference masks (and random cores, training.classifier_samples), of
the site's acquisition (the card's site_phantom_domain) or the default one, typed by that domain's expert.
``engine``: the 120 shifted test cases, stage 1 and 2 run once per case and the lesions typed under each sigma
(the masks are the same for every sigma).

    python benchmarks/site_descriptor_smoothing.py reference /tmp/llai_fresh_s0/registry/versions/v0001 site 400 \\
        --out benchmarks/results/site_descriptor_smoothing_reference_site.json
    python benchmarks/site_descriptor_smoothing.py engine /tmp/llai_fresh_s0/registry/versions/v0001 \\
        /tmp/llai_old60/shifted_test_0a269a76 --out benchmarks/results/site_descriptor_smoothing_engine_seed0.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

SIGMAS = (0.0, 0.45, 0.6, 0.8)


def _confusion(labels, predicted) -> list:
    matrix = np.zeros((3, 3), int)
    for truth, guess in zip(labels, predicted):
        matrix[truth, guess] += 1
    return matrix.tolist()


_SIGMA = {"value": 0.0}  # the smoothing the patched descriptors apply now


def _smoothed_descriptors(original):
    def descriptors(image, mask):
        sigma = _SIGMA["value"]
        return original(ndimage.gaussian_filter(np.asarray(image, np.float32), sigma) if sigma else image, mask)
    return descriptors


def reference_lesions(model: Path, domain_name: str, count: int, seed: int) -> dict:
    """Type accuracy of the domain's expert on ``count`` reference-mask lesions under each sigma (each lesion drawn
    once, its view vectors made once per sigma)."""
    from liverlesionai import training
    from liverlesionai.engine import LiverLesionEngine

    vectors = {s: [] for s in SIGMAS}
    original_vectors, original_descriptors = training.lesion_view_vectors, training.lesion_view_descriptors

    def every_sigma(*args):
        for sigma in SIGMAS:
            _SIGMA["value"] = sigma
            vectors[sigma].append(torch.cat(original_vectors(*args), dim=1))
        _SIGMA["value"] = 0.0
        return original_vectors(*args)

    engine = LiverLesionEngine(model, device="cpu")
    card = json.loads((Path(model) / "model_card.json").read_text())
    domain = card["site_phantom_domain"] if domain_name == "site" else None
    expert = engine.experts["site" if domain_name == "site" else "parent"]
    training.lesion_view_vectors = every_sigma
    training.lesion_view_descriptors = _smoothed_descriptors(original_descriptors)
    try:
        with torch.inference_mode():
            _, labels = training.classifier_samples(
                expert.stage2, expert.config, training.PhantomSource(training.VALIDATION_SEED_BASE + 777000 + seed * 10000,
                                                                     domain=domain),
                count, np.random.default_rng(seed), engine.device, log=lambda m: None)
            predicted = {s: expert.classifier([torch.cat(vectors[s])]).argmax(1) for s in SIGMAS}
    finally:
        training.lesion_view_vectors, training.lesion_view_descriptors = original_vectors, original_descriptors
    return {str(s): {"type_accuracy": float((p == labels).float().mean()),
                     "confusion": _confusion(labels.tolist(), p.tolist())} for s, p in predicted.items()}


def engine_lesions(model: Path, cases_dir: Path) -> dict:
    """evaluate_case aggregates of the shifted cases under each sigma (site expert only; the parent's untouched)."""
    from liverlesionai import training
    from liverlesionai.datasets import find_cases
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.evaluation import aggregate, evaluate_case
    from liverlesionai.records import SegmentationResult

    engine = LiverLesionEngine(model, device="cpu")
    results = {s: [] for s in SIGMAS}
    original = training.lesion_view_descriptors
    training.lesion_view_descriptors = _smoothed_descriptors(original)
    try:
        for case in find_cases(cases_dir):
            ct, truth = case.load_image(), case.load_truth()
            outputs = engine.run_networks(ct)
            for s in SIGMAS:
                gated = not isinstance(outputs, SegmentationResult) and outputs.expert == "site"
                _SIGMA["value"] = s if gated else 0.0
                result = outputs if isinstance(outputs, SegmentationResult) else engine.lesions_from(outputs)
                results[s].append(evaluate_case(result.as_prediction(), truth, ct.ijk_to_ras, case_id=case.case_id))
    finally:
        training.lesion_view_descriptors, _SIGMA["value"] = original, 0.0
    summary = {}
    for s, rows in results.items():
        a = aggregate(rows)
        summary[str(s)] = {"type_accuracy": a["type_accuracy"], "typed_lesions": int(np.sum(a["type_confusion"]["matrix"])),
                           "confusion": a["type_confusion"]["matrix"], "lesion_dice": a["global_lesion_dice"],
                           "detection_f1": a["detection"]["f1"]}
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    ref = sub.add_parser("reference")
    ref.add_argument("model", type=Path)
    ref.add_argument("domain", choices=("site", "default"))
    ref.add_argument("count", type=int)
    ref.add_argument("--seed", type=int, default=1)
    eng = sub.add_parser("engine")
    eng.add_argument("model", type=Path)
    eng.add_argument("cases", type=Path)
    for p in (ref, eng):
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: not overwriting an earlier result")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    by_sigma = (reference_lesions(args.model, args.domain, args.count, args.seed) if args.what == "reference"
                else engine_lesions(args.model, args.cases))
    report = {"what": args.what, "model": str(args.model), "sigmas_px": list(SIGMAS), "by_sigma": by_sigma,
              **({"domain": args.domain, "lesions": args.count, "seed": args.seed} if args.what == "reference"
                 else {"cases": str(args.cases)}),
              "seconds": round(time.perf_counter() - started)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.rename(args.out)
    print(json.dumps(by_sigma, indent=1))


if __name__ == "__main__":
    main()
