"""A further stage-2 training cycle from a model's weights, sized to one device session: the lever the closing
notes name (stage 2 proposes nothing for most lesions it misses; README, Shipped model), prepared for a GPU.

A cosine learning-rate cycle (peak RESTART_LR, as the warm restarts) over ``--steps`` steps of 16 slabs, on phantoms
no earlier cycle drew (seeds from CYCLE_SEED_BASE), batches rendered ahead in ``--workers`` processes
(``training.BatchStream``: on a GPU, rendering sets the pace; benchmarks/training_throughput.py). ``--minutes``
stops it early (the cycle then ends before its learning rate has annealed: the card says so). The result is a new
model folder with the parent's stage 1, classifier head, lesion rule and filter, and the new stage 2; its card has
no figures: judge it on CPU afterwards with the candidate tools (lesion_rule_candidate.py: the lesion rule and
filter are chosen again for it; classifier_candidate.py: the head refitted on its lesions).
``--lesion-min-weight`` makes every lesion pixel weigh at least that much (a liver pixel weighs 1). On the CPU,
1200 steps with 3 found no more lesions than the same cycle without it (README, "A further stage-2 cycle"):
on a GPU, try it at scale beside a control. ``--slab-slices 7`` widens stage 2's slab from 3 slices (3.75 mm) to 7
(networks.with_wider_slab): on the CPU, 1200 steps gave the added slices 6-9% of the centre slices' weight (norms) and
found what the control found (README, "More z-context"); on a GPU, likewise beside a control.
``--peak-lr`` sets the cycle's peak learning rate and ``--keep-every N`` keeps stage 2's weights every N steps for a
learning curve (stage2_section_fit.py --checkpoint). On the CPU, 2400 steps at 2e-4 left stage 2's fit of its own
training blocks flat (README, "Stage 2 is not short of steps"); a long cycle from a bank (below) lifted it.
``--type-weight metastasis=3 hemangioma=3`` multiplies those types' pixel weights: on the CPU (800 steps) it called a
few more of their sections lesion by calling seven times as much liver lesion. ``--type-weight liver=3`` weighs the
liver's pixels (the false side) instead, against the bank cycle's confident false lesion tissue (false_tissue.py).
``--rim-px 2`` makes the non-lesion pixels within 2 pixels (2.5 mm) of a lesion weigh as much as its pixels
(rim_weighted_batch): from the bank cycle, 2000 steps with it halved the false lesions v5.12's filter keeps on the
pool against the same steps without (README, "Weighing the rims of small lesions").
``--vessel-weight 5`` makes the intrahepatic vessels' pixels (liver in the target) weigh 5 times as much
(training.stage2_batch's vessel_weight): rendered into the batches, so with ``--bank`` it needs a bank of its own
(the same slabs as the plain bank's, other weights; render_bank refuses to mix them).
``--bank FOLDER --bank-batches N`` renders N training batches once (in ``--workers`` processes; a rerun renders only
the missing ones) and draws each step's 16 slabs from them at random, mirrored at random (training.render_bank,
training.SlabBank: ``liverlesionai train --steps2-bank`` trains the same cycle as stage 2's third): on 2 CPU cores
rendering costs 3 times the optimiser step, so a bank makes a long cycle affordable there. 14,000 steps from a bank of 2400
(39 min) lifted stage 2's fit of held-out blocks' metastasis sections from 24% to 66% (README, "Stage 2 can learn
metastases and hemangiomas"). ``--bank-draw rendered`` replays the bank's batches as rendered instead, unmirrored
(the control: at step 2000 it fitted the held-out blocks as well, so the long cycle at 1e-3 is what moves stage 2).
``--thick-slices 0.5`` renders half the blocks (of the bank, or of each step) as CTs of 2-5 mm slices resampled onto
stage 2's grid (phantom.render_thick_slices), as the engine resamples such CTs (README, "Blocks of thick slices").

    python benchmarks/gpu_stage2_cycle.py LiverLesionAI/Resources/Models/liverlesionai-v5.12 /tmp/bankcycle/model \\
        --steps 14000 --peak-lr 1e-3 --keep-every 2000 --workers 2 --device cpu --bank /tmp/bank --bank-batches 2400

    # on the GPU machine, after gpu_check part 6 gave the steps per second with workers
    python benchmarks/gpu_stage2_cycle.py LiverLesionAI/Resources/Models/liverlesionai-v5.12 $OUT/stage2-cycle \\
        --steps 9000 --minutes 8 --workers 14 --device cuda
    python benchmarks/gpu_stage2_cycle.py LiverLesionAI/Resources/Models/liverlesionai-v5.12 /tmp/cycle-smoke \\
        --steps 3 --workers 1 --device cpu      # here: the script itself works
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from liverlesionai import training as T
from liverlesionai.model_io import load_model, save_model
from liverlesionai.networks import STAGE2_FIRST_LESION, STAGE2_LIVER, CascadeConfig, UNet2p5D, with_wider_slab
from liverlesionai.records import LESION_TYPES

CYCLE_SEED_BASE = T.TRAIN_SEED_BASE + 500_000  # phantoms no training stage, head fit or benchmark has drawn
def lesion_weighted_batch(make_batch, min_weight: float, step: int):
    """``make_batch(step)`` with every lesion pixel weighing at least ``min_weight`` (the inverse-size weights give
    a large lesion's pixels the liver's weight 1; stage 2 calls most lesions it misses liver)."""
    x, target, weights = make_batch(step)
    return x, target, torch.where(target >= STAGE2_FIRST_LESION, weights.clamp(min=min_weight), weights)


def type_weighted_batch(make_batch, factors: dict, step: int):
    """``make_batch(step)`` with the pixels of some lesion types (or of the liver) weighing more: ``factors``
    {stage-2 class: factor} (stage 2 fits hemangioma and metastasis sections of its own training blocks far worse than
    cysts; the bank cycle is as sure of its false lesion tissue as of its lesions)."""
    x, target, weights = make_batch(step)
    for lesion_class, factor in factors.items():
        weights = torch.where(target == lesion_class, weights * factor, weights)
    return x, target, weights


def rim_weighted_batch(make_batch, radius_px: int, step: int):
    """``make_batch(step)`` with every non-lesion pixel within ``radius_px`` pixels (a disc) of a lesion weighing as
    much as the heaviest lesion pixel there. The inverse-size weights make a small lesion's pixels weigh up to 25
    times a liver pixel, so calling a ring of liver around it lesion costs little against missing any of it: the
    bank cycle calls 45% of the liver within 2.5 mm of a lesion lesion (false_tissue.py), rims that merge neighbours."""
    x, target, weights = make_batch(step)
    lesion_weights = torch.where(target >= STAGE2_FIRST_LESION, weights, torch.zeros_like(weights))
    offsets = np.arange(-radius_px, radius_px + 1)
    disc = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius_px ** 2
    rim = torch.from_numpy(ndimage.grey_dilation(lesion_weights.numpy(), footprint=disc[None], mode="constant"))
    return x, target, torch.where(target < STAGE2_FIRST_LESION, torch.maximum(weights, rim), weights)


def type_factors(items) -> dict:
    """{stage-2 class: factor} from "TYPE=FACTOR" items (TYPE a lesion type, or liver)."""
    classes = {"liver": STAGE2_LIVER, **{name: STAGE2_FIRST_LESION + i for i, name in enumerate(LESION_TYPES)}}
    factors = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = None
        if name not in classes or factor is None or factor <= 0:
            raise SystemExit(f"--type-weight {item!r}: expected TYPE=FACTOR with TYPE one of {', '.join(classes)} "
                             f"and FACTOR a positive number")
        factors[classes[name]] = factor
    return factors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the parent model folder")
    parser.add_argument("out", type=Path, help="new model folder to create")
    parser.add_argument("--steps", type=int, required=True, help="the cycle's length (its cosine schedule)")
    parser.add_argument("--minutes", type=float, default=None, help="stop at this wall time, annealed or not")
    parser.add_argument("--workers", type=int, default=max((os.cpu_count() or 2) - 2, 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--peak-lr", type=float, default=T.RESTART_LR,
                        help=f"the cycle's peak learning rate (default {T.RESTART_LR:g}, the warm restarts')")
    parser.add_argument("--keep-every", type=int, default=None,
                        help="keep stage 2's weights every this many steps (a multiple of 50) in the run folder, "
                             "for a learning curve (stage2_section_fit.py --checkpoint)")
    parser.add_argument("--lesion-min-weight", type=float, default=1.0,
                        help="least loss weight of a lesion pixel (a liver pixel weighs 1; the shipped cycles: 1)")
    parser.add_argument("--type-weight", nargs="*", default=[], metavar="TYPE=FACTOR",
                        help="multiply the loss weight of that lesion type's pixels (e.g. metastasis=3), or the "
                             "liver's (liver=3)")
    parser.add_argument("--rim-px", type=int, default=0,
                        help="non-lesion pixels within this many pixels of a lesion weigh as much as its pixels "
                             "(rim_weighted_batch; default 0: off, as the shipped cycles)")
    parser.add_argument("--vessel-weight", type=float, default=1.0,
                        help="multiply the intrahepatic vessels' pixel weights (training.stage2_batch; rendered into "
                             "the batches, so a bank holds its own; default 1, as the shipped cycles)")
    parser.add_argument("--bank", type=Path, default=None,
                        help="draw the cycle's slabs from a bank of --bank-batches rendered batches in this folder "
                             "(rendered first where missing, in --workers processes) instead of rendering each step's")
    parser.add_argument("--bank-batches", type=int, default=2400)
    parser.add_argument("--bank-draw", choices=("random", "rendered"), default="random",
                        help="random: each step's 16 slabs drawn from the whole bank, mirrored at random; rendered: "
                             "the bank's batches as rendered, in turn (the control)")
    parser.add_argument("--thick-slices", type=float, default=0.0, metavar="FRACTION",
                        help="render this fraction of the blocks as CTs of thick slices (2-5 mm) resampled onto "
                             "stage 2's grid (training.stage2_batch's thick_fraction; default 0, as the shipped cycles)")
    parser.add_argument("--slab-slices", type=int, default=None,
                        help="widen stage 2's slab to this many slices (odd; the parent's weights on its centre "
                             "slices, the added ones starting at 0: networks.with_wider_slab); default: the parent's")
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: not overwriting a model")
    try:
        T.check_vessel_weight(args.vessel_weight)  # now, not in the render workers
    except ValueError as error:
        raise SystemExit(f"--vessel-weight: {error}") from None
    if args.rim_px < 0:  # now, not after the bank is rendered
        raise SystemExit(f"--rim-px {args.rim_px}: a radius in pixels cannot be negative")
    device = T.resolve_device(args.device)
    state, card = load_model(args.model)
    config = CascadeConfig.from_dict(card["architecture"])
    net = UNet2p5D(config.stage2)
    net.load_state_dict({k.removeprefix("stage2."): v for k, v in state.items() if k.startswith("stage2.")})
    parent_slices = config.stage2.in_channels - 1
    if args.slab_slices is not None and args.slab_slices != parent_slices:
        net = with_wider_slab(net, args.slab_slices)
        config.stage2 = net.config
    workers = args.workers
    if args.bank:
        if args.slab_slices is not None and args.slab_slices != parent_slices:
            raise SystemExit("--bank holds slabs of the default width: it cannot be combined with --slab-slices")
        T.render_bank(args.bank, args.bank_batches, args.workers, config, thick_fraction=args.thick_slices,
                      vessel_weight=args.vessel_weight)
        bank = T.SlabBank(args.bank, args.bank_batches)
        make_batch, workers = bank.batch if args.bank_draw == "random" else bank.rendered_batch, 0
    else:
        make_batch = functools.partial(T.training_batch, "stage2", CYCLE_SEED_BASE, 2, 16, None, config=config,
                                       thick_fraction=args.thick_slices, vessel_weight=args.vessel_weight)
    if args.lesion_min_weight != 1.0:
        make_batch = functools.partial(lesion_weighted_batch, make_batch, args.lesion_min_weight)
    if args.rim_px:
        make_batch = functools.partial(rim_weighted_batch, make_batch, args.rim_px)
    factors = type_factors(args.type_weight)
    if factors:
        make_batch = functools.partial(type_weighted_batch, make_batch, factors)
    deadline = time.time() + 60 * args.minutes if args.minutes else float("inf")
    run_dir = args.out.with_name("." + args.out.name + ".run")  # checkpoints: rerun to resume
    started = time.time()
    step = T.train_network(net, make_batch, args.steps, run_dir, "stage2_cycle", device, lr=args.peak_lr,
                           cancel=lambda: time.time() > deadline, workers=workers, keep_every=args.keep_every)
    seconds = round(time.time() - started)
    source = f"phantoms from seed {CYCLE_SEED_BASE}"
    if args.bank:
        source = (f"drawn at random from a bank of {args.bank_batches} rendered batches of phantoms from seed "
                  f"{T.STAGE2_BANK_SEED_BASE}, mirrored at random" if args.bank_draw == "random" else
                  f"the batches of a bank of {args.bank_batches} rendered batches of phantoms from seed "
                  f"{T.STAGE2_BANK_SEED_BASE}, in turn")
    if args.thick_slices:
        source += f", {args.thick_slices:g} of the blocks rendered as CTs of thick slices resampled onto stage 2's grid"
    class_names = {STAGE2_LIVER: "liver", **{STAGE2_FIRST_LESION + i: name for i, name in enumerate(LESION_TYPES)}}
    weighted_types = "".join(f", {class_names[c]} pixels x{f:g}" for c, f in factors.items())
    new_state = {**state, **{f"stage2.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}}
    history = (f"{Path(args.model).name} ({card['version']}, SHA-256 {card['weights_sha256'][:16]}...) with a further "
               f"stage-2 cycle of {step} of {args.steps} scheduled steps (peak lr {args.peak_lr:g}, 16 slabs, phantoms "
               f"{source}, lesion pixels weighing at least {args.lesion_min_weight:g}"
               f"{weighted_types}"
               f"{f', pixels within {args.rim_px} of a lesion weighing as its pixels' if args.rim_px else ''}"
               f"{f', intrahepatic vessel pixels x{args.vessel_weight:g}' if args.vessel_weight != 1.0 else ''}, slabs of "
               f"{config.stage2.in_channels - 1} slices (the parent's {parent_slices}), "
               f"{args.workers} render workers, {device.type}, {seconds} s"
               f"{'' if step >= args.steps else ': stopped at the time limit before the schedule annealed'}); "
               f"stage 1, classifier head, lesion rule and filter the parent's, not refitted; no figures yet "
               f"(benchmarks/gpu_stage2_cycle.py). Parent's history: " + card.get("training_history", ""))
    new_card = {**{k: v for k, v in card.items() if k not in ("metrics", "adoption", "weights_sha256", "created")},
                "architecture": config.to_dict(),
                "version": card["version"] + "+stage2-cycle", "training_history": history, "metrics": {},
                "training_steps": {**card.get("training_steps", {}), "stage2_cycle": step}}
    save_model(args.out, new_state, new_card)
    print(f"{args.out}: stage 2 trained {step} steps in {seconds} s ({step / max(seconds, 1):.1f} steps/s)")


if __name__ == "__main__":
    main()
