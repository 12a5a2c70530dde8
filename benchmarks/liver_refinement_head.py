"""A liver-boundary refinement head on stage 2's frozen decoder features: exploratory, not a candidate.

Question: is the 0.006 of liver Dice the shipped model lacks on phantoms (0.944 against 0.95) a matter of how
stage 2's last layer reads its own features? Stage 2 takes the IVC and portal trunk into the liver (44 mL a test
phantom) and leaves out a rim of parenchyma (69 mL), benchmarks/liver_errors.py. A small head (one hidden layer,
64 units) reads, per voxel, the last two decoder stages' features (16 + 32 channels), stage 2's class
probabilities and the HU, and is fitted by binary cross-entropy to "reference liver" on voxels of training
phantoms (seeds TRAIN_SEEDS, never a pool, judge or test seed): the IVC and portal voxels stage 2 calls liver,
its liver's inner 4 mm, its whole liver and a 4 mm shell outside it. Then, on each evaluation case, voxels of
stage 2's liver (not lesion) where the head says liver with probability below r are removed, voxels of the shell
above a are added, for the grid REMOVE_BELOW x ADD_ABOVE.

Liver Dice is measured on stage 2's 1.25 mm grid against the reference resampled there (the organ: liver and
lesions), for the 48 pool and 24 judge phantoms of lesion_rule_candidate.py and the real case. Every figure
was seen before this script was written (2026-12-06, the same experiment in scratch scripts), so nothing here is
chosen blind; what it answers is whether a gain on phantoms carries over to real CT.

    cd benchmarks && python liver_refinement_head.py --model ../LiverLesionAI/Resources/Models/liverlesionai-v5.5 \\
        --cases /tmp/v510 --out results/liver_refinement_head_v5.5.json

Result (2026-12-06, 741 s on 2 processes; best on the pool: remove below 0.05, add above 0.5): liver Dice pool
0.9396 -> 0.9476, judge 0.9362 -> 0.9416, real case 0.9153 -> 0.9027; every variant lowers the real case (README).
"""

from __future__ import annotations

import datetime
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lesion_rule_candidate import JUDGE_SEEDS, MAX_IN_PLANE, POOL_SEEDS, phantom_set, pool_judge_arguments

TRAIN_SEEDS = range(1_950_000, 1_950_080)
SHELL_MM = 4.0
REMOVE_BELOW = (None, 0.02, 0.05, 0.1, 0.2)
ADD_ABOVE = (None, 0.3, 0.4, 0.5, 0.6)
SAMPLES = {"great_vessel": 4000, "inner_rim": 6000, "liver": 4000, "shell": 4000}  # per training phantom

_ENGINE = {}


def _engine(model):
    from liverlesionai.engine import LiverLesionEngine

    torch.set_num_threads(1)
    return _ENGINE.get(model) or _ENGINE.setdefault(model, LiverLesionEngine(model, device="cpu", threads=1,
                                                                             precision="fp32"))


def stage2_with_features(engine, x2, prior2, batch=8):
    """Stage 2 of the parent expert over axial slabs, as the engine runs it, keeping the last two decoder stages'
    outputs: (probabilities (5, K, J, I), features (16, K, J, I), coarse features (32, K, J/2, I/2)), float16."""
    from liverlesionai.preprocessing import pad_to_multiple

    net = engine.experts["parent"].stage2
    x, (h, w) = pad_to_multiple(x2, net.divisor, -1.0)
    prior, _ = pad_to_multiple(prior2, net.divisor, 0.0)
    depth = x.shape[0]
    active = np.nonzero(prior.reshape(depth, -1).max(1) > 0.05)[0]
    probs = np.zeros((net.config.num_classes, depth, h, w), np.float16)
    probs[0] = 1.0
    fine = np.zeros((net.config.features[0], depth, h, w), np.float16)
    coarse = np.zeros((net.config.features[1], depth, x.shape[1] // 2, x.shape[2] // 2), np.float16)
    grabbed = {}
    hooks = [net.decoder.stages[-1].register_forward_hook(lambda m, i, o: grabbed.__setitem__("fine", o)),
             net.decoder.stages[-2].register_forward_hook(lambda m, i, o: grabbed.__setitem__("coarse", o))]
    half = (net.config.in_channels - 1) // 2
    padded = np.pad(x, ((half, half), (0, 0), (0, 0)), mode="edge")
    try:
        with torch.inference_mode():
            for start in range(0, len(active), batch):
                ks = active[start:start + batch]
                slab = np.concatenate([np.stack([padded[k:k + 2 * half + 1] for k in ks]), prior[ks][:, None]], 1)
                logits = net(torch.from_numpy(slab).to(engine.device, memory_format=torch.channels_last))
                probs[:, ks] = logits.float().softmax(1).transpose(0, 1).cpu().numpy()[..., :h, :w]
                fine[:, ks] = grabbed["fine"].transpose(0, 1).cpu().numpy()[..., :h, :w]
                coarse[:, ks] = grabbed["coarse"].transpose(0, 1).cpu().numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return probs, fine, coarse


def case_voxels(engine, ct, reference_organ=None, tissue=None, lesion_instances=None, liver_prior=None):
    """Stage 2's liver, summed lesion probability and lesions on its grid, its 4 mm shell, and a function giving the
    head's input at voxels; reference maps given are resampled onto the grid. ``liver_prior``: a liver mask stage 2
    is given instead of stage 1's (the engine's ``liver_prior``)."""
    from scipy import ndimage

    from liverlesionai.engine import stage2_liver_region
    from liverlesionai.geometry import canonicalize, resample_separable
    from liverlesionai.preprocessing import denormalize_hu

    cfg = engine.config
    canon, g2, x2, prior2, _ = engine._stage2_inputs(ct, liver_prior=liver_prior)
    probs, fine, coarse = stage2_with_features(engine, x2, prior2)
    liver = stage2_liver_region(probs.argmax(0), prior2, cfg.stage2_spacing[0])
    lesion_probability = probs[2:].astype(np.float32).sum(0)
    lesion = (lesion_probability >= cfg.lesion_threshold) & liver
    shell = ~liver & (ndimage.distance_transform_edt(~liver, sampling=cfg.stage2_spacing) <= SHELL_MM)
    hu = denormalize_hu(x2, cfg.hu_window)

    def on_grid2(array, order):
        return resample_separable(canonicalize(array.astype(np.float32), ct.ijk_to_ras).array, canon.grid, g2, order)

    def features(index):
        k, j, i = index
        return np.concatenate([fine[:, k, j, i].T, coarse[:, k, j // 2, i // 2].T, probs[:, k, j, i].T,
                               (hu[k, j, i] / 100.0)[:, None]], 1).astype(np.float32)

    out = {"liver": liver, "lesion_probability": lesion_probability, "lesion": lesion, "shell": shell,
           "features": features,
           "inner_rim": liver & (ndimage.distance_transform_edt(liver, sampling=cfg.stage2_spacing) <= SHELL_MM)}
    if reference_organ is not None:
        out["reference"] = on_grid2(reference_organ, 1) > 0.5
    if tissue is not None:
        out["tissue"] = on_grid2(tissue, 0).astype(np.uint8)
    if lesion_instances is not None:
        out["instances"] = np.rint(on_grid2(lesion_instances, 0)).astype(np.int64)
    return out


def _training_samples(args):
    from liverlesionai import phantom as ph

    model, seed = args
    engine = _engine(model)
    ct, truth = ph.generate_phantom_ct(seed, max_in_plane=MAX_IN_PLANE)
    v = case_voxels(engine, ct, tissue=truth.tissue)
    rng = np.random.default_rng(seed)
    pools = {"great_vessel": v["liver"] & ~v["lesion"] & (v["tissue"] == ph.VESSEL),
             "inner_rim": v["inner_rim"] & ~v["lesion"], "liver": v["liver"] & ~v["lesion"], "shell": v["shell"]}
    features, is_liver = [], []
    for name, mask in pools.items():
        index = np.nonzero(mask)
        pick = rng.choice(len(index[0]), min(SAMPLES[name], len(index[0])), replace=False)
        index = tuple(a[pick] for a in index)
        features.append(v["features"](index))
        is_liver.append(np.isin(v["tissue"][index], (ph.LIVER, ph.LIVER_VESSEL, ph.LESION)))
    return np.concatenate(features), np.concatenate(is_liver)


def fit_head(features, is_liver, epochs=30, seed=0, weights=None):
    """A one-hidden-layer head fitted by binary cross-entropy, each sample weighing ``weights`` (default 1)."""
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0) + 1e-3
    x = torch.from_numpy((features - mean) / std)
    y = torch.from_numpy(is_liver.astype(np.float32))
    w = torch.ones(len(y)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    head = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(head.parameters(), 3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for batch in torch.split(torch.randperm(len(y)), 4096):
            loss = nn.functional.binary_cross_entropy_with_logits(head(x[batch])[:, 0], y[batch], weight=w[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    head.eval()
    return {"state": head.state_dict(), "mean": mean, "std": std}


def fitted_head(fitted):
    """The head fit_head fitted, ready to run on standardised inputs."""
    head = nn.Sequential(nn.Linear(len(fitted["mean"]), 64), nn.ReLU(), nn.Linear(64, 1))
    head.load_state_dict(fitted["state"])
    return head.eval()


def rule_name(remove_below, add_above):
    return f"remove<{remove_below}_add>{add_above}"


def _liver_dice_by_rule(args) -> dict:
    from liverlesionai.datasets import find_cases
    from liverlesionai.evaluation import dice

    model, folder, fitted = args
    engine = _engine(model)
    case = find_cases(folder)[0]
    v = case_voxels(engine, case.load_image(), reference_organ=case.load_truth()["liver_mask"] > 0)
    head = fitted_head(fitted)
    index = np.nonzero(v["liver"] | v["shell"])
    with torch.inference_mode():
        x = (v["features"](index) - fitted["mean"]) / fitted["std"]
        p_liver = np.zeros(v["liver"].shape, np.float32)
        p_liver[index] = np.concatenate([head(torch.from_numpy(x[s:s + 200_000]))[:, 0].sigmoid().numpy()
                                         for s in range(0, len(x), 200_000)])
    organ = v["liver"] | v["lesion"]
    result = {"case_id": case.case_id}
    for remove_below in REMOVE_BELOW:
        for add_above in ADD_ABOVE:
            refined = organ.copy()
            if remove_below is not None:
                refined &= ~(v["liver"] & ~v["lesion"] & (p_liver < remove_below))
            if add_above is not None:
                refined |= v["shell"] & (p_liver > add_above)
            result[rule_name(remove_below, add_above)] = dice(refined, v["reference"])
    return result


def main(argv=None):
    args = pool_judge_arguments(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    report = {"model": args.model, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "train_seeds": [TRAIN_SEEDS.start, TRAIN_SEEDS.stop - 1], "samples_per_phantom": SAMPLES}
    with ProcessPoolExecutor(args.threads) as pool:
        samples = list(pool.map(_training_samples, [(args.model, s) for s in TRAIN_SEEDS]))
        features = np.concatenate([f for f, _ in samples])
        is_liver = np.concatenate([y for _, y in samples])
        print(f"{len(is_liver)} samples in {time.perf_counter() - started:.0f} s", flush=True)
        fitted = fit_head(features, is_liver)
        sets = {"pool": phantom_set(args.cases / "pool", POOL_SEEDS, args.threads),
                "judge": phantom_set(args.cases / "judge", JUDGE_SEEDS, args.threads)}
        folders = {name: sorted(p for p in d.iterdir() if (p / "image.nii.gz").exists()) for name, d in sets.items()}
        folders["real_case"] = [args.real_case]
        for name, cases in folders.items():
            rows = list(pool.map(_liver_dice_by_rule, [(args.model, f, fitted) for f in cases]))
            rules = [k for k in rows[0] if k != "case_id"]
            report[name] = {"cases": len(rows), "mean_liver_dice": {r: float(np.mean([row[r] for row in rows]))
                                                                     for r in rules}}
            best = max(rules, key=report[name]["mean_liver_dice"].get)
            print(name, "unchanged", round(report[name]["mean_liver_dice"][rule_name(None, None)], 4),
                  "best", best, round(report[name]["mean_liver_dice"][best], 4), flush=True)
    pool_best = max(report["pool"]["mean_liver_dice"], key=report["pool"]["mean_liver_dice"].get)
    report["best_on_pool"] = {"rule": pool_best, **{name: {
        "unchanged": report[name]["mean_liver_dice"][rule_name(None, None)],
        "refined": report[name]["mean_liver_dice"][pool_best]} for name in ("pool", "judge", "real_case")}}
    report["seconds"] = round(time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.rename(args.out)
    print(json.dumps(report["best_on_pool"], indent=1))


if __name__ == "__main__":
    main()
