"""Candidate v5.10: v5.5 with the great vessels taken out of its liver (CascadeConfig.great_vessel_*).

Where the test set's liver errors are (v5.5, 2026-12-06, the generator's tissue map beside the engine's liver):
stage 2 takes the IVC behind the liver and the portal trunk at the hilum into the liver, the largest single
source of false-positive liver (the reference leaves them out, as liver annotations usually do, and keeps the
thinner intrahepatic vessels in). ``engine.great_vessels`` removes the thick enhancing tubes that reach the
stage-2 liver's surface; lesions are not touched, so detection, lesion Dice and types stay v5.5's exactly.

The rule's parameters are chosen on the 48 pool phantoms (highest mean liver Dice) and judged on the 24 judge
phantoms of lesion_rule_candidate.py, never on the test set or the real case; the networks run once per phantom
and every variant is applied to the same outputs.

    cd benchmarks && python liver_vessel_candidate.py --model ../LiverLesionAI/Resources/Models/liverlesionai-v5.5 \\
        --cases /tmp/v510 --out results/candidate_v5.10.json

Result (2026-12-06, 880 s on 2 processes): judge +0.0042, lesions unchanged, real case -0.0062: not adopted
(README, "Where the test set's liver errors are").
"""

from __future__ import annotations

import datetime
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from lesion_rule_candidate import JUDGE_SEEDS, POOL_SEEDS, phantom_set, pool_judge_arguments
from liverlesionai.training import (GREAT_VESSEL_RULES, choose_great_vessel_rule, great_vessel_rule_name,
                                    mean_liver_dice_by_rule)

DECLARATION = """Declared 2026-12-06 17:05 UTC. Seen before: an exploratory run of a similar grid on 5 pool
phantoms, and a dry run of this script (2 pool phantoms, one variant: radius 4 mm, 20 HU) that also showed one
judge phantom's figure (seed 500100: liver Dice +0.007) and the real case's (unchanged).

Candidate v5.10: liverlesionai-v5.5's networks, classifier head, lesion rule and candidate filter unchanged; the
great-vessel rule (engine.great_vessels) applied to stage 2's liver. Choice (pool only, seeds 500000-500047, 384
matrix): radius in {3, 4, 5} mm x HU above the liver in {15, 20} x partial-volume rim {off, on}, the variant of
highest mean liver Dice (ties: the larger radius, then the higher HU, then rim off). Judge (seeds 500100-500123,
never used for any choice) against v5.5: adopt only if (a) mean liver Dice at least 0.002 higher, (b) every
phantom's lesion instances identical to v5.5's (the rule must not touch lesions), and (c) on the real case
(3D-IRCADb-01 case 1, reported, not chosen on) the liver Dice is not lower by more than 0.002."""
MIN_JUDGE_GAIN = 0.002
MAX_REAL_LOSS = 0.002

_ENGINE = {}


def _case_liver_dice(args) -> dict:
    """training.liver_dice_by_great_vessel_rule of one case folder, in a worker process (one engine each)."""
    from liverlesionai.datasets import find_cases
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.training import liver_dice_by_great_vessel_rule

    model, folder, rules = args
    engine = _ENGINE.get(model) or _ENGINE.setdefault(model, LiverLesionEngine(model, device="cpu", threads=1,
                                                                                 precision="fp32"))
    case = find_cases(folder)[0]
    return {"case_id": case.case_id,
            **liver_dice_by_great_vessel_rule(engine, case.load_image(), case.load_truth(), rules)}


def liver_dice_by_rule(model: str, cases_dir: Path, rules: list, workers: int) -> list[dict]:
    folders = sorted(p for p in cases_dir.iterdir() if (p / "image.nii.gz").exists())
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_case_liver_dice, [(model, f, rules) for f in folders]))


def main(argv=None):
    args = pool_judge_arguments(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    report = {"candidate": "v5.10", "declaration": DECLARATION, "model": args.model,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "pool_seeds": [POOL_SEEDS.start, POOL_SEEDS.stop - 1]}
    pool_rows = liver_dice_by_rule(args.model, phantom_set(args.cases / "pool", POOL_SEEDS, args.threads),
                                   [None, *GREAT_VESSEL_RULES], args.threads)
    report["pool_tuning"] = mean_liver_dice_by_rule(pool_rows)
    chosen = choose_great_vessel_rule(report["pool_tuning"], include_off=False)
    report["chosen"] = chosen
    print("pool", json.dumps(report["pool_tuning"], indent=1), "\nchosen", chosen, flush=True)
    judge_rows = liver_dice_by_rule(args.model, phantom_set(args.cases / "judge", JUDGE_SEEDS, args.threads),
                                    [None, chosen], args.threads)
    judge = mean_liver_dice_by_rule(judge_rows)
    real = {k: v for k, v in _case_liver_dice((args.model, args.real_case, [None, chosen])).items() if k != "case_id"}
    key = great_vessel_rule_name(chosen)
    gain = judge[key]["mean_liver_dice"] - judge["off"]["mean_liver_dice"]
    real_change = real[key]["liver_dice"] - real["off"]["liver_dice"]
    verdicts = {"a_judge_liver_dice_gain": {"value": gain, "pass": gain >= MIN_JUDGE_GAIN},
                "b_lesions_unchanged": {"pass": judge[key]["lesions_unchanged"] and real[key]["lesions_unchanged"]},
                "c_real_case_liver_dice_change": {"value": real_change, "pass": real_change >= -MAX_REAL_LOSS}}
    report.update({"judge_seeds": [JUDGE_SEEDS.start, JUDGE_SEEDS.stop - 1], "judge": judge,
                   "judge_cases": judge_rows, "pool_cases": pool_rows, "real_case": real,
                   "verdicts": verdicts,
                   "verdict": {"adopted": all(v["pass"] for v in verdicts.values())},
                   "seconds": round(time.perf_counter() - started)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.rename(args.out)
    print(json.dumps({k: report[k] for k in ("chosen", "judge", "real_case", "verdicts", "verdict")}, indent=1))


if __name__ == "__main__":
    main()
