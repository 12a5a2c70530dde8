"""Speed and memory of LiverLesionAI against nnU-Net-class peers, on the same volumes and machine.

    python benchmarks/benchmark.py                      # full run: real CT + 600-slice phantom, 3 repeats
    python benchmarks/benchmark.py --small --repeats 1  # smoke run on a 128-slice phantom

Every measurement runs in a fresh subprocess (peak resident memory from that process's own rusage,
so peaks never mix); each is repeated and the medians are reported. Measurements:

- ``ours_cli``: ``liverlesionai segment FILE -o DIR --progress-json``, what a user runs: process start
  to exit (Python start, torch import, model load, read, segment, write .seg.nrrd + lesion table);
  the stages are timed from the progress lines as they arrive.
- ``ours_engine``: the in-process call ``LiverLesionEngine.segment(ct)``, stages from its progress
  callback; reading and writing timed separately.
- ``nnunet`` / ``segresnet``: see ``peers.py``. Heavy on a CPU: by default only a few network passes
  are run and the sliding-window time is projected from their median (``--peer-patches 0``: all).

Writes ``benchmarks/results.json`` and prints a table. Not a test: nothing here asserts a target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# progress message prefix -> stage name (engine.segment's and the CLI's messages)
STAGES = (("Reading", "read"), ("Checking the CT", "check_canonicalize"), ("Finding the liver", "stage1"),
          ("Segmenting and typing", "stage2"), ("Classifying", "classify"), ("Mapping results", "map_back"),
          ("Measuring lesions", "lesion_table"), ("Done:", "after_segment"), ("No liver found", "after_segment"),
          ("Writing results", "write"), ("Done", "exit"))


def stage_of(message):
    return next((name for prefix, name in STAGES if message.startswith(prefix)), message)


def stage_durations(events, end):
    """[(t, message)] -> {stage: seconds from its message to the next one}."""
    out = {}
    for (t, message), nxt in zip(events, [*(e[0] for e in events[1:]), end]):
        name = stage_of(message)
        if name not in ("after_segment", "exit"):
            out[name] = out.get(name, 0.0) + nxt - t
    return out


def _rss_mb(ru):
    return ru.ru_maxrss / 1024.0  # Linux: kilobytes


def _gpu_peak_mb():
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


# ----------------------------------------------------------------------------------------------
# children: one measurement each, JSON on the last stdout line
# ----------------------------------------------------------------------------------------------
def child_engine(path, model, threads, device):
    import resource

    t0 = time.perf_counter()
    import torch

    from liverlesionai.cli import case_name, write_case_outputs
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.volume_io import read_ct

    t_import = time.perf_counter()
    engine = LiverLesionEngine(model, device=device, threads=threads)
    t_model = time.perf_counter()
    ct = read_ct(path)
    t_read = time.perf_counter()
    rss_before = _rss_mb(resource.getrusage(resource.RUSAGE_SELF))
    events = []
    result = engine.segment(ct, progress=lambda f, m: events.append((time.perf_counter(), m)))
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t_seg = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llai-bench-") as out:
        write_case_outputs(Path(out), case_name(Path(path)), ct, result)
    t_write = time.perf_counter()
    stages = {"import": t_import - t0, "model_load": t_model - t_import, "read": t_read - t_model,
              **stage_durations(events, t_seg), "write": t_write - t_seg}
    return {"segment_seconds": t_seg - t_read, "stages": stages, "total": t_write - t0,
            "rss_after_setup_mb": rss_before, "peak_rss_mb": _rss_mb(resource.getrusage(resource.RUSAGE_SELF)),
            "peak_gpu_mb": _gpu_peak_mb(), "liver_ml": round(result.liver_volume_ml, 1),
            "lesions": len(result.lesions), "device": str(engine.device), "threads": torch.get_num_threads()}


def child_peer(peer, path, threads, device, max_patches, mirroring):
    import resource

    import torch

    from peers import run_peer

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="llai-bench-") as out:
        r = run_peer(peer, path, Path(out) / "seg.nii.gz", threads, device, max_patches, mirroring)
    r["total"] = sum(r["stages"].values())
    r["peak_rss_mb"] = _rss_mb(resource.getrusage(resource.RUSAGE_SELF))
    r["peak_gpu_mb"] = _gpu_peak_mb()
    return r


# ----------------------------------------------------------------------------------------------
# parent: fresh process per measurement
# ----------------------------------------------------------------------------------------------
def _wait_rusage(proc):
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ru


def run_cli(path, model, threads, device):
    """``liverlesionai segment`` in a fresh process, wall time from spawn to exit."""
    with tempfile.TemporaryDirectory(prefix="llai-bench-") as out:
        cmd = [sys.executable, "-m", "liverlesionai.cli", "segment", str(path), "-o", out, "--progress-json",
               "--threads", str(threads), "--device", device]
        if model:
            cmd += ["--model", str(model)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        events = []
        for line in proc.stdout:
            if line.startswith("{"):
                events.append((time.perf_counter(), json.loads(line)["message"]))
        stderr = proc.stderr.read()
        ru = _wait_rusage(proc)
        t_end = time.perf_counter()
        if proc.returncode != 0:
            raise RuntimeError(f"liverlesionai segment failed ({proc.returncode}): {stderr[-2000:]}")
        outputs = sorted(p.name for p in Path(out).iterdir())
    stages = {"startup_model_load": events[0][0] - t0 if events else t_end - t0, **stage_durations(events, t_end)}
    return {"total": t_end - t0, "stages": stages, "peak_rss_mb": _rss_mb(ru),
            "cpu_seconds": ru.ru_utime + ru.ru_stime, "outputs": outputs}


def run_child(args_list):
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", *map(str, args_list)]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        stdout = proc.stdout.read()
        ru = _wait_rusage(proc)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.read()[-3000:]}")
    r = json.loads(stdout.strip().splitlines()[-1])
    r["cpu_seconds"] = ru.ru_utime + ru.ru_stime
    if r.get("projected"):  # peers: CPU time of the passes not run, from the median pass
        r["cpu_seconds"] += r["pass_cpu_seconds_median"] * r["passes"] - r["cpu_seconds_of_passes_run"]
    r["peak_rss_mb"] = _rss_mb(ru)
    return r


def median_summary(runs):
    """Medians of total, peak memory and every stage over repeats."""
    keys = sorted({k for r in runs for k in r["stages"]}, key=lambda k: min(
        list(r["stages"]).index(k) if k in r["stages"] else 99 for r in runs))
    out = {"total": float(np.median([r["total"] for r in runs])),
           "peak_rss_mb": float(np.median([r["peak_rss_mb"] for r in runs])),
           "cpu_seconds": float(np.median([r["cpu_seconds"] for r in runs])),
           "stages": {k: float(np.median([r["stages"].get(k, 0.0) for r in runs])) for k in keys}}
    gpu = [r.get("peak_gpu_mb") for r in runs if r.get("peak_gpu_mb") is not None]
    if gpu:
        out["peak_gpu_mb"] = float(np.median(gpu))
    return out


def fmt_stages(stages):
    return ", ".join(f"{k} {v:.2f}" for k, v in stages.items() if v >= 0.005)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the registry's active model)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--small", action="store_true", help="smoke run on a 128-slice phantom")
    p.add_argument("--cache", default=None, help="folder for the generated phantom (default: system temp)")
    p.add_argument("--only", default="ours_cli,ours_engine,nnunet,segresnet",
                   help="comma-separated subset of ours_cli, ours_engine, nnunet, segresnet")
    p.add_argument("--cases", default=None, help="comma-separated subset of case names")
    p.add_argument("--peer-patches", type=int, default=3,
                   help="network passes actually run per peer repeat; the rest is projected (0: run all)")
    p.add_argument("--mirroring", action="store_true", help="nnU-Net's default 8x mirroring TTA (projected)")
    p.add_argument("--json", default=str(HERE / "results.json"))
    p.add_argument("--update", action="store_true",
                   help="keep the other entries of --json and replace only what this run measures")
    p.add_argument("--markdown", action="store_true", help="print the table of --json as Markdown; measure nothing")
    a = p.parse_args(argv)
    if a.markdown:
        print(markdown_table(json.loads(Path(a.json).read_text())))
        return 0

    import volumes

    kwargs = {"cache_dir": a.cache} if a.cache else {}
    cases = volumes.inputs(small=a.small, **kwargs)
    if a.cases:
        cases = {k: v for k, v in cases.items() if k in a.cases.split(",")}
    kinds = a.only.split(",")
    model = a.model
    results = {"meta": _meta(a, model), "cases": {}}
    if a.update and Path(a.json).exists():
        previous = json.loads(Path(a.json).read_text())
        results["cases"] = previous.get("cases", {})
        results["earlier_meta"] = [*previous.get("earlier_meta", []), previous.get("meta")]
    for case, path in cases.items():
        entry = results["cases"].setdefault(case, {"input": str(path)})
        for kind in kinds:
            runs = []
            for rep in range(a.repeats):
                if kind == "ours_cli":
                    r = run_cli(path, model, a.threads, a.device)
                elif kind == "ours_engine":
                    r = run_child(["engine", path, model or "", a.threads, a.device])
                else:
                    r = run_child(["peer", kind, path, a.threads, a.device, a.peer_patches, int(a.mirroring)])
                runs.append(r)
                print(f"{case} {kind} #{rep + 1}: {r['total']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
                      f"[{fmt_stages(r['stages'])}]", flush=True)
            entry[kind] = {"median": median_summary(runs), "runs": runs, "measured": {
                "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "repeats": a.repeats,
                "threads": a.threads, "device": a.device, "model": results["meta"]["model"],
                **({"peer_patches": a.peer_patches, "mirroring": a.mirroring} if kind in ("nnunet", "segresnet")
                   else {})}}
            _ratios(entry)
            _write_json(a.json, results)  # after every measurement: a long run keeps what it measured
    print_table(results)
    return 0


def _ratios(entry):
    ours = entry.get("ours_cli", entry.get("ours_engine"))
    if not ours:
        return
    for peer in ("nnunet", "segresnet"):
        if peer in entry:
            entry[f"ratio_{peer}_over_ours_cli"] = entry[peer]["median"]["total"] / ours["median"]["total"]
            entry[f"cpu_ratio_{peer}_over_ours_cli"] = (entry[peer]["median"]["cpu_seconds"]
                                                        / ours["median"]["cpu_seconds"])


def _meta(a, model):
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = None
    version = None
    if model:
        card = Path(model) / "model_card.json"
        version = json.loads(card.read_text()).get("version") if card.exists() else None
    return {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": a.threads,
            "device": a.device, "torch": torch.__version__, "model": str(model) if model else "registry default",
            "model_version": version, "repeats": a.repeats, "peer_patches": a.peer_patches,
            "nnunet_mirroring": a.mirroring}


def _write_json(path, results):
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def print_table(results):
    print(f"\n{'case':24} {'what':12} {'median s':>9} {'CPU s':>7} {'peak RSS MB':>12}  stages (median s)")
    for case, entry in results["cases"].items():
        for kind in ("ours_cli", "ours_engine", "nnunet", "segresnet"):
            if kind in entry:
                m = entry[kind]["median"]
                proj = " (projected)" if any(r.get("projected") for r in entry[kind]["runs"]) else ""
                print(f"{case:24} {kind:12} {m['total']:9.2f} {m.get('cpu_seconds', float('nan')):7.1f} {m['peak_rss_mb']:12.0f}  "
                      f"{fmt_stages(m['stages'])}{proj}")
        for peer in ("nnunet", "segresnet"):
            if f"ratio_{peer}_over_ours_cli" in entry:
                print(f"{case:24} {peer} / ours_cli = {entry[f'ratio_{peer}_over_ours_cli']:.1f}x wall, "
                      f"{entry[f'cpu_ratio_{peer}_over_ours_cli']:.1f}x CPU time")


def markdown_table(results):
    """The README table: one row per case and measurement, medians."""
    rows = ["| volume | what | median wall s | CPU s | peak RSS MB | stages (median wall s) | peer / ours_cli |",
            "|---|---|---:|---:|---:|---|---:|"]
    for case, entry in results["cases"].items():
        for kind in ("ours_cli", "ours_engine", "nnunet", "segresnet"):
            if kind not in entry:
                continue
            m = entry[kind]["median"]
            proj = " (inference projected)" if any(r.get("projected") for r in entry[kind]["runs"]) else ""
            ratio, cpu_ratio = entry.get(f"ratio_{kind}_over_ours_cli"), entry.get(f"cpu_ratio_{kind}_over_ours_cli")
            rows.append(f"| {case} | {kind} | {m['total']:.1f} | {m.get('cpu_seconds', float('nan')):.1f} | {m['peak_rss_mb']:.0f} | "
                        f"{fmt_stages(m['stages'])}{proj} | {_ratio_text(ratio, cpu_ratio)} |")
    return "\n".join(rows)


def _ratio_text(ratio, cpu_ratio):
    if ratio is None:
        return ""
    return f"{ratio:.1f}x wall" + ("" if cpu_ratio is None else f", {cpu_ratio:.1f}x CPU")


def child_main(argv):
    kind = argv[0]
    if kind == "engine":
        path, model, threads, device = argv[1], argv[2] or None, int(argv[3]), argv[4]
        r = child_engine(path, model, threads, device)
    else:
        peer, path, threads, device, patches, mirroring = argv[1], argv[2], int(argv[3]), argv[4], int(argv[5]), \
            bool(int(argv[6]))
        r = child_peer(peer, path, threads, device, patches, mirroring)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        sys.exit(child_main(sys.argv[2:]))
    sys.exit(main())
