"""Re-fit only the site head of a fine-tuned version (the last step of fine-tuning behind a domain gate) with the
engine lesions of N site phantoms, and measure each head on the shifted test cases of finetune_domain_shift.py.

Steps as in ``finetune.finetune``: the exported training cases' engine lesions (3 noise passes), then the engine
lesions of the first N site-matched phantoms (``site_head_phantoms``), re-fitted from the parent's head; "refN":
N site-domain lesions through their reference masks instead of the site phantoms' engine lesions.

    python benchmarks/finetune_head_refit.py /tmp/llai_sd_s1 12,40 --out benchmarks/results/finetune_head_refit_seed1.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="finetune_domain_shift.py work folder (registry, dataset, test cases)")
    parser.add_argument("variants", help="comma-separated: N (site phantoms), refN (reference-mask lesions), parent "
                                         "(the parent's head, not re-fitted)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import finetune_domain_shift as bench
    from liverlesionai import export as export_mod
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.finetune import (SITE_HEAD_SEED_OFFSET, FinetuneSettings, exported_lesion_samples, refit_head,
                                        split_cases)
    from liverlesionai.model_io import load_model, save_model
    from liverlesionai.networks import CascadeConfig, LesionClassifierHead
    from liverlesionai.training import (VALIDATION_SEED_BASE, PhantomSource, classifier_samples,
                                        engine_lesion_samples, fresh_phantom_cases)

    variants = args.variants.split(",")
    counts = [int(v) for v in variants if v.isdigit()]
    refs = [int(v[3:]) for v in variants if v.startswith("ref")]
    version_dir = args.work / "registry/versions/v0001"
    state, card = load_model(version_dir)
    settings = FinetuneSettings(**{k: v for k, v in card["hyperparameters"].items()
                                   if k in FinetuneSettings.__dataclass_fields__})
    engine = LiverLesionEngine(version_dir, device="cpu")
    train_cases, _ = split_cases(export_mod.load_dataset(args.work / "dataset"), settings.validation_fraction)
    started = time.time()
    feats, labels = (exported_lesion_samples(engine, train_cases, settings.classifier_engine_passes,
                                             np.random.default_rng(settings.seed * 1000))
                     if variants != ["parent"] else (torch.zeros(0), torch.zeros(0)))
    domain = card["site_phantom_domain"]
    per_phantom = [engine_lesion_samples(engine, [case], log=lambda m: None)[:2] for case in fresh_phantom_cases(
        VALIDATION_SEED_BASE + SITE_HEAD_SEED_OFFSET, max(counts, default=0), settings.guard_max_in_plane, domain)]
    cfg = CascadeConfig.from_dict(card["architecture"])
    if refs:
        ref_feats, ref_labels = classifier_samples(
            engine.experts["site"].stage2, cfg, PhantomSource(VALIDATION_SEED_BASE + SITE_HEAD_SEED_OFFSET + 1000,
                                                              domain=domain),
            max(refs), np.random.default_rng(7), engine.device, log=lambda m: None)
    print(f"samples: {len(labels)} exported, per site phantom {[len(lab) for _, lab in per_phantom]} "
          f"({time.time() - started:.0f} s)", flush=True)
    parent_head = LesionClassifierHead(cfg)
    parent_head.load_state_dict({k[len("classifier."):]: v for k, v in state.items() if k.startswith("classifier.")})
    report = {"version": card["version"], "exported_samples": len(labels), "variants": {}}
    for variant in variants:
        if variant == "parent":
            head, extra_l = parent_head, []
        elif variant.startswith("ref"):
            extra_f, extra_l = [ref_feats[:int(variant[3:])]], [ref_labels[:int(variant[3:])]]
        else:
            chosen = [(f, lab) for f, lab in per_phantom[:int(variant)] if len(lab)]
            extra_f, extra_l = [f for f, _ in chosen], [lab for _, lab in chosen]
        if variant != "parent":
            head = refit_head(parent_head, torch.cat([feats, *extra_f]), torch.cat([labels, *extra_l]),
                              settings.classifier_epochs, settings.seed)
        model_dir = args.work / f"head_{variant}"
        if not model_dir.exists():
            new_state = {**state, **{f"site.classifier.{k}": v for k, v in head.state_dict().items()}}
            save_model(model_dir, new_state, {**{k: v for k, v in card.items() if k != "weights_sha256"},
                                              "version": f"{card['version']}-head-{variant}"})
        metrics = bench.summarize(bench.case_results(
            model_dir, args.work / next(p.name for p in args.work.glob("shifted_test_*")), args.work / "eval_cache",
            "cpu", lambda m: None))
        report["variants"][variant] = {"added_samples": int(sum(len(x) for x in extra_l)), **metrics}
        print(variant, json.dumps(report["variants"][variant]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
