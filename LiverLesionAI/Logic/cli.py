"""``liverlesionai`` command line: the same engine as the Slicer module, for batch users.

Exit codes: 0 success, 2 bad input, 3 output problem, 4 model problem, 130 interrupted, 1 other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .errors import InputError, LiverLesionAIError, ModelFileError, OutputError
from .records import LESION_TYPES

EXIT_INPUT, EXIT_OUTPUT, EXIT_MODEL = 2, 3, 4
CASE_OUTPUTS = (".seg.nrrd", ".lesions.csv", ".lesions.json", ".overview.png")


# ----------------------------------------------------------------------------------------------
# segment
# ----------------------------------------------------------------------------------------------
def _expand_inputs(inputs):
    """Files, DICOM folders, or folders of image files -> list of readable inputs."""
    from .volume_io import READABLE_EXTENSIONS, split_extension

    found = []
    for item in map(Path, inputs):
        if not item.exists():
            raise InputError(f"{item} does not exist.")
        if item.is_dir():
            images = sorted(p for p in item.iterdir() if p.is_file() and split_extension(p)[1] in READABLE_EXTENSIONS)
            found.extend(images if images else [item])  # no image files: a DICOM series folder
        else:
            found.append(item)
    return found


GENERIC_STEMS = {"image", "ct", "volume", "img", "scan"}


def case_name(path: Path) -> str:
    """File stem, or the folder's name for DICOM folders and generic names like case_01/image.nii.gz."""
    from .volume_io import split_extension

    if not path.is_file():
        return path.name
    stem = split_extension(path)[0]
    return path.resolve().parent.name if stem.lower() in GENERIC_STEMS else stem


def write_case_outputs(outdir: Path, name: str, ct, result, extra=None):
    """All four outputs of a case, or none: written in a private temp folder, then moved in place."""
    from .model_io import crash_point, temp_sibling
    from .report import render_overview_png, write_lesions_csv, write_lesions_json
    from .segfile import write_seg_nrrd

    targets = [outdir / f"{name}{suffix}" for suffix in CASE_OUTPUTS]
    existing = [t.name for t in targets if t.exists()]
    if existing:
        raise OutputError(f"{outdir} already holds {', '.join(existing)}; choose another output folder "
                          "(LiverLesionAI never overwrites results).")
    staging = temp_sibling(outdir / name)  # carries our pid: recover_interrupted_outputs tells dead runs
    moved = []
    try:
        staging.mkdir()
        staged = [staging / t.name for t in targets]
        write_seg_nrrd(staged[0], result)
        crash_point("segment:writing")
        write_lesions_csv(staged[1], result.lesions)
        write_lesions_json(staged[2], result, extra)
        render_overview_png(staged[3], ct.voxels, ct.ijk_to_ras, result, case_name=name)
        crash_point("segment:staged")
        for src, dst in zip(staged, targets):
            os.link(src, dst)  # fails instead of replacing a file that appeared meanwhile
            moved.append(dst)
            crash_point("segment:linking" if len(moved) == 1 else f"segment:linked_{len(moved)}")
    except BaseException as error:
        for dst in moved:
            dst.unlink(missing_ok=True)
        if isinstance(error, OSError):  # disk full, permissions, a file that appeared meanwhile
            raise OutputError(f"Cannot write the results of {name} to {outdir}: {error.strerror or error}; "
                              "nothing was written.") from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets


def recover_interrupted_outputs(outdir: Path) -> list[Path]:
    """Undo what a killed ``write_case_outputs`` left in ``outdir``; returns the output files removed.

    Its staging folder still holds all four staged files until the outputs are complete; if only
    some of them were linked into place, those links (same inode, so never a user's file) are
    removed: a case has all four outputs or none. A staging folder whose writer is alive is left alone.
    """
    from .model_io import is_stale_temp

    removed = []
    for staging in list(Path(outdir).iterdir()):
        if not (staging.is_dir() and is_stale_temp(staging)):
            continue
        staged = {p.name: p for p in staging.iterdir()}
        names = {n for n in staged if any(n.endswith(s) for s in CASE_OUTPUTS)}
        cases = {n[: -len(s)] for n in names for s in CASE_OUTPUTS if n.endswith(s)}
        if len(cases) == 1 and len(names) == len(CASE_OUTPUTS):  # staging complete, linking may be partial
            linked = [outdir / n for n in names if (outdir / n).exists() and os.path.samefile(staged[n], outdir / n)]
            if len(linked) < len(CASE_OUTPUTS):
                for target in linked:
                    target.unlink()
                    removed.append(target)
        shutil.rmtree(staging, ignore_errors=True)
    return removed


def _check_outdir(outdir: Path):
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"Cannot create the output folder {outdir}: {e.strerror}.") from None
    from .model_io import temp_sibling

    probe = temp_sibling(outdir / "write-test")
    try:  # os.access says yes to root even where writing fails (read-only or immutable folder)
        probe.mkdir()
        probe.rmdir()
    except OSError:
        raise OutputError(f"The output folder {outdir} is not writable.") from None


def read_mask_on_ct_grid(path, ct, what="liver mask"):
    """Voxels > 0 of a label volume (``what``: a liver mask, lesions included, or a lesion mask) that must lie
    on ``ct``'s voxel grid."""
    import numpy as np

    from .volume_io import read_ct

    mask = read_ct(path)
    name = Path(path).name
    if mask.voxels.shape != ct.voxels.shape or not np.allclose(mask.ijk_to_ras, ct.ijk_to_ras, atol=1e-3):
        raise InputError(f"The {what} {name} is not on the CT's voxel grid (mask {mask.voxels.shape}, CT "
                         f"{ct.voxels.shape}, or another position, spacing or orientation); resample it first.")
    liver = mask.voxels > 0
    if not liver.any():
        raise InputError(f"The {what} {name} is empty (no voxel > 0).")
    return liver


def cmd_segment(args):
    from .engine import LiverLesionEngine
    from .report import format_lesion_table
    from .volume_io import read_ct

    outdir = Path(args.output)
    inputs = _expand_inputs(args.inputs)
    if args.liver_mask and len(inputs) != 1:
        raise InputError(f"--liver-mask goes with exactly one input CT ({len(inputs)} given).")
    _check_outdir(outdir)
    for path in recover_interrupted_outputs(outdir):
        print(f"removed {path.name}: left incomplete by an interrupted run", file=sys.stderr)
    engine = LiverLesionEngine(args.model, device=args.device, threads=args.threads, precision=args.precision)
    emit = _progress_emitter(args.progress_json, len(inputs))
    failures = 0
    for n, path in enumerate(inputs):
        name = case_name(path)
        try:
            clashes = [f"{name}{s}" for s in CASE_OUTPUTS if (outdir / f"{name}{s}").exists()]
            if clashes:
                raise OutputError(f"{outdir} already holds {', '.join(clashes)}; choose another output folder "
                                  "(LiverLesionAI never overwrites results).")
            emit(n, 0.0, f"Reading {path.name}")
            ct = read_ct(path, series_uid=args.series_uid)
            started = time.perf_counter()
            liver_prior = read_mask_on_ct_grid(args.liver_mask, ct) if args.liver_mask else None
            result = engine.segment(ct, progress=lambda f, m: emit(n, 0.05 + 0.85 * f, m), force=args.force,
                                    liver_prior=liver_prior)
            seconds = time.perf_counter() - started
            emit(n, 0.92, "Writing results")
            provenance = {"case": name, "input": path.name, "seconds": round(seconds, 2), "device": str(engine.device)}
            if args.liver_mask:
                provenance["liver_mask"] = Path(args.liver_mask).name
            files = write_case_outputs(outdir, name, ct, result, provenance)
            emit(n, 1.0, "Done")
        except InputError as e:
            if len(inputs) == 1:
                raise
            failures += 1
            print(f"error: {e}", file=sys.stderr)
            continue
        out = sys.stderr if args.progress_json else sys.stdout
        print(f"\n{name}: liver {result.liver_volume_ml:.0f} mL, {len(result.lesions)} lesion(s), "
              f"{seconds:.1f} s on {engine.device}", file=out)
        for message in result.messages:
            print(f"  {message}", file=out)
        if result.lesions:
            print(format_lesion_table(result.lesions), file=out)
        print("  wrote " + ", ".join(str(f) for f in files), file=out)
    return EXIT_INPUT if failures else 0


def _progress_emitter(as_json, n_cases):
    if as_json:
        def emit(case, fraction, message):
            print(json.dumps({"progress": round((case + fraction) / n_cases, 4), "message": message}), flush=True)
        return emit
    from tqdm import tqdm

    bar = tqdm(total=100 * n_cases, bar_format="{l_bar}{bar}| {elapsed}", file=sys.stderr, leave=False,
               disable=None)  # no bar when stderr is not a terminal (logs, CI)

    def emit(case, fraction, message):
        bar.n = int(100 * (case + fraction))
        bar.set_description_str(message[:40])
        bar.refresh()
        if case + fraction >= n_cases:
            bar.close()
    return emit


# ----------------------------------------------------------------------------------------------
# explain
# ----------------------------------------------------------------------------------------------
EXPLANATIONS_SUFFIX = ".explanations"


def write_explanation_folder(outdir: Path, name: str, explanations, hu_window, result=None, extra=None) -> Path:
    """``outdir/<name>.explanations/``: per lesion its attribution map (NRRD, on a crop of stage 2's grid) and
    a PNG, ``explanations.json``, and the segmentation explained (when ``result``). Staged in a private folder
    and renamed in place: all or nothing, and an existing folder is never replaced."""
    from .model_io import crash_point, rename_folder_no_replace, temp_sibling, write_json_atomic
    from .report import render_explanation_png
    from .segfile import write_seg_nrrd
    from .volume_io import write_volume

    target = outdir / f"{name}{EXPLANATIONS_SUFFIX}"
    if target.exists():
        raise OutputError(f"{target} already exists; choose another output folder (LiverLesionAI never overwrites "
                          "results).")
    staging = temp_sibling(target)  # recover_interrupted_outputs removes it if this process dies
    try:
        staging.mkdir()
        lesions = []
        for explanation in explanations:
            stem = f"lesion_{explanation.lesion_id}"
            write_volume(staging / f"{stem}.attribution.nrrd", explanation.attribution, explanation.ijk_to_ras)
            render_explanation_png(staging / f"{stem}.png", explanation, hu_window)
            lesions.append({**explanation.summary(), "attribution": f"{stem}.attribution.nrrd", "image": f"{stem}.png"})
        crash_point("explain:writing")
        if result is not None:
            write_seg_nrrd(staging / "segmentation.seg.nrrd", result)
        from .explain import METHOD
        write_json_atomic(staging / "explanations.json", {**(extra or {}), "method": METHOD, "lesions": lesions})
        crash_point("explain:staged")
        rename_folder_no_replace(staging, target)
    except OSError as error:
        raise OutputError(f"Cannot write the explanations of {name} to {outdir}: {error.strerror or error}; "
                          "nothing was written.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def cmd_explain(args):
    import numpy as np

    from .engine import LiverLesionEngine
    from .explain import explain_lesion, explain_lesions
    from .volume_io import read_ct

    path, outdir = Path(args.input), Path(args.output)
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    if args.steps < 1:
        raise InputError(f"--steps must be at least 1 (got {args.steps}).")
    if args.lesion_type and not args.lesion_mask:
        raise InputError("--lesion-type goes with --lesion-mask (the engine's own lesions keep their types).")
    if args.lesion_mask and args.lesion and len(args.lesion) != 1:
        raise InputError("With --lesion-mask, --lesion gives that one lesion's number (once).")
    _check_outdir(outdir)
    for removed in recover_interrupted_outputs(outdir):
        print(f"removed {removed.name}: left incomplete by an interrupted run", file=sys.stderr)
    name = case_name(path)
    if (outdir / f"{name}{EXPLANATIONS_SUFFIX}").exists():
        raise OutputError(f"{outdir / (name + EXPLANATIONS_SUFFIX)} already exists; choose another output folder "
                          "(LiverLesionAI never overwrites results).")
    engine = LiverLesionEngine(args.model, device=args.device, threads=args.threads, precision=args.precision)
    emit = _progress_emitter(args.progress_json, 1)
    emit(0, 0.0, f"Reading {path.name}")
    ct = read_ct(path, series_uid=args.series_uid)
    started = time.perf_counter()
    result = None
    if args.lesion_mask:
        mask = read_mask_on_ct_grid(args.lesion_mask, ct, what="lesion mask")
        lesion_type = args.lesion_type or max((p := engine.classify_lesion(ct, mask)), key=p.get)
        emit(0, 0.3, "Explaining the lesion")
        explanations = [explain_lesion(engine, ct, mask, lesion_type, (args.lesion or [1])[0], args.steps)]
    else:
        result, explanations = explain_lesions(engine, ct, args.lesion, args.steps,
                                               force=args.force, progress=lambda f, m: emit(0, 0.9 * f, m))
        if not explanations:
            raise InputError(f"Nothing to explain in {path.name}: " + " ".join(result.messages))
    seconds = time.perf_counter() - started
    emit(0, 0.95, "Writing the explanations")
    folder = write_explanation_folder(outdir, name, explanations, engine.config.hu_window, result,
                                      {"case": name, "input": path.name, "model_version": engine.version,
                                       "seconds": round(seconds, 2), "device": str(engine.device)})
    emit(0, 1.0, "Done")
    out = sys.stderr if args.progress_json else sys.stdout
    print(f"\n{name}: {len(explanations)} lesion(s) explained in {seconds:.1f} s on {engine.device}", file=out)
    print("  lesion  type         score  without  attribution sum  gap      inside lesion  steps", file=out)
    for e in explanations:
        print(f"  {e.lesion_id:<6}  {e.lesion_type:<11}  {e.score:5.3f}  {e.baseline_score:7.3f}  "
              f"{float(np.sum(e.attribution)):15.3f}  {e.completeness_gap:+7.4f}  {e.inside_share:13.0%}  {e.steps:5d}",
              file=out)
    print(f"  wrote {folder}", file=out)
    return 0


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------
def evaluate_model_or_predictions(source, dataset_dir, device="auto", threads=None, log=print, precision="auto"):
    """Evaluate a model folder (runs the engine) or a folder of <case>.seg.nrrd predictions."""
    from .datasets import find_cases
    from .evaluation import aggregate, evaluate_case
    from .segfile import read_seg_nrrd

    source = Path(source)
    cases = find_cases(dataset_dir)
    engine = None
    if (source / "model_card.json").exists():
        from .engine import LiverLesionEngine
        engine = LiverLesionEngine(source, device=device, threads=threads, precision=precision)
    elif not source.is_dir():
        raise InputError(f"{source} is neither a model folder nor a folder of .seg.nrrd predictions.")
    results = []
    for case in cases:
        truth = case.load_truth()
        ct = case.load_image()
        started = time.perf_counter()
        if engine is not None:
            pred = engine.segment(ct)
        else:
            seg = source / f"{case.case_id}.seg.nrrd"
            if not seg.exists():
                raise InputError(f"No prediction {seg.name} in {source} for case {case.case_id}.")
            pred = read_seg_nrrd(seg)
        seconds = time.perf_counter() - started
        metrics = evaluate_case(pred.as_prediction(), truth, ct.ijk_to_ras, case_id=case.case_id)
        metrics["seconds"] = round(seconds, 2)
        results.append(metrics)
        det = metrics["detection"]
        log(f"{case.case_id}: liver Dice {metrics['liver_dice']:.3f}, lesion Dice {metrics['lesion_dice']:.3f}, "
            f"lesions TP {det['tp']} FP {det['fp']} FN {det['fn']} ({seconds:.1f} s)")
    summary = aggregate(results)
    if engine is not None:
        summary["model_version"] = engine.version
    return summary


def _summary_lines(summary):
    det = summary.get("detection", {})
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"mean liver Dice {fmt(summary.get('mean_liver_dice'))}, global lesion Dice "
             f"{fmt(summary.get('global_lesion_dice'))}",
             f"detection recall {fmt(det.get('recall'))}, precision {fmt(det.get('precision'))}, "
             f"F1 {fmt(det.get('f1'))}",
             f"type accuracy {fmt(summary.get('type_accuracy'))}"]
    for size, rates in summary.get("detection_by_size", {}).items():
        lines.append(f"  {size:>8}: recall {fmt(rates.get('recall'))}, precision {fmt(rates.get('precision'))}")
    return lines


def cmd_evaluate(args):
    summary = evaluate_model_or_predictions(args.source, args.dataset, args.device, args.threads,
                                            precision=args.precision)
    for line in _summary_lines(summary):
        print(line)
    text = json.dumps(summary, indent=1)
    if args.json:
        from .volume_io import write_file_atomically
        write_file_atomically(args.json, lambda tmp: Path(tmp).write_text(text))
    else:
        print(text)
    return 0


# ----------------------------------------------------------------------------------------------
# phantoms, training, demo
# ----------------------------------------------------------------------------------------------
def _seed_range(text):
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def cmd_phantoms(args):
    from .datasets import write_phantom_case

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for seed in _seed_range(args.seeds):
        folder = write_phantom_case(out / f"phantom_{seed:05d}", seed, max_in_plane=args.max_in_plane)
        print(f"wrote {folder}")
    return 0


def cmd_train(args):
    from .training import build_model

    build_model(args.run_dir, args.model_out, steps1=args.steps1, steps1_restart=args.steps1_restart,
                steps2=args.steps2, steps2_restart=args.steps2_restart, classifier_lesions=args.classifier_lesions,
                device=args.device, threads=args.threads, test_seeds=_seed_range(args.test_seeds),
                real_case=args.real_case, version=args.version, test_max_in_plane=args.test_max_in_plane,
                engine_head_phantoms=args.engine_head_phantoms, workers=args.workers,
                steps2_bank=args.steps2_bank, bank_batches=args.bank_batches,
                bank_thick_fraction=args.bank_thick_slices)
    return 0


def cmd_demo(args):
    from .datasets import write_phantom_case

    out = Path(args.output)
    _check_outdir(out)
    case = out / f"phantom_{args.seed:05d}"
    if not case.exists():
        write_phantom_case(case, args.seed, max_in_plane=args.max_in_plane)
    ns = argparse.Namespace(inputs=[str(case / "image.nii.gz")], output=str(out), model=args.model,
                            device=args.device, threads=args.threads, precision=args.precision, progress_json=False,
                            series_uid=None, force=False, liver_mask=None)
    return cmd_segment(ns)


# ----------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(prog="liverlesionai", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def engine_options(sp):
        sp.add_argument("--model", help="model folder (default: the active model of the registry)")
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu"])
        sp.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
        precision_option(sp)

    def precision_option(sp):
        sp.add_argument("--precision", default="auto", choices=["auto", "fp32"],
                        help="auto: bfloat16 networks where the hardware runs them natively (GPU, CPUs with "
                             "AVX512-BF16/AMX), else float32; fp32: always float32")

    s = sub.add_parser("segment", help="segment liver and lesions, type each lesion")
    s.add_argument("inputs", nargs="+", help="NIfTI/NRRD/MHA files, DICOM series folders, or folders of files")
    s.add_argument("-o", "--output", required=True, help="output folder")
    s.add_argument("--progress-json", action="store_true", help="one JSON progress line per step on stdout")
    s.add_argument("--series-uid", help="DICOM series to read when a folder holds several")
    s.add_argument("--force", action="store_true", help="run on volumes that do not look like CT in HU")
    s.add_argument("--liver-mask", help="label volume on the CT's grid whose voxels > 0 are the liver (lesions "
                                        "included), e.g. a reviewed one: lesions are searched in it instead of "
                                        "in stage 1's liver; one input only")
    engine_options(s)
    s.set_defaults(func=cmd_segment)

    e = sub.add_parser("evaluate", help="Dice, detection and type accuracy against references")
    e.add_argument("source", help="model folder, or folder of <case>.seg.nrrd predictions")
    e.add_argument("dataset", help="folder of cases (image.nii.gz + label.nii.gz)")
    e.add_argument("--json", help="write the metrics JSON here (default: print)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu"])
    e.add_argument("--threads", type=int, default=None)
    precision_option(e)
    e.set_defaults(func=cmd_evaluate)

    ph = sub.add_parser("phantoms", help="write phantom CT cases with ground truth")
    ph.add_argument("output")
    ph.add_argument("--seeds", default="0-19", help="e.g. 0-19 or 3,5,8")
    ph.add_argument("--max-in-plane", type=int, default=None, help="cap the matrix size (e.g. 256)")
    ph.set_defaults(func=cmd_phantoms)

    t = sub.add_parser("train", help="train the cascade from scratch on phantoms (resumable)")
    t.add_argument("run_dir", help="checkpoints go here; rerun to resume")
    t.add_argument("model_out", help="new model folder to create")
    t.add_argument("--steps1", type=int, default=2600)
    t.add_argument("--steps1-restart", type=int, default=800,
                   help="steps of stage 1's warm restart (second learning-rate cycle on new phantoms; 0: none)")
    t.add_argument("--steps2", type=int, default=2400)
    t.add_argument("--steps2-restart", type=int, default=1500,
                   help="steps of stage 2's warm restart (second learning-rate cycle on new phantoms; 0: none)")
    t.add_argument("--steps2-bank", type=int, default=0,
                   help="steps of stage 2's third cycle, drawn at random from a bank of rendered slabs (0: none; "
                        "14000 lifted held-out metastasis sections 24%% -> 66%%, not yet adopted)")
    t.add_argument("--bank-batches", type=int, default=2400,
                   help="batches of 16 slabs in that bank, rendered once into RUN_DIR/stage2_bank_slabs "
                        "(1.6 MB each on disk and in memory)")
    t.add_argument("--bank-thick-slices", type=float, default=0.0, metavar="FRACTION",
                   help="render this fraction of the bank's blocks as CTs of 2-5 mm slices resampled onto stage 2's "
                        "grid, as the engine resamples such CTs (default 0: all rendered straight onto it)")
    t.add_argument("--classifier-lesions", type=int, default=3000)
    t.add_argument("--engine-head-phantoms", type=int, default=230,
                   help="fit the classifier head again on the engine's own lesions of this many fresh training "
                        "phantoms once the lesion rule is chosen, as for v5.5 (0: keep the head fitted on reference "
                        "masks)")
    t.add_argument("--test-seeds", default="0-19", help="held-out phantom seeds for the model card metrics")
    t.add_argument("--test-max-in-plane", type=int, default=384, help="matrix cap of the phantom test cases")
    t.add_argument("--real-case", default=None, help="optional real case folder evaluated for the card")
    t.add_argument("--version", default="1.0.0")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu"])
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--workers", type=int, default=0,
                   help="processes rendering the networks' training batches ahead (0: in the training process); "
                        "on a GPU, where rendering sets the pace, give it the spare CPU cores")
    t.set_defaults(func=cmd_train)

    x = sub.add_parser("explain", help="Integrated-Gradients maps of which voxels make stage 2 type each lesion "
                                       "as it does")
    x.add_argument("input", help="a CT: NIfTI/NRRD/MHA file or DICOM series folder")
    x.add_argument("-o", "--output", required=True, help="output folder (gets <case>.explanations/)")
    x.add_argument("--lesion", type=int, action="append",
                   help="lesion number as `segment` gives it; repeat for several (default: every lesion)")
    x.add_argument("--lesion-mask", help="label volume on the CT's grid whose voxels > 0 are one lesion (e.g. a "
                                         "reviewed segment): explain it instead of the engine's lesions")
    x.add_argument("--lesion-type", choices=LESION_TYPES,
                   help="with --lesion-mask: the type to explain (default: the classifier's)")
    x.add_argument("--steps", type=int, default=8, help="path steps to start with (doubled until the "
                                                        "attributions add up, at most 64)")
    x.add_argument("--progress-json", action="store_true", help="one JSON progress line per step on stdout")
    x.add_argument("--series-uid", help="DICOM series to read when a folder holds several")
    x.add_argument("--force", action="store_true", help="run on volumes that do not look like CT in HU")
    engine_options(x)
    x.set_defaults(func=cmd_explain)

    d = sub.add_parser("demo", help="generate a phantom CT and segment it")
    d.add_argument("--output", default="outputs/demo")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--max-in-plane", type=int, default=None)
    engine_options(d)
    d.set_defaults(func=cmd_demo)
    from .finetune import add_cli; add_cli(sub)  # noqa: E702  finetune, export, models
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_OUTPUT
    except ModelFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_MODEL
    except LiverLesionAIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
