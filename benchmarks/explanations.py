"""Integrated-Gradients explanations (``liverlesionai.explain``): time, completeness and faithfulness.

Per lesion of the real case (and pooled over phantom test lesions):
- seconds to explain it (the path integral only, after one shared network run; median of ``--repeats``);
- completeness: |sum of attributions - (score - baseline score)| relative to the score change;
- faithfulness (deletion): the score change undone by putting the baseline back at the 20% of the replaced
  voxels with the highest attribution, at 20% random ones and at the 20% lowest, as fractions of the change;
- where the evidence lies: the share of the positive attribution in the lesion's core (deeper than half its
  maximum depth) against the core's share of the lesion's voxels, by true type (phantoms, correctly typed).

    python benchmarks/explanations.py --model LiverLesionAI/Resources/Models/liverlesionai-v5.5 \\
        --real ../shared/data/ircadb-01/case_01/image.nii.gz --phantoms 0-9 --threads 2 \\
        --out benchmarks/results/explanations_v5.5.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def lesion_rows(engine, ct, truth=None, repeats=1, rng=None):
    import torch
    from scipy import ndimage

    from liverlesionai.explain import ScoreFunction, integrated_gradients
    from liverlesionai.geometry import canonicalize, resample_separable

    outputs = engine.run_networks(ct)
    result = engine.lesions_from(outputs)
    if not result.lesions:
        return []
    instances2 = resample_separable(canonicalize(result.lesion_instances, ct.ijk_to_ras).array, outputs.canon.grid,
                                    outputs.grid2, 0, dtype=np.uint16)
    stage2, views = engine.experts[outputs.expert].stage2, engine.config.stage2_views
    rows = []
    for record in result.lesions:
        mask2 = instances2 == record.lesion_id
        if not mask2.any():
            continue
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            e = integrated_gradients(stage2, outputs.hu2, outputs.prior2, mask2, outputs.grid2, record.lesion_type,
                                     views, engine.device, lesion_id=record.lesion_id)
            seconds.append(time.perf_counter() - started)
        explained = e.score - e.baseline_score
        score = ScoreFunction(stage2, e.liver_prior, e.lesion_mask, e.lesion_type, views, engine.device)
        changed = np.flatnonzero((e.image != e.baseline).ravel())
        ranked = changed[np.argsort(-e.attribution.ravel()[changed])]
        n = max(1, len(changed) // 5)

        def undone(voxels):
            volume = e.image.copy().ravel()
            volume[voxels] = e.baseline.ravel()[voxels]
            return (e.score - score(torch.from_numpy(volume.reshape(e.image.shape)))) / explained

        depth = ndimage.distance_transform_edt(e.lesion_mask)
        core = e.lesion_mask & (depth > 0.5 * depth.max())
        positive = np.clip(e.attribution, 0, None)
        row = {"lesion_id": record.lesion_id, "type": record.lesion_type, "volume_ml": round(record.volume_ml, 2),
               "voxels_on_stage2_grid": int(mask2.sum()), "seconds": round(statistics.median(seconds), 2),
               "steps": e.steps, "score": round(e.score, 4), "baseline_score": round(e.baseline_score, 4),
               "relative_gap": round(e.relative_gap, 4), "inside_share": round(e.inside_share, 3),
               "core_share_of_positive": round(float(positive[core].sum() / max(positive.sum(), 1e-12)), 3),
               "core_share_of_voxels": round(float(core.sum() / e.lesion_mask.sum()), 3)}
        if explained > 0.05:  # deletion fractions are meaningless for a score stage 2 barely changes
            row.update({"undone_top20": round(undone(ranked[:n]), 3), "undone_bottom20": round(undone(ranked[-n:]), 3),
                        "undone_random20": round(undone(rng.choice(changed, n, replace=False)), 3)})
        if truth is not None:
            ids, counts = np.unique(truth.lesion_instances[result.lesion_instances == record.lesion_id],
                                    return_counts=True)
            hit = ids > 0
            row["true_type"] = truth.lesion_types.get(int(ids[hit][np.argmax(counts[hit])])) if hit.any() else None
        rows.append(row)
    return rows


def pooled(rows):
    def median(key, subset=None):
        values = [r[key] for r in (subset or rows) if key in r]
        return round(statistics.median(values), 3) if values else None

    out = {"lesions": len(rows), "median_relative_gap": median("relative_gap"),
           "max_relative_gap": max((r["relative_gap"] for r in rows), default=None),
           "median_undone_top20": median("undone_top20"), "median_undone_random20": median("undone_random20"),
           "median_undone_bottom20": median("undone_bottom20"),
           "top_beats_random": sum(r["undone_top20"] > r["undone_random20"] for r in rows if "undone_top20" in r),
           "with_deletion": sum("undone_top20" in r for r in rows)}
    by_type = {}
    for lesion_type in ("cyst", "hemangioma", "metastasis"):
        right = [r for r in rows if r.get("true_type") == lesion_type == r["type"]]
        if right:
            by_type[lesion_type] = {"lesions": len(right), "core_share_of_positive": median("core_share_of_positive", right),
                                    "core_share_of_voxels": median("core_share_of_voxels", right)}
    if by_type:
        out["correctly_typed_by_type"] = by_type
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--real", type=Path, help="a real CT (its lesions are explained and timed)")
    parser.add_argument("--phantoms", default="0-9", help="phantom test seeds, e.g. 0-9")
    parser.add_argument("--max-in-plane", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per real lesion")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch

    from liverlesionai.cli import _seed_range
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.phantom import generate_phantom_ct
    from liverlesionai.volume_io import read_ct

    engine = LiverLesionEngine(args.model, device="cpu", threads=args.threads, precision="fp32")
    rng = np.random.default_rng(0)
    report = {"model": engine.version, "threads": args.threads, "torch": torch.__version__}
    if args.real:
        rows = lesion_rows(engine, read_ct(args.real), repeats=args.repeats, rng=rng)
        report["real"] = {"case": args.real.parent.name, "per_lesion": rows, "pooled": pooled(rows)}
        for row in rows:
            print(json.dumps(row), flush=True)
    phantom_rows = []
    for seed in _seed_range(args.phantoms):
        ct, truth = generate_phantom_ct(seed, max_in_plane=args.max_in_plane)
        for row in lesion_rows(engine, ct, truth, rng=rng):
            phantom_rows.append({"seed": seed, **row})
            print(json.dumps(phantom_rows[-1]), flush=True)
    report["phantoms"] = {"seeds": args.phantoms, "max_in_plane": args.max_in_plane, "per_lesion": phantom_rows,
                          "pooled": pooled(phantom_rows)}
    print(json.dumps({k: v["pooled"] for k, v in report.items() if isinstance(v, dict)}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
