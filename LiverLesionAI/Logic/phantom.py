"""Procedural abdominal CT phantoms in Hounsfield units, with ground truth (the training data).

A phantom is a *description* (shapes and intensities in patient RAS millimetres, drawn from a seed),
rendered on demand onto any axis-aligned grid: the trainer renders only the small blocks a batch
needs; evaluation renders whole acquisitions. The same seed always gives the same phantom.

Why it looks the way it does (see ../shared/notes/phantoms-to-real-ct.md): a phantom-trained
network only learns "liver" from position and shape when liver-like neighbours (spleen, heart,
stomach wall, bowel, pancreas, gallbladder, kidneys) sit where they sit in real patients; HU values
follow measured portal-venous figures with moderate per-tissue randomisation; lesions cover a wide
range of size, contrast, texture and position, many touching the liver edge.

Canonical grid used throughout the engine: array [k, j, i] with i toward patient left, j toward
posterior, k toward superior, i.e. ijk_to_ras = diag(-sx, -sy, sz) plus origin (as a DICOM axial
series is displayed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .records import LESION_TYPES, CTVolume

GENERATOR_VERSION = "1.1"  # 1.1: the liver lies against the abdominal wall muscle (no fat plane) in most phantoms

# Tissue labels of the phantom's internal label map (ground truth uses liver/lesions only).
AIR, BODY_FAT, MUSCLE, VISCERAL_FAT, BONE, LUNG, HEART, SPLEEN, KIDNEY, STOMACH, BOWEL, \
    PANCREAS, GALLBLADDER, VESSEL, LIVER, LIVER_VESSEL, LESION, TABLE = range(18)


# ----------------------------------------------------------------------------------------------
# Shapes: a shape tells, for broadcast coordinate arrays X, Y, Z (RAS mm), a normalised radius r
# (< 1 inside) so that edges, rims and cores can be painted by thresholds on r.
# ----------------------------------------------------------------------------------------------
@dataclass
class Blob:
    """Rotated ellipsoid (or superellipsoid) with a smooth random surface deformation."""

    center: np.ndarray
    axes: np.ndarray  # semi-axes, mm
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    waves: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # (wx, wy, wz, phase, amp)
    power: float = 2.0

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.abs(self.rotation) @ self.axes * (1.0 + np.abs(self.waves[:, 4]).sum() + 0.05)
        return self.center - half, self.center + half

    def radius(self, X, Y, Z):
        dx, dy, dz = X - self.center[0], Y - self.center[1], Z - self.center[2]
        R = self.rotation
        r = 0.0
        for a in range(3):
            u = (R[0, a] * dx + R[1, a] * dy + R[2, a] * dz) * np.float32(1.0 / self.axes[a])
            r = r + (u * u if self.power == 2.0 else np.abs(u) ** np.float32(self.power))
        r = np.sqrt(r) if self.power == 2.0 else r ** np.float32(1.0 / self.power)
        for wx, wy, wz, phase, amp in self.waves:
            r = r - amp * np.sin(wx * dx + wy * dy + wz * dz + phase)
        return r


@dataclass
class Tube:
    """A straight vessel segment with radii tapering from r0 to r1."""

    p0: np.ndarray
    p1: np.ndarray
    r0: float
    r1: float

    def bbox(self):
        r = max(self.r0, self.r1) + 1.0
        return np.minimum(self.p0, self.p1) - r, np.maximum(self.p0, self.p1) + r

    def radius(self, X, Y, Z):
        d = self.p1 - self.p0
        length2 = float(d @ d) + 1e-9
        t = ((X - self.p0[0]) * d[0] + (Y - self.p0[1]) * d[1] + (Z - self.p0[2]) * d[2]) / length2
        t = np.clip(t, 0.0, 1.0)
        dist = np.sqrt((X - self.p0[0] - t * d[0]) ** 2 + (Y - self.p0[1] - t * d[1]) ** 2
                       + (Z - self.p0[2] - t * d[2]) ** 2)
        return dist / (self.r0 + (self.r1 - self.r0) * t)


@dataclass
class Lesion:
    lesion_id: int
    lesion_type: str
    blob: Blob
    core_hu: float
    rim_hu: float  # metastasis rim / hemangioma nodules
    center_hu: float  # necrosis / central scar; = core_hu when none
    texture_hu: float
    edge_softness: float  # fraction of the radius over which the edge blends (ill-defined margin)
    fill_fraction: float = 0.0  # hemangioma centripetal fill (0 = peripheral nodules only)
    nodules: list = field(default_factory=list)  # hemangioma peripheral nodules (Blob)


@dataclass
class Phantom:
    seed: int
    liver_hu: float
    noise_hu: float
    psf_mm: np.ndarray  # acquisition blur sigma along x, y, z (mm)
    extent_min: np.ndarray  # RAS mm of the whole body region
    extent_max: np.ndarray
    liver_blobs: list  # union of lobes
    liver_cuts: list  # (normal, offset): liver only where n·p < offset
    lesions: list
    structures: list  # (tissue_label, shape, hu, texture_hu, kind) painted in order
    body: Blob = None
    liver_volume_ml: float = 0.0
    liver_vessels: list = field(default_factory=list)  # intrahepatic portal branches and hepatic veins (Tube)
    liver_vessel_hu: float = 0.0
    liver_texture_hu: float = 5.0
    # fat plane between the liver and the abdominal wall muscle, as a fraction of the wall's radius;
    # 0 = the liver lies directly against the muscle, as it does in most patients
    liver_wall_gap: float = 0.0

    @property
    def liver_bbox(self):
        lows, highs = zip(*(b.bbox() for b in self.liver_blobs))
        return np.min(lows, axis=0), np.max(highs, axis=0)


# ----------------------------------------------------------------------------------------------
# Sampling a phantom description
# ----------------------------------------------------------------------------------------------
def _rotation(rng, max_deg):
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _waves(rng, count, wavelength_mm, amplitude):
    """Random plane waves for smooth surface deformation / texture."""
    if count == 0:
        return np.zeros((0, 5))
    direction = rng.normal(size=(count, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    k = 2 * np.pi / rng.uniform(*wavelength_mm, size=(count, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(count, 1))
    amp = rng.uniform(0.3, 1.0, size=(count, 1)) * amplitude / np.sqrt(count)
    return np.hstack([direction * k, phase, amp])


def _blob(rng, center, axes, rot_deg=10.0, deform=0.08, wavelength=(60, 160), power=2.0, n_waves=4):
    return Blob(np.asarray(center, float), np.asarray(axes, float), _rotation(rng, rot_deg),
                _waves(rng, n_waves, wavelength, deform), power)


def _lesion_diameters(rng, count):
    """Many small lesions, some large: log-uniform 3..120 mm with extra weight below 20 mm."""
    small = rng.random(count) < 0.45
    d = np.exp(rng.uniform(np.log(3.0), np.log(120.0), count))
    d[small] = rng.uniform(3.0, 20.0, small.sum())
    return d


METASTASIS_LOOKS = ("hypodense", "hypervascular")


def make_phantom(seed: int, domain: dict | None = None) -> Phantom:
    """Draw a phantom description from ``seed``.

    ``domain`` shifts the acquisition domain (used to make "another hospital" data for fine-tuning):
    keys ``liver_hu`` (range), ``noise_hu`` (range), ``lesion_contrast_scale`` (float),
    ``type_weights`` (dict type -> weight), ``metastasis_look`` ("hypodense", the default, or
    "hypervascular": brighter than the liver, as neuroendocrine, renal-cell or melanoma metastases are).
    """
    domain = domain or {}
    rng = np.random.default_rng(seed)
    u = rng.uniform

    # --- body habitus
    A, B = u(125, 185), u(95, 140)  # body semi-axes (lateral, AP)
    fat = u(6, 40) * (A / 150)
    muscle = u(7, 14)
    body = _blob(rng, (0, u(-5, 5), 0), (A, B, 400), rot_deg=0, deform=0.02, wavelength=(150, 300),
                 power=u(2.0, 2.6), n_waves=3)
    body.rotation = _rotation(rng, 0) @ np.array([[np.cos(r := np.deg2rad(u(-6, 6))), -np.sin(r), 0],
                                                   [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    inner_axes = np.array([A - fat - muscle, B - fat - muscle, 400.0])

    def inner(center_offset=(0, 0, 0), scale=1.0):
        blob = Blob(body.center + np.array(center_offset), inner_axes * scale, body.rotation,
                    body.waves.copy(), body.power)
        return blob

    liver_hu = u(*domain.get("liver_hu", (85, 130)))
    phase = u(0, 1)  # 0 late arterial .. 1 delayed: shifts blood-pool values
    blood = u(150, 200) - 40 * phase
    jitter = lambda: u(-12, 12)  # noqa: E731  moderate per-tissue randomisation

    structures = []

    def add(label, shape, hu, texture=4.0, kind="solid"):
        structures.append((label, shape, float(hu), float(texture), kind))

    spine_y = -B + fat + u(40, 55)
    # table under the patient (real scans show it; sometimes cropped away)
    if rng.random() < 0.7:
        add(TABLE, Blob(np.array([0, -B - u(12, 30), 0]), np.array([260, u(4, 10), 500])), u(-350, 150), 5)
    add(BODY_FAT, body, u(-120, -80) + jitter() * 0.5, 6)
    add(MUSCLE, inner(scale=(1 + muscle / A)), u(40, 65), 6)
    add(VISCERAL_FAT, inner(), u(-110, -70), 8)

    # --- thorax at the top: lungs above the diaphragm domes, heart on the left dome
    dome_z = u(55, 95)
    for side in (+1, -1):
        add(LUNG, _blob(rng, (side * A * 0.42, spine_y + B * 0.55, dome_z + 120 + (8 if side > 0 else 0)),
                        (A * 0.5, B * 0.8, 125), rot_deg=5, deform=0.04, power=2.5), u(-900, -780), 30)
    add(HEART, _blob(rng, (-A * 0.15, u(10, 35), dome_z + u(30, 60)), (u(55, 70), u(45, 60), u(50, 65)),
                     rot_deg=15), blood * 0.7 + 20, 15)

    # --- liver: right lobe + left lobe + caudate, cut by the diaphragm and the inferior surface
    liver_scale = u(0.85, 1.2)
    rl = _blob(rng, (A * u(0.28, 0.40), u(-15, 15), u(-5, 15)),
               np.array([u(60, 80), B * u(0.62, 0.78), u(70, 95)]) * liver_scale, rot_deg=12, deform=0.10,
               n_waves=6)
    ll = _blob(rng, (-A * u(0.05, 0.30), B * u(0.15, 0.40), rl.center[2] + u(5, 30)),
               np.array([u(45, 75), u(25, 45), u(35, 55)]) * liver_scale, rot_deg=20, deform=0.12, n_waves=5)
    cl = _blob(rng, (A * 0.08, spine_y + u(25, 45), rl.center[2] + u(-5, 10)),
               np.array([u(18, 28), u(18, 28), u(30, 45)]) * liver_scale, rot_deg=15, deform=0.1)
    liver_top = dome_z + u(-5, 10)
    # inferior surface slopes: lower laterally-posteriorly (right lobe tip), higher medially/anteriorly
    n_inf = np.array([u(-0.45, -0.15), u(0.2, 0.5), -1.0])
    n_inf /= np.linalg.norm(n_inf)
    liver_cuts = [(np.array([0, 0, 1.0]), liver_top),  # below the dome
                  (n_inf, n_inf @ np.array([A * 0.35, 0, rl.center[2] - rl.axes[2] * u(0.55, 0.85)]))]
    liver_blobs = [rl, ll, cl]
    target_liver_ml = u(1000, 2500)

    # --- organs around the liver (the network must learn position and shape, not HU alone)
    add(SPLEEN, _blob(rng, (-A * u(0.50, 0.65), spine_y + u(15, 40), u(0, 40)),
                      (u(22, 35), u(45, 65), u(40, 60)), rot_deg=25, deform=0.1), liver_hu + u(-5, 25), 6)
    kidney_hu = u(150, 220) - 40 * phase
    for side, z in ((+1, u(-85, -45)), (-1, u(-65, -25))):
        k = _blob(rng, (side * A * u(0.32, 0.45), spine_y + u(5, 20), z), (u(25, 32), u(22, 28), u(45, 60)),
                  rot_deg=15, deform=0.05)
        add(KIDNEY, k, kidney_hu, 8)
        add(KIDNEY, Blob(k.center, k.axes * 0.55, k.rotation), kidney_hu * 0.6 + 20, 10)  # medulla
        add(VISCERAL_FAT, Blob(k.center + k.rotation @ np.array([-side * 12, 0, 0]), k.axes * [0.3, 0.35, 0.5],
                               k.rotation), u(-90, -30), 8)  # sinus
    stomach = _blob(rng, (-A * u(0.25, 0.45), B * u(0.0, 0.35), u(10, 45)), (u(35, 55), u(30, 45), u(40, 60)),
                    rot_deg=25, deform=0.12)
    add(STOMACH, stomach, u(50, 90), 8)
    add(STOMACH, Blob(stomach.center, stomach.axes - u(3, 6), stomach.rotation, stomach.waves), u(0, 45), 10)
    if rng.random() < 0.8:  # gas rising anteriorly (patient supine)
        gas = Blob(stomach.center + np.array([0, stomach.axes[1] * 0.6, 0]), stomach.axes * [0.7, 0.45, 0.7],
                   stomach.rotation)
        add(STOMACH, gas, -1000, 5)
    add(PANCREAS, _blob(rng, (-A * 0.05, spine_y + u(45, 60), u(-35, -10)), (u(55, 75), u(10, 16), u(12, 20)),
                        rot_deg=15, deform=0.15, wavelength=(30, 60)), liver_hu + u(-25, 5), 10)

    # bowel and colon loops: below and in contact with the liver's inferior surface, and at the hilum
    n_bowel = rng.integers(14, 34)
    for _ in range(n_bowel):
        radius = u(9, 24)
        if rng.random() < 0.35:  # hepatic flexure / duodenum region
            c = (A * u(-0.05, 0.55), u(-B * 0.3, B * 0.6), rl.center[2] - rl.axes[2] * u(0.3, 0.9))
        else:
            c = (u(-A * 0.75, A * 0.75), u(-B * 0.4, B * 0.7), u(-170, -40))
        loop = _blob(rng, c, (radius * u(1.0, 2.5), radius, radius * u(0.8, 1.6)), rot_deg=90, deform=0.1,
                     wavelength=(30, 80))
        content = rng.choice(3, p=[0.35, 0.35, 0.3])
        add(BOWEL, loop, u(55, 110), 8)  # enhancing wall
        inner_loop = Blob(loop.center, loop.axes - u(2, 4), loop.rotation, loop.waves)
        add(BOWEL, inner_loop, (-1000, u(0, 30), u(20, 80))[content], (5, 8, 40)[content],
            kind="mottled" if content == 2 else "solid")

    # gallbladder under the liver's inferior surface, partly embedded (sometimes removed)
    if rng.random() < 0.8:
        add(GALLBLADDER, _blob(rng, (A * u(0.05, 0.25), B * u(0.15, 0.45), rl.center[2] - rl.axes[2] * u(0.3, 0.6)),
                               (u(12, 20), u(14, 22), u(28, 45)), rot_deg=25, deform=0.05), u(-5, 25), 4)

    # great vessels and portal system (portal-venous phase: all enhanced)
    aorta_hu, ivc_hu, portal_hu = blood + jitter(), blood * 0.85 + jitter(), blood + u(-10, 20)
    add(VESSEL, Tube(np.array([-A * 0.08, spine_y + 30, -250]), np.array([-A * 0.08, spine_y + 30, 250]),
                     u(9, 14), u(10, 15)), aorta_hu, 4)
    add(VESSEL, Tube(np.array([A * 0.12, spine_y + 32, -250]), np.array([A * 0.15, spine_y + 28, 250]),
                     u(9, 13), u(10, 14)), ivc_hu, 5)
    hilum = np.array([A * u(0.12, 0.25), u(-15, 15), rl.center[2] - u(0, 20)])
    add(VESSEL, Tube(np.array([0, spine_y + 55, -60]), hilum, u(6, 9), u(6, 9)), portal_hu, 4)

    # paraspinal muscles, psoas, spine, ribs
    for side in (+1, -1):
        add(MUSCLE, _blob(rng, (side * u(28, 40), spine_y - u(25, 35), 0), (u(20, 30), u(18, 26), 500), rot_deg=0,
                          deform=0.05), u(40, 60), 6)
        add(MUSCLE, _blob(rng, (side * u(30, 45), spine_y + 20, -150), (u(12, 20), u(12, 20), 100), rot_deg=5,
                          deform=0.05), u(40, 60), 6)
    add(BONE, Tube(np.array([0, spine_y, -400]), np.array([0, spine_y, 400]), 20, 20), u(500, 800), 30,
        kind="vertebra")
    add(BONE, Tube(np.array([0, spine_y - 30, -400]), np.array([0, spine_y - 30, 400]), 9, 9), u(400, 700), 30,
        kind="vertebra")
    add(BONE, inner(scale=(1 + muscle * 0.5 / A)), u(450, 800), 40, kind=("ribs", u(22, 30), u(0.3, 0.7),
                                                                               u(0, 100), dome_z - u(40, 80)))

    # --- intrahepatic vessels (part of the liver label): portal branches from the hilum,
    # hepatic veins from the IVC at the dome
    liver_vessels = []
    for _ in range(rng.integers(4, 8)):
        target = rl.center + rng.normal(size=3) * rl.axes * 0.5
        liver_vessels.append(Tube(hilum, target, u(3, 6), u(1.0, 2.5)))
    ivc_top = np.array([A * 0.14, spine_y + 30, liver_top - u(15, 30)])
    for direction in ((1.0, 0.6, -0.3), (0.2, 1.0, -0.3), (-0.8, 0.8, -0.2)):
        target = ivc_top + np.array(direction) * u(50, 90)
        liver_vessels.append(Tube(ivc_top, target, u(4, 7), u(1.0, 2.5)))

    # --- lesions
    weights = domain.get("type_weights", {"cyst": 1, "hemangioma": 1, "metastasis": 1.3})
    contrast_scale = float(domain.get("lesion_contrast_scale", 1.0))
    metastasis_look = domain.get("metastasis_look", "hypodense")
    if metastasis_look not in METASTASIS_LOOKS:
        raise ValueError(f"unknown metastasis_look {metastasis_look!r}; expected one of {METASTASIS_LOOKS}")
    pattern = rng.choice(["none", "few", "metastatic", "mixed"], p=[0.08, 0.42, 0.25, 0.25])
    n_lesions = {"none": 0, "few": rng.integers(1, 5), "metastatic": rng.integers(3, 16),
                 "mixed": rng.integers(2, 9)}[pattern]
    type_p = np.array([weights[t] for t in LESION_TYPES], float)
    if pattern == "metastatic":
        type_p = type_p * np.array([0.3, 0.2, 3.0])
    type_p /= type_p.sum()

    phantom = Phantom(seed=seed, liver_hu=liver_hu, noise_hu=u(*domain.get("noise_hu", (6, 22))),
                      psf_mm=np.array([u(0.3, 0.9), u(0.3, 0.9), u(0.4, 2.2)]),
                      extent_min=np.array([-A - 40, -B - 40, -260.0]), extent_max=np.array([A + 40, B + 40, 200.0]),
                      liver_blobs=liver_blobs, liver_cuts=liver_cuts, lesions=[], structures=structures,
                      body=body)
    # Real livers press against the diaphragm and the lateral wall muscle; with a fat plane always
    # between them (generator 1.0) the network took that muscle for liver on real CT. A stream of
    # its own keeps every other draw of the seed as it was.
    wall_rng = np.random.default_rng((seed, 11))
    phantom.liver_wall_gap = 0.0 if wall_rng.random() < 0.75 else float(wall_rng.uniform(0.01, 0.03))
    _fit_liver_volume(phantom, target_liver_ml)
    phantom.liver_vessels = liver_vessels
    phantom.liver_vessel_hu = portal_hu
    phantom.liver_texture_hu = u(3, 9)

    candidates = _liver_points(phantom, rng, 4000)
    for lesion_id, diameter in enumerate(_lesion_diameters(rng, n_lesions), start=1):
        if len(candidates) == 0:
            break
        center = candidates[rng.integers(len(candidates))]
        lesion_type = rng.choice(LESION_TYPES, p=type_p)
        phantom.lesions.append(_make_lesion(rng, lesion_id, str(lesion_type), center, diameter, liver_hu,
                                            blood, contrast_scale, metastasis_look))
    phantom.liver_volume_ml = _liver_volume_ml(phantom)
    return phantom


def _make_lesion(rng, lesion_id, lesion_type, center, diameter, liver_hu, blood, contrast_scale,
                 metastasis_look="hypodense"):
    u = rng.uniform
    radius = diameter / 2
    elong = u(0.8, 1.25, 3)
    if lesion_type == "cyst":
        blob = _blob(rng, center, radius * elong ** 0.5, rot_deg=90, deform=0.03, wavelength=(radius * 3, radius * 8))
        hu = u(-2, 20)
        return Lesion(lesion_id, lesion_type, blob, hu, hu, hu, u(1, 4), edge_softness=0.02)
    if lesion_type == "hemangioma":
        blob = _blob(rng, center, radius * elong ** 0.7, rot_deg=90, deform=0.08, wavelength=(radius * 2, radius * 5))
        core = liver_hu - u(20, 65) * contrast_scale
        nodule_hu = blood - u(0, 30)
        fill = 1.0 if (diameter < 15 and rng.random() < 0.5) else u(0.0, 0.7)
        nodules = []
        for _ in range(rng.integers(3, 9)):
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            nodules.append(Blob(np.asarray(center) + d * radius * u(0.7, 0.95), np.full(3, radius * u(0.15, 0.35)),
                                np.eye(3)))
        scar = core - u(10, 40) if (diameter > 40 and rng.random() < 0.5) else core
        return Lesion(lesion_id, lesion_type, blob, core, nodule_hu, scar, u(4, 12), edge_softness=u(0.03, 0.1),
                      fill_fraction=fill, nodules=nodules)
    # metastasis: hypodense, rim/target enhancement, lobulated ill-defined margin, necrosis when large
    blob = _blob(rng, center, radius * elong, rot_deg=90, deform=u(0.08, 0.22), wavelength=(radius * 0.8, radius * 3),
                 n_waves=6)
    if metastasis_look == "hypervascular":
        # enhancing tumour brighter than the liver; a washed-out (hypodense) capsule in some
        core = liver_hu + u(20, 60) * contrast_scale
        rim = liver_hu - u(5, 25) * contrast_scale if rng.random() < 0.5 else core
    else:
        core = liver_hu - u(12, 80) * contrast_scale
        rim = liver_hu + u(-15, 25) if rng.random() < 0.7 else core
    necrosis = u(5, 30) if (diameter > 30 and rng.random() < 0.7) else core
    return Lesion(lesion_id, lesion_type, blob, core, rim, necrosis, u(6, 25), edge_softness=u(0.08, 0.3))


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
@dataclass
class Grid:
    """Axis-aligned canonical grid: voxel (k, j, i) sits at RAS (ox - i*sx, oy - j*sy, oz + k*sz)."""

    origin: np.ndarray  # RAS of voxel (0, 0, 0)
    spacing: np.ndarray  # (sx, sy, sz) > 0
    shape: tuple  # (nk, nj, ni)

    @property
    def ijk_to_ras(self):
        m = np.diag([-self.spacing[0], -self.spacing[1], self.spacing[2], 1.0])
        m[:3, 3] = self.origin
        return m

    def axes(self):
        nk, nj, ni = self.shape
        x = self.origin[0] - np.arange(ni) * self.spacing[0]
        y = self.origin[1] - np.arange(nj) * self.spacing[1]
        z = self.origin[2] + np.arange(nk) * self.spacing[2]
        return x, y, z


def _index_box(grid_axes, lo, hi):
    """Slices of the grid covering the RAS box [lo, hi] (None when outside)."""
    x, y, z = grid_axes
    out = []
    for coords, a, b in ((z, lo[2], hi[2]), (y, lo[1], hi[1]), (x, lo[0], hi[0])):
        idx = np.nonzero((coords >= a) & (coords <= b))[0]
        if idx.size == 0:
            return None
        out.append(slice(idx[0], idx[-1] + 1))
    return tuple(out)


def _sub_coords(grid_axes, box):
    x, y, z = (a.astype(np.float32) for a in grid_axes)
    return x[box[2]][None, None, :], y[box[1]][None, :, None], z[box[0]][:, None, None]


def _smooth_noise(rng, shape, spacing, cell_mm):
    """Unit-variance smooth random texture: coarse normal noise interpolated to the grid."""
    coarse_shape = [max(2, int(np.ceil(n * s / cell_mm)) + 2) for n, s in zip(shape, spacing)]
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    coords = [np.arange(n, dtype=np.float32) * s / cell_mm + 0.5 for n, s in zip(shape, spacing)]
    # separable linear interpolation, axis by axis (cheaper than map_coordinates on big grids)
    out = coarse
    for axis, c in enumerate(coords):
        i0 = np.floor(c).astype(int)
        w = (c - i0).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i0 + 1, axis=axis) * w
    return out / max(float(out.std()), 1e-3)


def _liver_radius(phantom, X, Y, Z):
    r = None
    for blob in phantom.liver_blobs:
        rb = blob.radius(X, Y, Z)
        # smooth union so lobes merge without creases
        r = rb if r is None else -0.12 * np.logaddexp(-r / 0.12, -rb / 0.12)
    for normal, offset in phantom.liver_cuts:
        r = np.maximum(r, 1 + (normal[0] * X + normal[1] * Y + normal[2] * Z - offset) / 15.0)
    # the liver stays inside the abdominal wall, usually touching its muscle
    return np.maximum(r, abdominal_wall(phantom).radius(X, Y, Z) + phantom.liver_wall_gap)


def abdominal_wall(phantom) -> Blob:
    """The inner surface of the abdominal wall muscle (radius 1 there)."""
    return phantom.structures[[s[0] for s in phantom.structures].index(VISCERAL_FAT)][1]


def _fit_liver_volume(phantom, target_ml):
    """Scale the lobes about the right lobe's centre so the organ reaches the drawn volume."""
    anchor = phantom.liver_blobs[0].center.copy()
    for _ in range(3):
        volume = _liver_volume_ml(phantom)
        scale = float(np.clip((target_ml / max(volume, 1.0)) ** (1 / 3), 0.8, 1.25))
        for blob in phantom.liver_blobs:
            blob.center = anchor + (blob.center - anchor) * scale
            blob.axes = blob.axes * scale


def _liver_points(phantom, rng, count):
    lo, hi = phantom.liver_bbox
    pts = rng.uniform(lo, hi, size=(count * 4, 3))
    r = _liver_radius(phantom, pts[:, 0], pts[:, 1], pts[:, 2])
    return pts[r < 0.97][:count]


def _liver_volume_ml(phantom):
    lo, hi = phantom.liver_bbox
    step = 6.0
    g = Grid(np.array([hi[0], hi[1], lo[2]]), np.full(3, step),
             tuple(int(v) for v in np.ceil((hi - lo)[::-1] / step) + 1))
    X, Y, Z = _sub_coords(g.axes(), (slice(None),) * 3)
    return float((_liver_radius(phantom, X, Y, Z) < 1).sum() * step ** 3 / 1000)


def render(phantom: Phantom, grid: Grid, rng=None, acquisition=True):
    """Render onto ``grid``. Returns (hu float32, tissue uint8, lesion_instances uint16).

    With ``acquisition``: blur by the phantom's point-spread function and add noise (as the scanner
    would); ground-truth labels are the noise-free shapes.
    """
    rng = rng if rng is not None else np.random.default_rng(phantom.seed + 1)
    ax = grid.axes()
    spacing_kji = np.asarray(grid.spacing)[::-1]
    tissue_texture = _smooth_noise(rng, grid.shape, spacing_kji, 12.0)
    lesion_texture = _smooth_noise(rng, grid.shape, spacing_kji, 2.5)
    hu = np.full(grid.shape, -1000.0, np.float32)
    tissue = np.zeros(grid.shape, np.uint8)
    instances = np.zeros(grid.shape, np.uint16)

    def paint(label, shape, value, texture, kind, r_extra=None):
        box = _index_box(ax, *shape.bbox())
        if box is None:
            return
        X, Y, Z = _sub_coords(ax, box)
        r = shape.radius(X, Y, Z)
        inside = r < 1
        if r_extra is not None:
            inside &= r_extra(X, Y, Z)
        if kind != "solid" and kind != "mottled":
            inside &= _special(kind, X, Y, Z, r)
        if not inside.any():
            return
        values = value + texture * tissue_texture[box]
        if kind == "mottled":  # stool: gas bubbles in soft matter
            values = values - 900 * (np.sin(X * 0.9) * np.sin(Y * 1.1 + 1) * np.sin(Z * 0.7 + 2) > 0.55)
        if kind == "vertebra":
            values = values - (value - 250) * (r < 0.75)  # cancellous core inside a cortical shell
        sub_hu, sub_t = hu[box], tissue[box]
        sub_hu[inside] = np.broadcast_to(values, inside.shape)[inside]
        sub_t[inside] = label

    for label, shape, value, texture, kind in phantom.structures:
        if label == VESSEL:
            continue  # vessels go over the liver
        paint(label, shape, value, texture, kind)

    # liver with intrahepatic vessels, then the extrahepatic organs that touch it again on top
    lo, hi = phantom.liver_bbox
    box = _index_box(ax, lo, hi)
    if box is not None:
        X, Y, Z = _sub_coords(ax, box)
        inside = _liver_radius(phantom, X, Y, Z) < 1
        values = phantom.liver_hu + phantom.liver_texture_hu * tissue_texture[box]
        sub_hu, sub_t = hu[box], tissue[box]
        sub_hu[inside] = np.broadcast_to(values, inside.shape)[inside]
        sub_t[inside] = LIVER
        for tube in phantom.liver_vessels:
            vbox = _index_box(ax, *tube.bbox())
            if vbox is None:
                continue
            Xv, Yv, Zv = _sub_coords(ax, vbox)
            vin = (tube.radius(Xv, Yv, Zv) < 1) & (tissue[vbox] == LIVER)
            hu[vbox][vin] = phantom.liver_vessel_hu
            tissue[vbox][vin] = LIVER_VESSEL
    for label, shape, value, texture, kind in phantom.structures:
        if label in (GALLBLADDER, VESSEL):
            paint(label, shape, value, texture, kind)

    for lesion in phantom.lesions:
        _paint_lesion(phantom, lesion, ax, hu, tissue, instances, lesion_texture)

    if acquisition:
        sigma = phantom.psf_mm / np.asarray(grid.spacing)
        hu = ndimage.gaussian_filter(hu, sigma=(sigma[2], sigma[1], sigma[0]), truncate=2.5)
        hu += _acquisition_noise(rng, grid.shape, grid.spacing, phantom.noise_hu)
    return hu.astype(np.float32), tissue, instances


def _acquisition_noise(rng, shape_kji, spacing_xyz, noise_hu):
    """The scanner's noise on a grid: correlated in-plane over ~0.6 mm, nearly independent between slices."""
    noise = rng.standard_normal(shape_kji, dtype=np.float32)
    noise_blur = 0.6 / np.asarray(spacing_xyz, float)
    noise = ndimage.gaussian_filter(noise, sigma=(noise_blur[2] * 0.5, noise_blur[1], noise_blur[0]))
    return noise * (noise_hu / max(float(noise.std()), 1e-3))


def _linear_along_k(volume, positions):
    """``volume`` sampled at fractional slice ``positions`` (within its slices), linearly."""
    i0 = np.clip(np.floor(positions).astype(int), 0, len(volume) - 2)
    w = (positions - i0).astype(np.float32)[:, None, None]
    return volume[i0] * (1 - w) + volume[i0 + 1] * w


def render_thick_slices(phantom: Phantom, grid: Grid, thickness_mm: float, rng, profile: float = 1.0):
    """Render onto ``grid`` what a CT of ``thickness_mm`` slices looks like once resampled onto it, as the
    engine resamples every CT (linearly). Returns render's (hu, tissue, lesion_instances), the labels the
    noise-free shapes on ``grid`` itself.

    Each slice averages the anatomy over a box ``profile`` x ``thickness_mm`` wide (0: a point sample, as the
    phantom CTs are rendered; 1: a scanner's full slice profile) after the phantom's blur, at a random phase to
    the grid, and carries the scanner's noise as one slice; linear interpolation between the slices then fills
    ``grid``: partial volume and interpolation seams a network trained on fine renders never sees."""
    spacing = np.asarray(grid.spacing, float)
    step = thickness_mm / spacing[2]  # slice distance, in grid slices
    profile_sigma = profile * thickness_mm / np.sqrt(12.0) / spacing[2]  # a box's standard deviation
    psf = phantom.psf_mm / spacing
    sigma_k = float(np.hypot(psf[2], profile_sigma))
    margin = int(np.ceil(step + 2.5 * sigma_k)) + 1
    nk = grid.shape[0]
    padded = Grid(np.asarray(grid.origin, float) - np.array([0.0, 0.0, margin * spacing[2]]), spacing,
                  (nk + 2 * margin, *grid.shape[1:]))
    hu, tissue, instances = render(phantom, padded, rng, acquisition=False)
    hu = ndimage.gaussian_filter(hu, sigma=(sigma_k, psf[1], psf[0]), truncate=2.5)
    first = margin - rng.uniform(0.0, step)  # the slice at or before the grid's first
    positions = first + np.arange(int(np.ceil((nk - 1 + margin - first) / step)) + 1) * step
    slices = _linear_along_k(hu, positions)
    slices += _acquisition_noise(rng, slices.shape, (spacing[0], spacing[1], thickness_mm), phantom.noise_hu)
    hu = _linear_along_k(slices, (margin + np.arange(nk) - first) / step)
    inner = slice(margin, margin + nk)
    return hu.astype(np.float32), tissue[inner], instances[inner]


def _special(kind, X, Y, Z, r):
    if isinstance(kind, tuple) and kind[0] == "ribs":
        _, spacing, width, phase, top = kind
        theta = np.arctan2(Y, X)
        band = np.mod(Z + 40 * theta + phase, spacing) < spacing * width * 0.5
        return (r > 0.985) & band & (Z > top - 60)
    return np.ones_like(r, dtype=bool)


def _paint_lesion(phantom, lesion, ax, hu, tissue, instances, lesion_texture):
    box = _index_box(ax, *lesion.blob.bbox())
    if box is None:
        return
    X, Y, Z = _sub_coords(ax, box)
    r = lesion.blob.radius(X, Y, Z)
    liver = _liver_radius(phantom, X, Y, Z)
    inside = (r < 1) & (liver < 1.02)  # lesions stay in the liver (may bulge its surface slightly)
    if not inside.any():
        return
    texture = lesion.texture_hu * lesion_texture[box]
    if lesion.lesion_type == "cyst":
        values = lesion.core_hu + texture + 0 * r
    elif lesion.lesion_type == "hemangioma":
        values = lesion.core_hu + texture + 0 * r
        enhanced = r > (1 - lesion.fill_fraction)
        for nodule in lesion.nodules:
            enhanced = enhanced | (nodule.radius(X, Y, Z) < 1)
        values = np.where(enhanced, lesion.rim_hu + texture * 0.5, values)
        if lesion.center_hu != lesion.core_hu:
            values = np.where(r < 0.3, lesion.center_hu, values)
    else:
        values = np.where(r > 0.8, lesion.rim_hu, lesion.core_hu) + texture
        values = np.where(r < 0.45, np.minimum(values, lesion.center_hu + texture), values)
    # ill-defined margins: blend into the surrounding liver over the outer part of the radius
    soft = max(lesion.edge_softness, 1e-3)
    weight = np.clip((1 - r) / soft, 0, 1)
    sub_hu = hu[box]
    blended = weight * values + (1 - weight) * sub_hu
    sub_hu[inside] = np.broadcast_to(blended, inside.shape)[inside]
    tissue[box][inside] = LESION
    instances[box][inside] = lesion.lesion_id


# ----------------------------------------------------------------------------------------------
# Whole phantom acquisitions (evaluation, demo, Sample Data)
# ----------------------------------------------------------------------------------------------
@dataclass
class GroundTruth:
    liver_mask: np.ndarray  # [k, j, i] uint8, liver incl. lesions
    lesion_instances: np.ndarray  # uint16
    lesion_types: dict  # id -> type
    tissue: np.ndarray | None = None  # [k, j, i] uint8 tissue labels (AIR ... TABLE): where errors lie

    @property
    def label_map(self):
        """0 background, 1 liver, 2 cyst, 3 hemangioma, 4 metastasis."""
        labels = self.liver_mask.astype(np.uint8)
        for lesion_id, lesion_type in self.lesion_types.items():
            labels[self.lesion_instances == lesion_id] = 2 + LESION_TYPES.index(lesion_type)
        return labels


def acquisition_grid(phantom: Phantom, rng, in_plane=None, thickness=None, fov_mm=None):
    """A realistic scan of the phantom: 512x512-style in-plane grid, z range covering the liver."""
    in_plane = in_plane or rng.uniform(0.55, 0.95)
    thickness = thickness or float(rng.choice([0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0]))
    fov = fov_mm or rng.uniform(300, 480)
    n = int(round(fov / in_plane))
    lo, hi = phantom.liver_bbox
    z0 = lo[2] - rng.uniform(20, 60)
    z1 = min(hi[2], phantom.liver_cuts[0][1]) + rng.uniform(10, 50)
    nk = int(np.ceil((z1 - z0) / thickness))
    center = np.array([rng.uniform(-15, 15), rng.uniform(-15, 15)])
    origin = np.array([center[0] + fov / 2, center[1] + fov / 2, z0])
    return Grid(origin, np.array([in_plane, in_plane, thickness]), (nk, n, n))


def generate_phantom_ct(seed: int, grid: Grid | None = None, domain: dict | None = None,
                        max_in_plane: int | None = None) -> tuple[CTVolume, GroundTruth]:
    """A complete synthetic CT acquisition (int16 HU, canonical orientation) and its ground truth.

    ``max_in_plane`` caps the matrix size (e.g. 256 for fast tests) by coarsening the pixel size.
    """
    phantom = make_phantom(seed, domain)
    rng = np.random.default_rng(seed + 7)
    if grid is None:
        grid = acquisition_grid(phantom, rng)
        if max_in_plane and grid.shape[2] > max_in_plane:
            factor = grid.shape[2] / max_in_plane
            grid = Grid(grid.origin, grid.spacing * np.array([factor, factor, 1.0]),
                        (grid.shape[0], max_in_plane, max_in_plane))
    hu, tissue, instances = render(phantom, grid, rng)
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    liver = ((tissue == LIVER) | (tissue == LIVER_VESSEL) | (tissue == LESION)).astype(np.uint8)
    present = {int(v) for v in np.unique(instances) if v}
    types = {les.lesion_id: les.lesion_type for les in phantom.lesions if les.lesion_id in present}
    # renumber so ids are 1..n like the engine's output
    remap = np.zeros(max(present, default=0) + 1, np.uint16)
    new_types = {}
    for new_id, old_id in enumerate(sorted(present), start=1):
        remap[old_id] = new_id
        new_types[new_id] = types[old_id]
    instances = remap[instances]
    return CTVolume(hu, grid.ijk_to_ras, name=f"phantom_{seed}"), GroundTruth(liver, instances, new_types, tissue)
