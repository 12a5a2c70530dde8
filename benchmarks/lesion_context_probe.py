"""Would more z-context let stage 2 call lesion what it now calls liver? A probe on its frozen features: exploratory.

Stage 2 labels a voxel from 3 axial slices (3.75 mm), and most lesions it misses it calls liver
(detection_by_type.py). A wider slab trained for 1200 steps on the CPU (gpu_stage2_cycle.py --slab-slices 7)
learnt little weight on the added slices, so this asks the question without retraining stage 2: small heads (one
hidden layer of 64) read, per voxel, stage 2's frozen decoder features (16 + 32 channels), class probabilities and
the HU (liver_refinement_head.case_voxels)
- "slice": at the voxel only (what stage 2's last layer reads);
- "z context": the same at the voxel and 2.5 and 5 mm above and below it (features stage 2 computed partly from
  slices it did not see when it labelled the voxel);
- "in-plane context": the same at the voxel and 5 mm to its four sides: the control for five times the inputs.
Each is fitted to "reference lesion" on voxels of stage 2's liver (lesions included) in training phantoms (seeds
TRAIN_SEEDS, never a pool, judge or test seed), every lesion sampled alike whatever its size (inverse-volume
weighting), the liver's vessels as extra negatives, lesion and non-lesion weighing the same in all.

Judged on the 48 pool phantoms and the real case, stage 2's own summed lesion probability scored the same way
(the baseline): a score is thresholded over stage 2's liver, components of at least MIN_VOXELS are candidates, a
reference lesion is reached when a candidate matches it by the model card's rule (evaluation.match_lesions: IoU 0.1,
or half of a lesion under 10 mm covered), a candidate matched to none is false. Each score is compared at its
threshold that reaches the most lesions with at most FALSE_PER_CASE false candidates per pool case, and at its best
detection F1 (no filter, no typing: the candidates any filter or scorer would choose from). Lesion sizes here are
equivalent-sphere diameters on stage 2's 1.25 mm grid; a component of MAX_LIVER_SHARE of stage 2's liver or more
is not a candidate.

    cd benchmarks && python lesion_context_probe.py --model ../LiverLesionAI/Resources/Models/liverlesionai-v5.12 \\
        --cases /tmp/v510 --out results/lesion_context_probe_v5.12.json
"""

from __future__ import annotations

import datetime
import json
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from lesion_rule_candidate import MAX_IN_PLANE, POOL_SEEDS, phantom_set, pool_judge_arguments
from liver_refinement_head import _engine, case_voxels, fit_head, fitted_head
from liverlesionai.evaluation import SIZE_BINS, match_lesions, size_bin

TRAIN_SEEDS = range(1_960_000, 1_960_080)
Z_OFFSETS = ((-4, 0, 0), (-2, 0, 0), (2, 0, 0), (4, 0, 0))  # stage-2 voxels (1.25 mm)
IN_PLANE_OFFSETS = ((0, -4, 0), (0, 4, 0), (0, 0, -4), (0, 0, 4))
HEADS = {"slice": (), "z context": Z_OFFSETS, "in-plane context": IN_PLANE_OFFSETS}
PER_LESION, LIVER_SAMPLES, VESSEL_SAMPLES = 100, 3000, 1000  # training voxels per lesion / per phantom
MIN_VOXELS = 4  # 7.8 mm^3
# a component of half of stage 2's liver or more is the liver, not a lesion proposal: where a score's threshold
# leaves such a blob (the heads' low thresholds), the blob would match a small lesion it covers by the card's rule
MAX_LIVER_SHARE = 0.5
# the heads' probabilities crowd near 1 (lesion and liver weigh the same in their fit, lesion voxels are rare)
THRESHOLDS = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2)) + (0.97, 0.99, 0.995, 0.998, 0.999)
FALSE_PER_CASE = (5, 10, 20, 40, 80)  # the false candidates a case at which the scores are compared


def context_features(v, index, offsets):
    """The head's input at voxels ``index`` (arrays k, j, i): case_voxels' features there and at each offset
    (clipped to the grid)."""
    shape = v["liver"].shape
    parts = [v["features"](index)]
    for offset in offsets:
        parts.append(v["features"](tuple(np.clip(a + d, 0, n - 1) for a, d, n in zip(index, offset, shape))))
    return np.concatenate(parts, 1)


def _training_samples(args):
    from liverlesionai import phantom as ph

    model, seed = args
    engine = _engine(model)
    ct, truth = ph.generate_phantom_ct(seed, max_in_plane=MAX_IN_PLANE)
    v = case_voxels(engine, ct, tissue=truth.tissue, lesion_instances=truth.lesion_instances)
    rng = np.random.default_rng(seed)
    organ, instances = v["liver"], v["instances"]
    picks, labels, weights = [], [], []
    for lesion_id in np.unique(instances[organ & (instances > 0)]):
        index = np.nonzero(organ & (instances == lesion_id))
        pick = rng.choice(len(index[0]), min(PER_LESION, len(index[0])), replace=False)
        picks.append(tuple(a[pick] for a in index))
        labels.append(np.ones(len(pick), bool))
        weights.append(np.full(len(pick), 1.0 / len(pick)))  # each lesion weighs 1
    for mask, count in ((organ & (instances == 0), LIVER_SAMPLES),
                        (organ & (instances == 0) & (v["tissue"] == ph.LIVER_VESSEL), VESSEL_SAMPLES)):
        index = np.nonzero(mask)
        pick = rng.choice(len(index[0]), min(count, len(index[0])), replace=False)
        picks.append(tuple(a[pick] for a in index))
        labels.append(np.zeros(len(pick), bool))
        weights.append(np.full(len(pick), 1.0))
    index = tuple(np.concatenate([p[axis] for p in picks]) for axis in range(3))
    features = {name: context_features(v, index, offsets) for name, offsets in HEADS.items()}
    return features, np.concatenate(labels), np.concatenate(weights)


def balanced(weights, is_lesion):
    """The samples' weights scaled so that lesion and non-lesion samples weigh the same in all (mean 1)."""
    out = weights / weights[is_lesion].sum()
    out[~is_lesion] = weights[~is_lesion] / weights[~is_lesion].sum()
    return out * len(out) / 2


def candidates_by_threshold(score, organ, instances, small_ids):
    """Per threshold: the reference lesion ids matched by a candidate (evaluation.match_lesions, the card's rule;
    ``small_ids``: the lesions under 10 mm) and the number of candidates matched to none (false)."""
    from scipy import ndimage

    rows = []
    for threshold in THRESHOLDS:
        components, n = ndimage.label((score >= threshold) & organ)
        voxels = np.bincount(components.ravel(), minlength=n + 1)
        keep = (voxels >= MIN_VOXELS) & (voxels < MAX_LIVER_SHARE * organ.sum())
        keep[0] = False
        candidates = np.where(keep[components], components, 0)
        matched = match_lesions(candidates, instances, small_ids)
        rows.append({"threshold": float(threshold), "reached": sorted(m["gt_id"] for m in matched["matches"]),
                     "false": len(matched["unmatched_pred"])})
    return rows


def _case_scores(args):
    from liverlesionai.datasets import find_cases

    model, folder, heads = args
    engine = _engine(model)
    case = find_cases(folder)[0]
    v = case_voxels(engine, case.load_image(), lesion_instances=case.load_truth()["lesion_instances"])
    organ, instances = v["liver"], v["instances"]
    spacing = np.asarray(engine.config.stage2_spacing)
    lesion_ids, sizes = np.unique(instances[instances > 0], return_counts=True)
    diameters = (6 * sizes * np.prod(spacing) / np.pi) ** (1 / 3)
    small_ids = [int(i) for i, d in zip(lesion_ids, diameters) if d < 10]
    scores = {"stage 2 (summed lesion probability)": np.where(organ, v["lesion_probability"], 0.0)}
    index = np.nonzero(organ)
    for name, fitted in heads.items():
        head = fitted_head(fitted)
        score = np.zeros(organ.shape, np.float32)
        parts = []
        with torch.inference_mode():
            for start in range(0, len(index[0]), 100_000):
                chunk = tuple(a[start:start + 100_000] for a in index)
                x = (context_features(v, chunk, HEADS[name]) - fitted["mean"]) / fitted["std"]
                parts.append(head(torch.from_numpy(x.astype(np.float32)))[:, 0].sigmoid().numpy())
        score[index] = np.concatenate(parts) if parts else []
        scores[name] = score
    in_organ = np.bincount(instances[organ & (instances > 0)], minlength=int(instances.max(initial=0)) + 1)
    return {"case_id": case.case_id,
            "lesions": {int(i): {"diameter_mm": round(float(d), 1), "share_in_stage2_liver": round(in_organ[i] / s, 3)}
                        for i, d, s in zip(lesion_ids, diameters, sizes)},
            "scores": {name: candidates_by_threshold(score, organ, instances, small_ids)
                       for name, score in scores.items()}}


def summary(cases, false_per_case=FALSE_PER_CASE):
    """Per score: lesions reached and false candidates at each threshold, summed over cases, and the operating
    points (the threshold reaching the most lesions with at most ``false_per_case`` false candidates a case) and
    the threshold of the best detection F1 (no filter)."""
    names = list(cases[0]["scores"])
    n_lesions = sum(len(c["lesions"]) for c in cases)
    out = {}
    for name in names:
        sweep = []
        for t, threshold in enumerate(THRESHOLDS):
            reached = [(c, i) for c in cases for i in c["scores"][name][t]["reached"]]
            bins = dict.fromkeys(SIZE_BINS, 0)
            for c, i in reached:
                bins[size_bin(c["lesions"][i]["diameter_mm"])] += 1
            false = sum(c["scores"][name][t]["false"] for c in cases)
            sweep.append({"threshold": float(threshold), "reached": len(reached), "of": n_lesions, "false": false,
                          "f1": 2 * len(reached) / (len(reached) + false + n_lesions), "reached_by_size": bins})
        points = {}
        for limit in false_per_case:
            ok = [row for row in sweep if row["false"] <= limit * len(cases)]
            best = max(ok, key=lambda r: (r["reached"], r["threshold"])) if ok else None
            points[f"at most {limit} false a case"] = best
        out[name] = {"sweep": sweep, "operating_points": points, "best_f1": max(sweep, key=lambda r: r["f1"])}
    return out


def main(argv=None):
    args = pool_judge_arguments(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    report = {"model": args.model, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "train_seeds": [TRAIN_SEEDS.start, TRAIN_SEEDS.stop - 1], "min_voxels": MIN_VOXELS,
              "heads": {name: [list(o) for o in offsets] for name, offsets in HEADS.items()}}
    with ProcessPoolExecutor(args.threads) as pool:
        samples = list(pool.map(_training_samples, [(args.model, s) for s in TRAIN_SEEDS]))
        labels = np.concatenate([s[1] for s in samples])
        weights = np.concatenate([s[2] for s in samples])
        print(f"{len(labels)} samples ({labels.sum()} lesion) in {time.perf_counter() - started:.0f} s", flush=True)
        heads = {name: fit_head(np.concatenate([s[0][name] for s in samples]), labels,
                                weights=balanced(weights, labels)) for name in HEADS}
        del samples
        print(f"heads fitted at {time.perf_counter() - started:.0f} s", flush=True)
        pool_dir = phantom_set(args.cases / "pool", POOL_SEEDS, args.threads)
        folders = sorted(p for p in pool_dir.iterdir() if (p / "image.nii.gz").exists())
        pool_cases = list(pool.map(_case_scores, [(args.model, f, heads) for f in folders]))
        real = _case_scores((args.model, args.real_case, heads))
    report["pool"] = summary(pool_cases)
    real_sweeps = {name: s["sweep"] for name, s in summary([real]).items()}
    report["real_case"] = {"lesions": real["lesions"], "sweep": real_sweeps,
                           "at_pool_operating_points": {
        name: {point: None if row is None else {
            "threshold": row["threshold"],
            **{k: v for k, v in real["scores"][name][THRESHOLDS.index(row["threshold"])].items() if k != "threshold"}}
            for point, row in s["operating_points"].items()} for name, s in report["pool"].items()}}
    report["seconds"] = round(time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.rename(args.out)
    for name, s in report["pool"].items():
        print(name, json.dumps(s["operating_points"]))
    print(json.dumps(report["real_case"]["at_pool_operating_points"]))


if __name__ == "__main__":
    main()
