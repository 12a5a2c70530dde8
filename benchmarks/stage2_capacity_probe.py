"""Exploratory: can stage 2 learn metastasis and hemangioma pixels at all, given a fixed set of training slabs?

Stage 2 fits the metastasis and hemangioma sections of fresh training blocks little better than those of whole CTs
(README, "Stage 2 is not short of steps"), and neither more steps nor heavier weights moved it. This tells capacity
from signal: each arm trains on the same ``--train-batches`` batches of 16 slabs (all three slab views, as
trained), cycled for ``--steps`` steps, and is judged (stage2_section_fit.block_fit) on those very slabs and on
held-out ones of the same distribution (stage2_section_fit's blocks). An arm that fits its own slabs' lesions but
not held-out ones has the capacity and lacks data or signal; one that cannot fit even its own slabs is short of
capacity (or the slabs' labels are not in their pixels). Each fit is also taken with BatchNorm normalising by each
batch's own statistics, as in training (``*_batch_statistics``): a gap between the two is a fit inference cannot
use. Arms:
- shipped: the model's stage 2, trained on (peak learning rate RESTART_LR);
- fresh: the same network from scratch (peak 2e-3, as training.train_stage);
- wide: twice the features at every level but the deepest (WIDE_FEATURES), from scratch.

    python benchmarks/stage2_capacity_probe.py LiverLesionAI/Resources/Models/liverlesionai-v5.12 \\
        --train-batches 32 --steps 600 --out benchmarks/results/stage2_capacity_probe.json
    python benchmarks/stage2_capacity_probe.py LiverLesionAI/Resources/Models/liverlesionai-v5.12 \\
        --train-batches 4 --steps 800 --arms fresh --out benchmarks/results/stage2_capacity_probe_memorise.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import tempfile
import time
from pathlib import Path

import torch

from stage2_section_fit import BLOCK_SEED_BASE, block_fit, headline

PROBE_SEED_BASE = 1_970_000  # phantoms no training stage, cycle, head fit or other benchmark has drawn
WIDE_FEATURES = (32, 64, 128, 256, 320)
ARMS = ("shipped", "fresh", "wide")


def arm_network(arm: str, shipped):
    """The arm's stage-2 network and its peak learning rate."""
    from liverlesionai import training as T
    from liverlesionai.networks import UNet2p5D, UNetConfig

    config = shipped.config
    if arm == "shipped":
        return copy.deepcopy(shipped), T.RESTART_LR
    if arm == "fresh":
        return UNet2p5D(config), 2e-3
    return UNet2p5D(UNetConfig(config.in_channels, config.num_classes, WIDE_FEATURES, config.convs_per_stage)), 2e-3


def with_batch_statistics(net):
    """A copy of ``net`` whose BatchNorm layers normalise by each batch's own statistics, in eval mode too (as in
    training), instead of the running statistics inference uses."""
    net = copy.deepcopy(net)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.track_running_stats, module.running_mean, module.running_var = False, None, None
    return net


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model folder (its stage 2)")
    parser.add_argument("--train-batches", type=int, default=32, help="the fixed training batches of 16 slabs")
    parser.add_argument("--heldout-batches", type=int, default=50, help="held-out batches of 16 slabs")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from liverlesionai import training as T
    from liverlesionai.engine import LiverLesionEngine

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the fresh arms' initial weights
    started = time.time()
    engine = LiverLesionEngine(args.model, device="cpu", precision="fp32")
    config = engine.config
    spacing_mm = float(config.stage2_spacing[0])

    def batches(seed_base, count):
        return [T.training_batch("stage2", seed_base, 2, 16, None, step, config=config) for step in range(count)]

    train, heldout = batches(PROBE_SEED_BASE, args.train_batches), batches(BLOCK_SEED_BASE, args.heldout_batches)
    print(f"rendered {len(train)} + {len(heldout)} batches ({time.time() - started:.0f} s)", flush=True)
    report = {"model": args.model, "probe_seed_base": PROBE_SEED_BASE, "train_batches": args.train_batches,
              "heldout_seed_base": BLOCK_SEED_BASE, "heldout_batches": args.heldout_batches, "steps": args.steps,
              "arms": {}}
    for arm in args.arms:
        net, lr = arm_network(arm, engine.stage2)
        arm_started = time.time()
        fit = functools.partial(block_fit, spacing_mm=spacing_mm, hu_window=config.hu_window)
        before = {"train": fit(net, train)} if arm == "shipped" else {}
        with tempfile.TemporaryDirectory() as run_dir:
            T.train_network(net, lambda step: train[step % len(train)], args.steps, run_dir, arm, torch.device("cpu"),
                            lr=lr, log=lambda line: None, checkpoint_every=args.steps)
            history = json.loads((Path(run_dir) / f"{arm}.history.json").read_text())
        report["arms"][arm] = {
            "features": list(net.config.features), "parameters": sum(p.numel() for p in net.parameters()),
            "peak_lr": lr, "final_loss": round(sum(h["loss"] for h in history[-5:]) / 5, 4),
            "train_seconds": round(time.time() - arm_started), **({"before_train": before["train"]} if before else {}),
            "train": fit(net, train), "heldout": fit(net, heldout),
            "train_batch_statistics": fit(with_batch_statistics(net), train),
            "heldout_batch_statistics": fit(with_batch_statistics(net), heldout)}
        row = report["arms"][arm]
        parts = ("train", "heldout", "train_batch_statistics", "heldout_batch_statistics")
        print(arm, {part: headline(row[part]) for part in parts},
              f"loss {row['final_loss']}, {row['train_seconds']} s", flush=True)
    report["seconds"] = round(time.time() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
