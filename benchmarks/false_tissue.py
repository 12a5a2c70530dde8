"""Exploratory: where stage 2's false lesion tissue on whole phantom CTs comes from (README, "Stage 2 can learn
metastases and hemangiomas").

The bank cycle's stage 2 calls 2-4% of liver pixels lesion on its training blocks and 2-3 times as much on whole
CTs, with stage 1's liver or the reference liver as prior; slice thickness is ruled out (stop 40). Here each pool
phantom is run once through the engine (stage 1, stage 2's grid and prior), then stage 2 is run again on the same
grid and prior with the CT rendered other ways, one factor at a time:
- ``scanner``: the case as the engine sees it (rendered on the scanner's grid, resampled linearly onto stage 2's);
- ``scanner, noise-free``: the same with the phantom's scanner noise set to 0 (blur and textures unchanged);
- ``stage-2 grid``: the phantom rendered straight onto stage 2's grid, as the training blocks are;
- ``stage-2 grid, noise-free``;
- ``scanner, smoothed σ mm`` (``--smooth-mm``): the engine's input smoothed by a Gaussian of σ mm before stage 2, a
  test-time denoising.
Every variant is judged against the labels rendered on stage 2's grid (exact, not resampled): liver pixels (not
lesion) at the shipped threshold, by tissue (parenchyma, intrahepatic vessel), by distance to the nearest lesion
and by depth inside the liver; the share of lesion pixels at the threshold; and the false pieces (connected lesion
tissue at the threshold inside the reference liver touching no lesion, at least MIN_PIECE_VOXELS; and those whose
mean lesion probability reaches the shipped filter's CONFIDENT, which v5.12's filter would keep unless they hug the
liver's surface).

    python benchmarks/false_tissue.py /tmp/bankcycle/model --every 3 --smooth-mm 1 \
        --out benchmarks/results/false_tissue_bank_cycle.json
    # a cycle from the bank cycle with the liver's pixels weighing 3 times, judged on the case alone
    python benchmarks/gpu_stage2_cycle.py /tmp/bankcycle/model /tmp/ft_liver3 --steps 2000 --peak-lr 3e-4 \
        --device cpu --workers 0 --bank /tmp/bank --type-weight liver=3
    python benchmarks/false_tissue.py /tmp/ft_liver3 --case-only --out benchmarks/results/false_tissue_liver3.json
    # the rims of small lesions priced as the lesions (README, "Weighing the rims of small lesions")
    python benchmarks/gpu_stage2_cycle.py /tmp/bankcycle/model /tmp/ft_rim2 --steps 2000 --peak-lr 3e-4 \
        --device cpu --workers 0 --bank /tmp/bank --rim-px 2
    python benchmarks/false_tissue.py /tmp/ft_rim2 --case-only --out benchmarks/results/false_tissue_rim2.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
from lesion_rule_candidate import MAX_IN_PLANE, POOL_SEEDS
from scipy import ndimage
from stage2_section_fit import CONFIDENT, THRESHOLD

MIN_PIECE_VOXELS = 33  # ~65 mm^3 on stage 2's 1.25 mm grid: a ball of 5 mm
NOISE_FREE = {"noise_hu": (0.0, 0.0)}  # a phantom domain: every other draw of the seed stays as it was
NEAR_LESION_MM = ((0, 2.5), (2.5, 5), (5, 10), (10, np.inf))
DEPTH_MM = ((0, 3), (3, 10), (10, np.inf))


def judge(lesion_probability, tissue, instances, spacing_mm):
    """[hits, pixels] tallies of one variant's summed lesion probability against labels on its own grid."""
    from liverlesionai import phantom as ph
    from liverlesionai.training import LIVER_TISSUES

    liver = np.isin(tissue, LIVER_TISSUES)
    lesion = instances > 0
    parenchyma = liver & ~lesion
    hit = lesion_probability >= THRESHOLD
    near_mm = ndimage.distance_transform_edt(~lesion, sampling=spacing_mm) if lesion.any() else \
        np.full(lesion.shape, np.inf)
    depth_mm = ndimage.distance_transform_edt(liver, sampling=spacing_mm)

    def tally(mask):
        return [int((hit & mask).sum()), int(mask.sum())]

    pieces, n = ndimage.label(hit & liver)
    sizes = ndimage.sum_labels(np.ones_like(pieces), pieces, np.arange(1, n + 1))
    means = ndimage.mean(lesion_probability, pieces, np.arange(1, n + 1))
    touching = set(np.unique(pieces[lesion & (pieces > 0)]).tolist())
    false_pieces = [[int(size), round(float(mean), 3)] for index, (size, mean) in enumerate(zip(sizes, means), start=1)
                    if index not in touching and size >= MIN_PIECE_VOXELS]
    return {"liver": tally(parenchyma), "lesion": tally(lesion),
            "tissue": {"parenchyma": tally(parenchyma & (tissue == ph.LIVER)),
                       "intrahepatic vessel": tally(parenchyma & (tissue == ph.LIVER_VESSEL))},
            "near_lesion": {f"{lo:g}-{hi:g} mm": tally(parenchyma & (near_mm >= lo) & (near_mm < hi))
                            for lo, hi in NEAR_LESION_MM},
            "depth": {f"{lo:g}-{hi:g} mm": tally(parenchyma & (depth_mm >= lo) & (depth_mm < hi))
                      for lo, hi in DEPTH_MM},
            "false_pieces": false_pieces}


def on_grid2(ct, g2, hu_window):
    """The CT on stage 2's grid as the engine resamples it, normalised."""
    from liverlesionai.geometry import canonicalize, resample_separable
    from liverlesionai.preprocessing import normalize_hu

    canon = canonicalize(ct.voxels, ct.ijk_to_ras)
    return normalize_hu(resample_separable(canon.array, canon.grid, g2, 1, cval=-1024), hu_window)


def case_variants(engine, seed, reference_prior, smooth_mm=(), case_only=False):
    """Each variant's ``judge`` of one pool phantom, on the grid and prior of the engine's pass over its case
    (``case_only``: the case itself and its smoothings, not the other renderings)."""
    from liverlesionai import phantom as ph
    from liverlesionai.preprocessing import normalize_hu

    cfg = engine.config
    ct, truth = ph.generate_phantom_ct(seed, max_in_plane=MAX_IN_PLANE)  # the pool case
    outputs = engine.run_networks(ct, liver_prior=truth.liver_mask if reference_prior else None)
    g2, prior2 = outputs.grid2, outputs.prior2

    def on_stage2_grid(domain=None):
        return ph.render(ph.make_phantom(seed, domain), g2, np.random.default_rng(seed + 7))

    rendered = on_stage2_grid()
    _, tissue, instances = rendered
    spacing_mm = np.asarray(g2.spacing, float)[::-1]
    inputs = {"scanner": lambda: outputs.hu2}
    if not case_only:
        quiet_ct = functools.partial(ph.generate_phantom_ct, seed, max_in_plane=MAX_IN_PLANE, domain=NOISE_FREE)
        inputs.update({"scanner, noise-free": lambda: on_grid2(quiet_ct()[0], g2, cfg.hu_window),
                       "stage-2 grid": lambda: normalize_hu(rendered[0], cfg.hu_window),
                       "stage-2 grid, noise-free": lambda: normalize_hu(on_stage2_grid(NOISE_FREE)[0], cfg.hu_window)})
    for sigma_mm in smooth_mm:
        inputs[f"scanner, smoothed {sigma_mm:g} mm"] = functools.partial(ndimage.gaussian_filter, outputs.hu2,
                                                                         sigma_mm / spacing_mm)
    report = {}
    for name, x2 in inputs.items():
        with torch.inference_mode():
            probs = engine._predict_views(engine.stage2, np.ascontiguousarray(x2(), np.float32), prior2,
                                          cfg.stage2_views)
        report[name] = judge(probs[2:].astype(np.float32).sum(0), tissue, instances, spacing_mm)
    report["noise_hu"] = round(float(ph.make_phantom(seed).noise_hu), 1)
    report["scanner_spacing_mm"] = [round(float(s), 3) for s in np.linalg.norm(ct.ijk_to_ras[:3, :3], axis=0)]
    return report


def _rate(pairs):
    hits, total = np.sum(np.array(pairs).reshape(-1, 2), 0)
    return round(float(hits / max(total, 1)), 4)


def summary(per_case: dict) -> dict:
    first = next(iter(per_case.values()))
    variants = [name for name, judged in first.items() if isinstance(judged, dict)]
    out = {}
    for variant in variants:
        rows = [case[variant] for case in per_case.values()]
        out[variant] = {
            "liver pixels at threshold": _rate([r["liver"] for r in rows]),
            "lesion pixels at threshold": _rate([r["lesion"] for r in rows]),
            "by tissue": {k: _rate([r["tissue"][k] for r in rows]) for k in rows[0]["tissue"]},
            "by distance to the nearest lesion": {k: _rate([r["near_lesion"][k] for r in rows])
                                                  for k in rows[0]["near_lesion"]},
            "share of false liver pixels by distance to the nearest lesion": {
                k: round(sum(r["near_lesion"][k][0] for r in rows) / max(sum(r["liver"][0] for r in rows), 1), 3)
                for k in rows[0]["near_lesion"]},
            "by depth in the liver": {k: _rate([r["depth"][k] for r in rows]) for k in rows[0]["depth"]},
            "false pieces": sum(len(r["false_pieces"]) for r in rows),
            "false pieces per case": [len(r["false_pieces"]) for r in rows],
            "false pieces reaching the filter's confidence": sum(mean >= CONFIDENT for r in rows
                                                                 for _, mean in r["false_pieces"])}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--every", type=int, default=3, help="every n-th pool phantom")
    parser.add_argument("--reference-prior", action="store_true", help="the reference liver as stage 2's prior")
    parser.add_argument("--smooth-mm", type=float, nargs="*", default=[],
                        help="also run stage 2 on the engine's input smoothed by a Gaussian of each sigma (mm)")
    parser.add_argument("--case-only", action="store_true",
                        help="judge only the case as the engine sees it (and --smooth-mm), not the other renderings")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from liverlesionai.engine import LiverLesionEngine

    torch.set_num_threads(args.threads)
    started = time.time()
    engine = LiverLesionEngine(args.model, device="cpu", precision="fp32")
    per_case = {}
    for seed in POOL_SEEDS[::args.every]:
        per_case[seed] = case_variants(engine, seed, args.reference_prior, args.smooth_mm, args.case_only)
        print(seed, {name: _rate([v["liver"]]) for name, v in per_case[seed].items() if isinstance(v, dict)},
              flush=True)
    report = {"model": args.model, "reference_prior": args.reference_prior, "smooth_mm": args.smooth_mm,
              "threshold": THRESHOLD,
              "summary": summary(per_case), "per_case": per_case, "seconds": round(time.time() - started)}
    print(json.dumps(report["summary"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
