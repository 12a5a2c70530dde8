"""The two peers, run the way their users run them (random weights: the cost does not depend on them).

nnU-Net 3d_fullres-style: ``dynamic_network_architectures`` PlainConvUNet with nnU-Net's default plan
for a LiTS-like task (6 stages, 32->320 features, patch 128^3, target spacing 1.0 x 0.77 x 0.77 mm,
3 classes), third-order resampling like nnU-Net's preprocessing, its sliding window (50% overlap,
Gaussian importance, float32 logits accumulated on the CPU) and, optionally, its default mirroring
test-time augmentation (8 passes per patch).

MONAI SegResNet, Auto3DSeg-like: 1.5 mm isotropic resampling, 96^3 patches, 32 initial filters,
blocks (1, 2, 2, 4, 4), through ``monai.inferers.sliding_window_inference`` (50% overlap, Gaussian).

``max_patches`` > 0 runs only that many network passes (after one warm-up pass) and projects the
inference time as median pass time x number of passes; everything else (reading, resampling, the
full-size accumulators, resampling back, argmax, writing) is run for real.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

NNUNET_SPACING_ZYX = (1.0, 0.77, 0.77)
NNUNET_PATCH = (128, 128, 128)
NNUNET_FEATURES = (32, 64, 128, 256, 320, 320)
SEGRESNET_SPACING = 1.5
SEGRESNET_PATCH = (96, 96, 96)


class _Stop(Exception):
    pass


class TimedNet:
    """Wraps a network: times every pass (synchronising on GPU), stops after ``limit`` timed passes."""

    def __init__(self, net, device, limit=0):
        self.net, self.device, self.limit = net, device, limit
        self.times, self.cpu_times, self.cpu_run, self.warm = [], [], 0.0, False

    def __call__(self, x):
        if self.limit and len(self.times) >= self.limit:
            raise _Stop
        self._sync()
        t, c = time.perf_counter(), time.process_time()  # process-wide CPU time, all threads
        y = self.net(x)
        self._sync()
        cpu = time.process_time() - c
        self.cpu_run += cpu
        if self.warm or not self.limit:
            self.times.append(time.perf_counter() - t)
            self.cpu_times.append(cpu)
        self.warm = True
        return y

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def nnunet_network(num_classes=3):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    n = len(NNUNET_FEATURES)
    return PlainConvUNet(1, n, list(NNUNET_FEATURES), torch.nn.Conv3d, 3, [1] + [2] * (n - 1), [2] * n, num_classes,
                         [2] * (n - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=False)


def segresnet_network(num_classes=3):
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, init_filters=32, in_channels=1, out_channels=num_classes,
                     blocks_down=(1, 2, 2, 4, 4), blocks_up=(1, 1, 1, 1), norm="INSTANCE")


def _gaussian_importance(patch, sigma_scale=1 / 8):
    """nnU-Net's importance map: a Gaussian centred on the patch, sigma = patch/8, min clipped above 0."""
    from scipy.ndimage import gaussian_filter

    tmp = np.zeros(patch, np.float32)
    tmp[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(tmp, [p * sigma_scale for p in patch], mode="constant", cval=0)
    g = g / g.max()
    g[g == 0] = g[g != 0].min()
    return torch.from_numpy(g)


def _nnunet_steps(size, patch, step=0.5):
    """nnU-Net's compute_steps_for_sliding_window."""
    steps = []
    for s, p in zip(size, patch):
        n = int(math.ceil((s - p) / (p * step))) + 1
        actual = (s - p) / (n - 1) if n > 1 else 99999999999
        steps.append([int(np.round(actual * i)) for i in range(n)])
    return steps


def nnunet_sliding_window(timed, volume, device, mirroring):
    """Logits (classes, *shape) float32 on the CPU, as nnU-Net v2's predictor computes them on CPU."""
    x = torch.from_numpy(volume)[None]
    pad = [max(0, p - s) for s, p in zip(x.shape[1:], NNUNET_PATCH)]
    if any(pad):
        x = F.pad(x, [v for p in reversed(pad) for v in (p // 2, p - p // 2)])
    shape = x.shape[1:]
    logits = torch.zeros((3, *shape), dtype=torch.float32)
    weights = torch.zeros(shape, dtype=torch.float32)
    gauss = _gaussian_importance(NNUNET_PATCH).to(device)
    mirror_axes = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if mirroring else [()]
    steps = _nnunet_steps(shape, NNUNET_PATCH)
    tiles = list(itertools.product(*steps))
    try:
        for z, y, xx in tiles:
            sl = (slice(z, z + NNUNET_PATCH[0]), slice(y, y + NNUNET_PATCH[1]), slice(xx, xx + NNUNET_PATCH[2]))
            patch = x[(slice(None), *sl)][None].to(device)
            pred = 0
            for axes in mirror_axes:
                p = patch.flip(axes) if axes else patch
                out = timed(p)
                pred = pred + (out.flip(axes) if axes else out)
            pred = (pred[0] / len(mirror_axes) * gauss).float().cpu()
            logits[(slice(None), *sl)] += pred
            weights[sl] += gauss.cpu()
    except _Stop:
        pass
    logits /= weights.clamp(min=1e-8)
    return logits, len(tiles) * len(mirror_axes)


def monai_window_count(shape, patch, overlap):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    size = [max(s, p) for s, p in zip(shape, patch)]
    interval = _get_scan_interval(size, patch, 3, [overlap] * 3)
    return len(dense_patch_slices(size, patch, interval))


def _resample(volume, factors, order):
    from scipy import ndimage

    return ndimage.zoom(volume, factors, order=order, prefilter=order > 1).astype(np.float32, copy=False)


def run_peer(peer, path, out_path, threads, device="cpu", max_patches=0, mirroring=False):
    """Read -> preprocess -> sliding window -> resample back, argmax -> write; seconds per step."""
    import SimpleITK as sitk

    torch.set_num_threads(threads)
    device = torch.device(device)
    t = {"start": time.perf_counter()}
    image = sitk.ReadImage(str(path))
    volume = sitk.GetArrayFromImage(image).astype(np.float32)  # [z, y, x]
    spacing = np.array(image.GetSpacing()[::-1])
    t["read"] = time.perf_counter()
    if peer == "nnunet":
        net = nnunet_network()
        factors = spacing / np.array(NNUNET_SPACING_ZYX)
        data = _resample(volume, factors, order=3)
        # nnU-Net's CT normalisation: clip to foreground percentiles, z-score (LiTS-like numbers)
        data = (np.clip(data, -17.0, 201.0) - 99.4) / 39.4
    elif peer == "segresnet":
        net = segresnet_network()
        factors = spacing / SEGRESNET_SPACING
        x = torch.from_numpy(volume)[None, None]
        size = [int(round(s * f)) for s, f in zip(volume.shape, factors)]
        data = F.interpolate(x, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()
        data = np.clip((data + 250.0) / 500.0, 0.0, 1.0).astype(np.float32)  # ScaleIntensityRange-like
    else:
        raise ValueError(f"unknown peer {peer!r}")
    net = net.to(device).eval()
    t["preprocess"] = time.perf_counter()
    timed = TimedNet(net, device, max_patches)
    with torch.inference_mode():
        if peer == "nnunet":
            logits, passes = nnunet_sliding_window(timed, np.ascontiguousarray(data), device, mirroring)
        else:
            from monai.inferers import sliding_window_inference

            passes = monai_window_count(data.shape, SEGRESNET_PATCH, 0.5)
            x = torch.from_numpy(np.ascontiguousarray(data))[None, None].to(device)
            try:
                logits = sliding_window_inference(x, SEGRESNET_PATCH, 1, timed, overlap=0.5, mode="gaussian")[0]
            except _Stop:
                logits = torch.zeros((3, *data.shape), dtype=torch.float32, device=device)
            logits = logits.float().cpu()
    t["inference"] = time.perf_counter()
    # back to the input grid, then argmax (as both export their segmentations)
    probs = F.interpolate(logits[None], size=volume.shape, mode="trilinear", align_corners=False)[0]
    seg = probs.argmax(0).to(torch.uint8).numpy()
    t["postprocess"] = time.perf_counter()
    out = sitk.GetImageFromArray(seg)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(out_path), useCompression=True)
    t["write"] = time.perf_counter()
    stages = {k: t[k] - t[p] for p, k in zip(["start", "read", "preprocess", "inference", "postprocess"],
                                              ["read", "preprocess", "inference", "postprocess", "write"])}
    measured_passes = len(timed.times)
    projected = bool(max_patches) and measured_passes < passes
    if projected:
        stages["inference"] = float(np.median(timed.times)) * passes
    return {"stages": stages, "passes": passes, "measured_passes": measured_passes,
            "pass_seconds_median": float(np.median(timed.times)) if timed.times else None,
            "pass_cpu_seconds_median": float(np.median(timed.cpu_times)) if timed.cpu_times else None,
            "cpu_seconds_of_passes_run": timed.cpu_run,
            "projected": projected, "network_input_shape": list(data.shape),
            "parameters": sum(p.numel() for p in net.parameters())}
