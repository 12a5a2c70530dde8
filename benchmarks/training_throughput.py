"""Where a training step's time goes: rendering the batch from phantoms against the network's optimiser step.

Training draws its batches in the training process itself (``training.stage1_batch`` / ``stage2_batch`` from a
``PhantomSource``), so on a GPU, where the optimiser step is cheap, the rendering sets the pace. This times both
for each stage, the recipe's batch of 16, medians after warm-up; the stage's weights are untrained (the step's cost
does not depend on them). Then stage 2's training loop itself (``train_stage``, worker start-up included) with the
batches rendered in the training process and in render workers (``--workers``).

    python benchmarks/training_throughput.py --threads 2 --out benchmarks/results/training_throughput_cpu.json
    python benchmarks/training_throughput.py --device cuda --workers 0,14 --loop-steps 300 \\
        --out DIR/training_throughput_cuda.json  # GPU machine, 16 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def stage_timings(stage: str, device: torch.device, steps: int, warmup: int) -> dict:
    from liverlesionai import training as T
    from liverlesionai.networks import CascadeConfig, UNet2p5D

    cfg = CascadeConfig()
    source = T.PhantomSource(T.STAGE_SEED_BASES[stage] + 900_000, reuse=4 if stage == "stage1" else 2)
    make_batch = T.stage1_batch if stage == "stage1" else T.stage2_batch
    net = UNet2p5D(getattr(cfg, stage)).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    render, step = [], []
    for i in range(warmup + steps):
        started = time.perf_counter()
        batch = make_batch(source, cfg, rng, 16)
        rendered = time.perf_counter()
        T.train_step(net, optimizer, batch, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            render.append(rendered - started)
            step.append(time.perf_counter() - rendered)
    median_render, median_step = float(np.median(render)), float(np.median(step))
    return {"render_s": round(median_render, 3), "optimiser_step_s": round(median_step, 3),
            "render_share": round(median_render / (median_render + median_step), 2),
            "steps_per_s": round(1 / (median_render + median_step), 2),
            "steps_per_s_if_rendering_were_free": round(1 / median_step, 1),
            "input_shape": list(batch[0].shape)}


def loop_steps_per_s(stage: str, device: torch.device, steps: int, workers: int) -> float:
    """Steps per second of ``training.train_stage`` itself over ``steps`` steps, batches rendered in ``workers``
    processes (0: in the training process), worker start-up included."""
    import tempfile

    from liverlesionai import training as T

    with tempfile.TemporaryDirectory() as run:
        started = time.perf_counter()
        T.train_stage(stage, run, steps, device=str(device), log=lambda m: None, workers=workers)
        return round(steps / (time.perf_counter() - started), 2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", default="0,1", help="render-worker counts of the whole-loop measurement")
    parser.add_argument("--loop-steps", type=int, default=40)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: not overwriting an earlier result")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = {"device": str(device), "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "steps": args.steps, "warmup": args.warmup,
              **{stage: stage_timings(stage, device, args.steps, args.warmup) for stage in ("stage1", "stage2")},
              "stage2_loop_steps_per_s_by_workers": {
                  w: loop_steps_per_s("stage2", device, args.loop_steps, int(w)) for w in args.workers.split(",")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
