"""Evidence that fine-tuning on a few corrected cases helps on a shifted domain without hurting the original.

1. Shifted domain: phantoms drawn with ``phantom.make_phantom(domain=...)`` (default: a lower-contrast,
   noisier acquisition: liver 60-80 HU, noise 25-35 HU, lesion contrast halved; or a lesion look, e.g.
   ``--domain '{"metastasis_look": "hypervascular"}'``).
2. Five shifted phantoms are exported as reviewed ("corrected") cases, ground truth as the review result.
3. The model (default: the shipped one) is fine-tuned on them into a scratch registry (never activated).
4. Parent and new model are evaluated with the real engine on 20 other shifted phantoms and on 20
   original-domain phantoms (the held-out test seeds): lesion Dice (pooled), type accuracy, liver Dice,
   detection F1; and type accuracy on the reference lesions both models matched (each model's own accuracy
   also moves with which lesions it finds). Per-case results are cached, so an interrupted run resumes.
   ``--shifted-test-start N`` draws the shifted test cases from seed N on: fresh cases, to check a choice that
   was made looking at the first ones.

    python benchmarks/finetune_domain_shift.py --threads 2 [--model DIR] [--work /tmp/llai_shift]
    python benchmarks/finetune_domain_shift.py --measure-only   # parent only (choose a shift)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

SHIFT = {"liver_hu": [60, 80], "noise_hu": [25, 35], "lesion_contrast_scale": 0.5}
EXPORT_SEED_BASE = 2_000_000  # neither training (1e6 + <1e6), validation (5e5..) nor test (0..999) seeds
SHIFTED_TEST_SEED_BASE = 2_100_000
ORIGINAL_TEST_SEED_BASE = 0  # training.TEST_SEED_BASE: the shipped model's held-out phantoms


def make_cases(folder: Path, seeds, domain, max_in_plane):
    from liverlesionai.datasets import write_phantom_case

    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        case = folder / f"phantom_{seed:07d}"
        if not case.exists():
            tmp = folder / f".tmp_{seed}"
            if tmp.exists():
                import shutil
                shutil.rmtree(tmp)
            write_phantom_case(tmp, seed, max_in_plane=max_in_plane, domain=domain)
            tmp.rename(case)
    return folder


def case_results(model_dir: Path, cases_dir: Path, cache: Path, device, log) -> list[dict]:
    """``evaluate_case`` results of one model on one folder of cases (cached by weights checksum and
    architecture: v5.1 and v5.2 share their weights, not their lesion rule)."""
    from liverlesionai.datasets import find_cases
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.evaluation import evaluate_case
    from liverlesionai.model_io import read_model_card

    card = read_model_card(model_dir)
    model_key = hashlib.sha256((card["weights_sha256"] + json.dumps(card["architecture"], sort_keys=True)).encode())
    model_key = model_key.hexdigest()[:16]
    cache = cache / model_key / cases_dir.name
    cache.mkdir(parents=True, exist_ok=True)
    engine, results = None, []
    for case in find_cases(cases_dir):
        path = cache / f"{case.case_id}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
            continue
        engine = engine or LiverLesionEngine(model_dir, device=device)
        ct = case.load_image()
        t0 = time.time()
        pred = engine.segment(ct)
        m = evaluate_case(pred.as_prediction(), case.load_truth(), ct.ijk_to_ras, case_id=case.case_id)
        m["seconds"] = round(time.time() - t0, 1)
        m["expert"] = pred.expert  # which stage-2 expert a gated model ran (domain_gate)
        path.write_text(json.dumps(m))
        results.append(m)
        log(f"  {model_key[:8]} {cases_dir.name}/{case.case_id}: lesion Dice {m['lesion_dice']:.3f} ({m['seconds']} s)")
    return results


def summarize(results: list[dict]) -> dict:
    """The figures this benchmark reports, from ``case_results``."""
    from liverlesionai.evaluation import aggregate

    s = aggregate(results)
    return {"n_cases": s["n_cases"], "lesion_dice": s["global_lesion_dice"], "type_accuracy": s["type_accuracy"],
            "liver_dice": s["mean_liver_dice"], "detection_f1": s["detection"]["f1"],
            "typed_lesions": int(sum(map(sum, s["type_confusion"]["matrix"]))), "type_confusion": s["type_confusion"],
            "cases_to_site_expert": sum(r.get("expert") == "site" for r in results)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="parent model folder (default: the shipped model)")
    p.add_argument("--work", default="/tmp/llai_domain_shift", help="scratch folder (cases, registry, cache)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "finetune_domain_shift.json"))
    p.add_argument("--domain", default=json.dumps(SHIFT), help="phantom domain shift as JSON")
    p.add_argument("--n-export", type=int, default=5)
    p.add_argument("--n-test", type=int, default=20)
    p.add_argument("--n-original-test", type=int, default=None, help="original-domain test cases (default: --n-test)")
    p.add_argument("--shifted-test-start", type=int, default=0,
                   help="first shifted test seed after SHIFTED_TEST_SEED_BASE: fresh cases, for checking a choice "
                        "made on others")
    p.add_argument("--max-in-plane", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps-per-epoch", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--settings", default="{}", help="FinetuneSettings overrides as JSON")
    p.add_argument("--measure-only", action="store_true", help="evaluate the parent only")
    p.add_argument("--prepare-only", action="store_true", help="only write the phantom cases and the dataset")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from liverlesionai.finetune import FinetuneSettings, export_phantom_case, finetune, same_lesions_typed_right
    from liverlesionai.registry import ModelRegistry, find_shipped_model

    log = lambda m: print(m, flush=True)  # noqa: E731
    started = time.time()
    domain = json.loads(args.domain)
    work = Path(args.work)
    parent_dir = Path(args.model) if args.model else find_shipped_model()
    if parent_dir is None and not args.prepare_only:
        sys.exit("No shipped model found; pass --model DIR.")
    log(f"parent model {parent_dir}, domain shift {domain}")
    # the domain is part of the folder name: the per-case result cache is keyed by folder name
    domain_key = hashlib.sha256(json.dumps(domain, sort_keys=True).encode()).hexdigest()[:8]
    first_shifted = SHIFTED_TEST_SEED_BASE + args.shifted_test_start
    shifted_name = f"shifted_test_{domain_key}" + (f"_from{first_shifted}" if args.shifted_test_start else "")
    shifted = make_cases(work / shifted_name, range(first_shifted, first_shifted + args.n_test), domain,
                         args.max_in_plane)
    n_original = args.n_test if args.n_original_test is None else args.n_original_test
    original = make_cases(work / "original_test",
                          range(ORIGINAL_TEST_SEED_BASE, ORIGINAL_TEST_SEED_BASE + n_original), None, args.max_in_plane)
    dataset = work / "dataset"
    if not (dataset / "dataset.json").exists():
        for seed in range(EXPORT_SEED_BASE, EXPORT_SEED_BASE + args.n_export):
            export_phantom_case(dataset, seed, domain=domain, max_in_plane=args.max_in_plane)
    if args.prepare_only:
        return
    cache = work / "eval_cache"
    results = {"domain": domain, "parent_model": str(parent_dir), "n_test": args.n_test, "precision": "auto",
               "max_in_plane": args.max_in_plane, "threads": args.threads,
               "seeds": {"exported": [EXPORT_SEED_BASE, EXPORT_SEED_BASE + args.n_export - 1],
                         "shifted_test": [first_shifted, first_shifted + args.n_test - 1],
                         "original_test": [ORIGINAL_TEST_SEED_BASE, ORIGINAL_TEST_SEED_BASE + n_original - 1]}}
    log("evaluating the parent")
    folders = {"shifted": shifted, "original": original}
    before = {dom: case_results(parent_dir, folder, cache, args.device, log) for dom, folder in folders.items()}
    results["before"] = {dom: summarize(r) for dom, r in before.items()}
    if not args.measure_only:
        registry = ModelRegistry(work / "registry", shipped_dir=parent_dir)
        done = [v.version for v in registry.list_versions() if not v.shipped]
        if done:
            version = done[-1]
            log(f"reusing fine-tuned {version}")
        else:
            settings = FinetuneSettings(**{"epochs_frozen": max(1, args.epochs // 2),
                                           "epochs_unfrozen": args.epochs - max(1, args.epochs // 2),
                                           "steps_per_epoch": args.steps_per_epoch, **json.loads(args.settings)})
            t0 = time.time()
            version = finetune(dataset, registry, "shipped", settings, args.device,
                               lambda pr: log(f"  [{pr.stage}] {pr.message}"
                                              + (f" (~{pr.eta_s:.0f} s left)" if pr.eta_s else "")), log=log)
            results["finetune_seconds"] = round(time.time() - t0)
        new_dir = registry.model_dir(version)
        card = json.loads((new_dir / "model_card.json").read_text())
        results["finetune"] = {"version": version, "validation": card["validation"],
                               "hyperparameters": card["hyperparameters"], "history": card.get("finetune_history"),
                               "classifier_guard": card.get("classifier_guard")}
        log("evaluating the fine-tuned model")
        after = {dom: case_results(new_dir, folder, cache, args.device, log) for dom, folder in folders.items()}
        results["after"] = {dom: summarize(r) for dom, r in after.items()}
        results["types_on_lesions_both_matched"] = {
            dom: dict(zip(("lesions", "right_before", "right_after"),
                          same_lesions_typed_right(before[dom], after[dom]))) for dom in folders}
    results["seconds"] = round(time.time() - started)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print_table(results)
    log(f"wrote {out}")


def print_table(results):
    fmt = lambda v: "  n/a" if v is None else f"{100 * v:5.1f}"  # noqa: E731
    print(f"\n{'domain':<10} {'metric':<14} {'before':>7} {'after':>7} {'change':>7}")
    for dom in ("shifted", "original"):
        for metric in ("lesion_dice", "type_accuracy", "liver_dice", "detection_f1"):
            before = results["before"][dom].get(metric)
            after = results.get("after", {}).get(dom, {}).get(metric)
            change = None if before is None or after is None else after - before
            print(f"{dom:<10} {metric:<14} {fmt(before):>7} {fmt(after):>7} "
                  f"{'' if change is None else f'{100 * change:+6.1f}':>7}")
        paired = results.get("types_on_lesions_both_matched", {}).get(dom)
        if paired:
            print(f"{dom:<10} types right on the {paired['lesions']} lesions both matched: "
                  f"{paired['right_before']} before, {paired['right_after']} after")


if __name__ == "__main__":
    main()
