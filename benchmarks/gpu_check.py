"""The CUDA paths, checked on a GPU machine in one short run (CI has no GPU; not a test).

    python benchmarks/gpu_check.py --out DIR            # on the GPU machine, ~5 minutes
    python benchmarks/gpu_check.py --out DIR --smoke    # here, on the CPU: the script itself works

1. ``agreement``: the shipped model on CUDA and on the CPU, same process, same phantom test cases
   (seeds 0.., 384 matrix): Dice / F1 / type accuracy against the phantom truth for both, and how far
   the two devices' outputs differ (liver Dice between them, lesions found, types).
2. ``speed``: ``benchmark.py --small`` (512x512x128 phantom) with ``--device cuda`` (CLI and in-process
   engine) and ``--device cpu`` (engine), each in fresh processes, medians.
3. ``finetune_step``: one fine-tuning optimiser step of the shipped stage 2 (batch 8, crop 96), CUDA
   (bf16 autocast) against the CPU, medians of timed steps after warm-up.
4. ``finetune_cli``: ``liverlesionai finetune DATASET --device cuda`` end to end on exported phantom
   cases into a fresh registry; the new version must load and segment on the CPU.
5. ``torchrun_too_many``: ``torchrun --nproc_per_node=<GPUs + 1>`` with ``--device cuda`` must stop
   with a clear error and leave no version behind.
6. ``training_throughput``: a stage-2 training step's rendering against its optimiser step on CUDA, and stage 2's
   training loop (200 steps) with batches rendered in the training process and in all cores but two
   (``liverlesionai train --workers``; benchmarks/training_throughput.py).

Writes DIR/gpu_check.json; the figures are quoted in the README (Speed; Fine-tuning).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _median_ms(fn, repeats, warmup, sync):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def agreement(model, seeds, max_in_plane, gpu):
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.evaluation import dice, evaluate_case
    from liverlesionai.finetune import _summary
    from liverlesionai.training import fresh_phantom_cases

    engines = {"cpu": LiverLesionEngine(model, device="cpu")}
    if gpu:
        engines["cuda"] = LiverLesionEngine(model, device="cuda")
    per_device = {name: [] for name in engines}
    cases = []
    for case_id, ct, truth in fresh_phantom_cases(seeds[0], len(seeds), max_in_plane):
        results = {name: eng.segment(ct) for name, eng in engines.items()}
        for name, result in results.items():
            per_device[name].append(evaluate_case(result.as_prediction(), truth, ct.ijk_to_ras, case_id=case_id))
        row = {"case": case_id, "lesions": {n: len(r.lesions) for n, r in results.items()},
               "types": {n: [les.lesion_type for les in r.lesions] for n, r in results.items()}}
        if gpu:
            cpu, cuda = results["cpu"], results["cuda"]
            row["liver_dice_cuda_vs_cpu"] = dice(cpu.liver_mask > 0, cuda.liver_mask > 0)
            row["lesion_dice_cuda_vs_cpu"] = dice(cpu.lesion_instances > 0, cuda.lesion_instances > 0)
        cases.append(row)
        print(json.dumps(row), flush=True)
    return {"metrics": {n: _summary(r) for n, r in per_device.items()}, "cases": cases}


def speed(model, out_dir, repeats, gpu):
    runs = {}
    plans = [("cpu", "ours_engine", str(os.cpu_count()))]
    if gpu:
        plans.insert(0, ("cuda", "ours_cli,ours_engine", str(os.cpu_count())))
    for device, only, threads in plans:
        target = Path(out_dir) / f"bench_{device}.json"
        cmd = [sys.executable, str(HERE / "benchmark.py"), "--small", "--device", device, "--only", only,
               "--repeats", str(repeats), "--threads", threads, "--json", str(target), "--model", str(model),
               "--cache", str(Path(tempfile.gettempdir()) / "llai-gpu-check")]
        subprocess.run(cmd, check=True)
        runs[device] = json.loads(target.read_text())
    return runs


def finetune_step(model, gpu, repeats):
    from liverlesionai.finetune import FinetuneSettings, case_batch, export_phantom_case, prepare_case
    from liverlesionai.export import load_dataset
    from liverlesionai.model_io import load_model
    from liverlesionai.networks import CascadeConfig, UNet2p5D
    from liverlesionai.training import train_step

    state, card = load_model(model)
    cfg = CascadeConfig.from_dict(card["architecture"])
    with tempfile.TemporaryDirectory() as tmp:
        export_phantom_case(Path(tmp) / "ds", 900_001, max_in_plane=256)
        prepared = [prepare_case(c, cfg) for c in load_dataset(Path(tmp) / "ds")]
    settings = FinetuneSettings()
    out = {"batch": settings.batch, "crop": settings.crop}
    for name in (["cuda"] if gpu else []) + ["cpu"]:
        device = torch.device(name)
        net = UNet2p5D(cfg.stage2)
        net.load_state_dict({k[len("stage2."):]: v for k, v in state.items() if k.startswith("stage2.")})
        net.to(device).train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)
        rng = np.random.default_rng(0)
        batches = [case_batch(prepared, cfg, rng, settings) for _ in range(4)]
        step = iter(range(10**9))
        sync = torch.cuda.synchronize if name == "cuda" else (lambda: None)
        out[f"{name}_ms"] = _median_ms(lambda: train_step(net, optimizer, batches[next(step) % 4], device),
                                       repeats, 3, sync)
    if gpu:
        out["cpu_over_cuda"] = out["cpu_ms"] / out["cuda_ms"]
    return out


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "liverlesionai.cli", *args], capture_output=True, text=True,
                          env=env)


def finetune_cli(model, device, smoke):
    from liverlesionai.engine import LiverLesionEngine
    from liverlesionai.finetune import export_phantom_case
    from liverlesionai.phantom import generate_phantom_ct
    from liverlesionai.registry import ModelRegistry

    work = Path(tempfile.mkdtemp(prefix="llai-gpu-ft-"))
    dataset, registry_root = work / "dataset", work / "registry"
    for seed in range(900_010, 900_013):
        export_phantom_case(dataset, seed, max_in_plane=128 if smoke else 256)
    fast = ["--epochs", "2", "--steps-per-epoch", "3" if smoke else "25", "--guard-cases", "1" if smoke else "2",
            "--guard-lesions", "10" if smoke else "40", "--device", device, "--registry", str(registry_root),
            "--shipped-model", str(model)]
    t0 = time.perf_counter()
    proc = _cli("finetune", str(dataset), "--progress-json", *fast)
    seconds = time.perf_counter() - t0
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    out = {"returncode": proc.returncode, "seconds": seconds, "progress_lines": len(lines),
           "stages": sorted({p["stage"] for p in lines}), "last": lines[-1] if lines else None,
           "stderr_tail": proc.stderr[-1500:]}
    registry = ModelRegistry(registry_root, shipped_dir=model)
    versions = [v for v in registry.list_versions() if not v.shipped]
    out["new_versions"] = [v.version for v in versions]
    if versions:
        out["card_hyperparameters"] = {k: versions[-1].card.get("hyperparameters", {}).get(k)
                                       for k in ("device", "world_size")}
        ct, _ = generate_phantom_ct(900_020, max_in_plane=128)
        result = LiverLesionEngine(versions[-1].model_dir, device="cpu").segment(ct)
        out["new_version_on_cpu"] = {"liver_ml": round(result.liver_volume_ml, 1), "lesions": len(result.lesions)}

    # more processes than GPUs: a clear error before any work, nothing registered
    torchrun = Path(sys.executable).parent / "torchrun"
    if device == "cuda" and torchrun.exists():
        n = torch.cuda.device_count() + 1
        t0 = time.perf_counter()
        proc = subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={n}", "-m", "liverlesionai.cli",
                               "finetune", str(dataset), *fast], capture_output=True, text=True)
        out["torchrun_too_many"] = {"nproc": n, "returncode": proc.returncode, "seconds": time.perf_counter() - t0,
                                    "error_lines": [ln for ln in proc.stderr.splitlines() if "error:" in ln][:4],
                                    "versions_after": [v.version for v in registry.list_versions()
                                                       if not v.shipped]}
    return out


def training_throughput(gpu: bool, smoke: bool) -> dict:
    """benchmarks/training_throughput.py on this machine: a training step's rendering against its optimiser step,
    and stage 2's training loop with batches rendered in the training process and in all cores but two."""
    from training_throughput import loop_steps_per_s, stage_timings

    device = torch.device("cuda" if gpu else "cpu")
    workers = 1 if smoke else max((os.cpu_count() or 2) - 2, 1)
    steps = 4 if smoke else 200
    return {"stage2": stage_timings("stage2", device, 2 if smoke else 10, 1 if smoke else 3),
            "stage2_loop_steps_per_s_by_workers": {w: loop_steps_per_s("stage2", device, steps, w) for w in (0, workers)}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=str(REPO / "LiverLesionAI/Resources/Models/liverlesionai-v5.12"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, CPU only: checks the script itself")
    p.add_argument("--skip", default="", help="comma-separated parts to skip")
    a = p.parse_args(argv)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    report = {"torch": torch.__version__, "cuda": torch.version.cuda,
              "gpu": torch.cuda.get_device_name(0) if gpu else None, "cpu_threads": os.cpu_count(),
              "model": Path(a.model).name}
    print(json.dumps(report), flush=True)
    skip = set(a.skip.split(","))
    parts = {
        "agreement": lambda: agreement(a.model, list(range(0, 1 if a.smoke else 4)), 128 if a.smoke else 384, gpu),
        "finetune_step": lambda: finetune_step(a.model, gpu, 3 if a.smoke else 10),
        "finetune_cli": lambda: finetune_cli(a.model, "cuda" if gpu else "cpu", a.smoke),
        "speed": lambda: speed(a.model, out_dir, 1 if a.smoke else 3, gpu),
        "training_throughput": lambda: training_throughput(gpu, a.smoke),
    }
    for name, run in parts.items():
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            report[name] = run()
        except Exception as e:  # one part failing must not hide the others' figures
            report[name] = {"error": f"{type(e).__name__}: {e}"}
        report[name + "_seconds"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(report[name])[:3000], flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
