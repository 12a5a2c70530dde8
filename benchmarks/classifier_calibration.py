"""How well a model's lesion classifier types phantom lesions, and how honest its probabilities are.

Draws lesions from phantoms no classifier was fitted on (generator seeds from ``--seed-base``), half of them
seen through a random core as stage 2 segments them (training.lesion_core), computes the classifier's
features through the model's own stage 2, and reports on two disjoint halves:

- ``calibration``: the temperature with the lowest negative log-likelihood (training.TEMPERATURE_GRID);
- ``evaluation``: type accuracy, NLL and expected calibration error (10 bins) at the model's temperature
  and at the fitted one (accuracy does not depend on the temperature).

    python benchmarks/classifier_calibration.py --model LiverLesionAI/Resources/Models/liverlesionai-v5.5 \\
        --lesions 1000 --out benchmarks/results/classifier_calibration_v5.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SEED_BASE = 1_430_000  # classifier training draws from 1_400_000, the 5000-lesion figure from 1_410_000/1_420_000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--lesions", type=int, default=1000)
    parser.add_argument("--seed-base", type=int, default=SEED_BASE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F

    from liverlesionai import training as T
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.records import LESION_TYPES

    engine = LiverLesionEngine(args.model, device="cpu", threads=args.threads, precision="fp32")
    rng = np.random.default_rng(args.seed_base)
    started = time.time()
    features, labels = T.classifier_samples(engine.stage2, engine.config, T.PhantomSource(args.seed_base, reuse=3),
                                            args.lesions, rng, engine.device)
    with torch.no_grad():
        logits = engine.classifier.logits(features)
    half = len(labels) // 2
    fitted = T.fit_temperature(logits[:half], labels[:half])
    shipped = float(engine.classifier.temperature)
    held_logits, held_labels = logits[half:], labels[half:]

    def report(temperature):
        probs = (held_logits / temperature).softmax(1)
        return {"temperature": temperature,
                "nll": float(F.cross_entropy(held_logits / temperature, held_labels)),
                "expected_calibration_error": T.expected_calibration_error(probs, held_labels),
                "share_shown_as_1.00": float((probs.max(1).values >= 0.995).float().mean())}

    predicted = held_logits.argmax(1)
    confusion = [[int(((held_labels == r) & (predicted == c)).sum()) for c in range(3)] for r in range(3)]
    result = {"model": str(args.model), "lesions": len(labels), "seed_base": args.seed_base,
              "evaluation_lesions": len(held_labels), "type_accuracy": float((predicted == held_labels).float().mean()),
              "confusion": {"labels": list(LESION_TYPES), "rows": "reference", "matrix": confusion},
              "model_temperature": report(shipped), "fitted_temperature": report(fitted),
              "seconds": round(time.time() - started)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
