"""Exploratory, nothing adopted: can the head's own inputs tell the engine's false lesions from its true ones?

8 of v5.5's 13 false lesions on the test phantoms are the gallbladder (README, "Where the test set's detection
errors are"), and no candidate-filter threshold separates them (candidate v5.6). A "not a lesion" class for the
classifier head is the lever named there; this measures whether its inputs carry the signal, before any
candidate is declared. Samples are every lesion the shipped engine reports (its rule and filter, as in use):
training phantoms for fitting, the 48 pool phantoms to choose a cut, the 24 judge phantoms to report.

    W=/tmp/fp M=LiverLesionAI/Resources/Models/liverlesionai-v5.5
    for w in 0 1; do python benchmarks/classifier_candidate.py collect candidates --worker $w --model $M \\
        --out $W/candidates_$w.pt --minutes 30 & done; wait
    python benchmarks/classifier_candidate.py collect pool --with-false --model $M --cases /tmp/v53 --out $W/pool.pt &
    python benchmarks/classifier_candidate.py collect judge --with-false --model $M --cases /tmp/v53 --out $W/judge.pt
    wait; python benchmarks/false_lesions.py --work $W --out benchmarks/results/false_lesions_v5.5.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def fit_rejecter(features, is_false, hidden: int, epochs=300, weight_decay=1e-3, seed=0):
    """A logistic (hidden 0) or one-hidden-layer scorer of "not a lesion" on standardised head inputs."""
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0).clamp(min=1e-4)
    layers = [torch.nn.Linear(features.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)] if hidden \
        else [torch.nn.Linear(features.shape[1], 1)]
    net = torch.nn.Sequential(*layers)
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=weight_decay)
    x, y = (features - mean) / std, is_false.float()
    positive_weight = (1 - y).sum() / y.sum().clamp(min=1)
    for _ in range(epochs):
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).squeeze(1), y, pos_weight=positive_weight)
        loss.backward()
        optimiser.step()
    net.eval()
    return lambda f: torch.sigmoid(net((f - mean) / std).squeeze(1)).detach()


def detection_if_dropped(scores, is_false, missed: int, cut: float) -> dict:
    """Detection counts when every reported lesion scoring above ``cut`` is dropped: a dropped true lesion
    becomes a miss."""
    kept = scores <= cut
    tp, fp = int((kept & ~is_false).sum()), int((kept & is_false).sum())
    fn = missed + int((~kept & ~is_false).sum())
    return {"cut": cut, "tp": tp, "fp": fp, "fn": fn, "f1": 2 * tp / max(2 * tp + fp + fn, 1)}


def main(argv=None):
    from liverlesionai.training import NOT_A_LESION

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args(argv)
    if a.out.exists():
        raise SystemExit(f"{a.out} exists: not overwriting an earlier result")
    parts = [torch.load(f, weights_only=False) for f in sorted(a.work.glob("candidates_*.pt"))]
    train = {"features": torch.cat([p["features"] for p in parts]), "labels": torch.cat([p["labels"] for p in parts]),
             "lesions": [x for p in parts for x in p["lesions"]], "phantoms": sum(len(p["metrics"]) for p in parts)}
    sets = {name: torch.load(a.work / f"{name}.pt", weights_only=False) for name in ("pool", "judge")}
    for d in sets.values():
        d["phantoms"] = len(d["metrics"])
        d["missed"] = sum(m["detection"]["fn"] for m in d["metrics"])
    report = {"samples": {name: {"phantoms": d["phantoms"], "true": int((d["labels"] != NOT_A_LESION).sum()),
                                 "false": int((d["labels"] == NOT_A_LESION).sum()),
                                 "false_overlapping_a_reference_lesion": sum(
                                     1 for x in d["lesions"] if x.get("overlaps_reference"))}
                          for name, d in {"train": train, **sets}.items()}}
    print(report["samples"])
    is_false = {name: d["labels"] == NOT_A_LESION for name, d in {"train": train, **sets}.items()}
    for name, hidden in (("logistic", 0), ("mlp_32", 32)):
        scorer = fit_rejecter(train["features"], is_false["train"], hidden)
        scores = {name_: scorer(d["features"]) for name_, d in {"train": train, **sets}.items()}
        result = {"auc": {s: auc(scores[s], is_false[s]) for s in scores}}
        # the cut of highest pool F1 (ties: the higher cut, dropping less), reported on the judge set
        cuts = [round(c, 2) for c in torch.arange(0.05, 1.0001, 0.05).tolist()]
        pool = {c: detection_if_dropped(scores["pool"], is_false["pool"], sets["pool"]["missed"], c) for c in cuts}
        best = max(cuts, key=lambda c: (round(pool[c]["f1"], 4), c))
        result.update({"pool_by_cut": pool, "chosen_cut": best,
                       "judge": {"without": detection_if_dropped(scores["judge"], is_false["judge"],
                                                                 sets["judge"]["missed"], 1.01),
                                 "with_chosen_cut": detection_if_dropped(scores["judge"], is_false["judge"],
                                                                         sets["judge"]["missed"], best)}})
        report[name] = result
        print(name, {k: round(v, 3) for k, v in result["auc"].items()}, "cut", best, "pool", pool[best],
              "judge", result["judge"])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.rename(a.out)


if __name__ == "__main__":
    main()
