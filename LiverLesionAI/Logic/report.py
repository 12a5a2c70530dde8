"""Human-readable outputs of a segmentation: terminal table, CSV, JSON and an overview PNG.

Every file is written atomically (temporary file in the target folder, then moved in place) and an
existing file is never replaced unless the caller passes overwrite=True.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .errors import OutputError
from .geometry import nonzero_box
from .preprocessing import denormalize_hu
from .volume_io import write_file_atomically
from .records import (
    LESION_TYPE_COLORS,
    LESION_TYPES,
    LIVER_COLOR,
    UNCLASSIFIED_COLOR,
    LesionRecord,
    SegmentationResult,
)

CSV_COLUMNS = (
    "lesion_id", "lesion_type", "probability", *(f"p_{t}" for t in LESION_TYPES), "voxel_count",
    "volume_ml", "long_axis_mm", "short_axis_mm", "centroid_r", "centroid_a", "centroid_s",
    "mean_hu", "std_hu", "first_slice", "last_slice", "review_status",
)

# Overview image layout (pixels) and display.
PANEL_PX = 384
TITLE_PX = 28
LEGEND_PX = 28
MAX_OVERVIEW_LESIONS = 3
VIEW_SPACING_MM = 0.8
FOV_MARGIN_MM = 15.0
WINDOW_LEVEL_HU = (400.0, 40.0)  # abdominal soft-tissue window
AIR_HU = -1024.0


class ReportWriteError(OutputError):
    """A report file cannot be written (it already exists, or its folder is missing)."""


def _write_atomic(path, data: bytes, overwrite: bool) -> Path:
    """volume_io.write_file_atomically: a hidden sibling moved in place, an existing file never replaced unless
    ``overwrite``; the file gets the user's usual permissions (a private temp file made them 0600)."""
    try:
        return write_file_atomically(path, lambda temp: Path(temp).write_bytes(data), overwrite)
    except OutputError as error:
        raise ReportWriteError(str(error)) from None


# ----------------------------------------------------------------------------------------- text


def format_lesion_table(records: list[LesionRecord]) -> str:
    """Fixed-width table of lesions for the terminal."""
    if not records:
        return "No liver lesions found."
    header = (f"{'ID':>3}  {'Type':<11} {'Prob':>5}  {'Vol mL':>8}  {'Long mm':>7}  {'Short mm':>8}  "
              f"{'Mean HU':>7}  {'Slices':>9}")
    lines = [header, "-" * len(header)]
    for r in records:
        slices = f"{r.slice_range[0]}-{r.slice_range[1]}"
        lines.append(
            f"{r.lesion_id:>3}  {r.lesion_type:<11} {r.probability:>5.2f}  {r.volume_ml:>8.2f}  "
            f"{r.long_axis_mm:>7.1f}  {r.short_axis_mm:>8.1f}  {r.mean_hu:>7.1f}  {slices:>9}"
        )
    return "\n".join(lines)


def write_lesions_csv(path, records: list[LesionRecord], overwrite: bool = False) -> Path:
    """One row per lesion (columns CSV_COLUMNS)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in records:
        writer.writerow([
            r.lesion_id, r.lesion_type, f"{r.probability:.4f}",
            *(f"{r.probabilities.get(t, 0.0):.4f}" for t in LESION_TYPES),
            r.voxel_count, f"{r.volume_ml:.4f}", f"{r.long_axis_mm:.2f}", f"{r.short_axis_mm:.2f}",
            *(f"{v:.2f}" for v in r.centroid_ras), f"{r.mean_hu:.2f}", f"{r.std_hu:.2f}",
            r.slice_range[0], r.slice_range[1], r.review_status,
        ])
    return _write_atomic(path, buf.getvalue().encode("utf-8"), overwrite)


def write_lesions_json(path, result: SegmentationResult, extra: dict | None = None,
                       overwrite: bool = False) -> Path:
    """model_version, liver_volume_ml, messages and lesions (LesionRecord.to_dict), plus ``extra``."""
    doc = {
        "model_version": result.model_version,
        "liver_volume_ml": float(result.liver_volume_ml),
        "messages": list(result.messages),
        "lesions": [r.to_dict() for r in result.lesions],
    }
    if extra:
        clash = set(extra) & set(doc)
        if clash:
            raise ValueError(f"Extra report fields would replace standard fields: {sorted(clash)}.")
        doc.update(extra)
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    return _write_atomic(path, text.encode("utf-8"), overwrite)


# ---------------------------------------------------------------------------------- overview PNG


def _rgb255(color) -> tuple[int, int, int]:
    return tuple(int(round(c * 255)) for c in color)


def _ras_bounds(box: tuple[slice, slice, slice], ijk_to_ras: np.ndarray):
    """RAS bounding box (min, max) of the voxel cells in a [k, j, i] box."""
    lo = [s.start - 0.5 for s in box][::-1]  # i, j, k
    hi = [s.stop - 0.5 for s in box][::-1]
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])])
    ras = (corners @ ijk_to_ras.T)[:, :3]
    return ras.min(axis=0), ras.max(axis=0)


def _point_inside(instances: np.ndarray, lesion_id: int, box, ijk_to_ras: np.ndarray) -> np.ndarray:
    """RAS of the lesion voxel closest to its centroid (the centroid may lie outside a curved lesion);
    ``box``: index slices holding the lesion."""
    kji = np.argwhere(instances[box] == lesion_id).astype(np.float64) + [s.start for s in box]
    centre = kji.mean(axis=0)
    nearest = kji[np.argmin(((kji - centre) ** 2).sum(axis=1))]
    return (ijk_to_ras @ np.array([*nearest[::-1], 1.0]))[:3]


def _offset(inner, outer):
    """Slices ``inner`` of a sub-volume taken at ``outer``, as slices of the whole volume."""
    return tuple(slice(i.start + o.start, i.stop + o.start) for i, o in zip(inner, outer))


def _sample(volume, ras_points: np.ndarray, ras_to_ijk: np.ndarray, order: int, cval: float):
    """Values of a [k, j, i] volume at RAS points (..., 3)."""
    flat = ras_points.reshape(-1, 3)
    ijk = flat @ ras_to_ijk[:3, :3].T + ras_to_ijk[:3, 3]
    values = ndimage.map_coordinates(volume, ijk[:, ::-1].T, order=order, mode="constant", cval=cval)
    return values.reshape(ras_points.shape[:-1])


def _view_grid(kind: str, centre: np.ndarray, lo: np.ndarray, hi: np.ndarray, step: float):
    """RAS points of an axial or coronal view, radiological: patient right on image left."""
    r = np.arange(hi[0], lo[0], -step)  # columns go toward patient left
    if kind == "axial":
        rows = np.arange(hi[1], lo[1], -step)  # anterior up
        rr, aa = np.meshgrid(r, rows)
        return np.stack([rr, aa, np.full_like(rr, centre[2])], axis=-1)
    rows = np.arange(hi[2], lo[2], -step)  # superior up
    rr, ss = np.meshgrid(r, rows)
    return np.stack([rr, np.full_like(rr, centre[1]), ss], axis=-1)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Inner two-pixel rim of a 2D mask, so the outline never hides what lies outside it."""
    return mask & ~ndimage.binary_erosion(mask, iterations=2, border_value=0)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _render_panel(hu, liver_mask, instances, colours, ras_to_ijk, grid, caption, font) -> Image.Image:
    ct = _sample(hu, grid, ras_to_ijk, order=1, cval=AIR_HU)
    width, level = WINDOW_LEVEL_HU
    grey = np.clip((ct - (level - width / 2)) / width * 255.0, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    lesions = _sample(instances, grid, ras_to_ijk, order=0, cval=0)
    liver = (_sample(liver_mask, grid, ras_to_ijk, order=0, cval=0) != 0) | (lesions != 0)  # the organ
    rgb[_outline(liver)] = _rgb255(LIVER_COLOR)
    labels = []
    for lid, box in enumerate(ndimage.find_objects(lesions), start=1):
        if box is None:
            continue
        rim = _outline(lesions == lid)
        rgb[rim] = colours.get(lid, _rgb255(UNCLASSIFIED_COLOR))
        labels.append((lid, box[1].stop + 2, max(box[0].start - 4, 0)))
    panel = Image.new("RGB", (PANEL_PX, PANEL_PX), (0, 0, 0))
    rgb = rgb[:PANEL_PX, :PANEL_PX]
    left, top = (PANEL_PX - rgb.shape[1]) // 2, (PANEL_PX - rgb.shape[0]) // 2
    panel.paste(Image.fromarray(np.ascontiguousarray(rgb), "RGB"), (left, top))
    draw = ImageDraw.Draw(panel)
    for lid, x, y in labels:
        colour = colours.get(lid, _rgb255(UNCLASSIFIED_COLOR))
        draw.text((x + left, y + top), str(lid), fill=colour, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    draw.text((4, PANEL_PX - 18), caption, fill=(255, 255, 255), font=font, stroke_width=1,
              stroke_fill=(0, 0, 0))
    return panel


def render_overview_png(path, hu: np.ndarray, ijk_to_ras, result: SegmentationResult,
                        case_name: str = "", overwrite: bool = False) -> Path:
    """Axial + coronal panel through each of the (up to 3) largest lesions, or the liver centre.

    Layout: one row per lesion (axial left, coronal right), title on top, type legend at the bottom;
    width 2 * PANEL_PX, height TITLE_PX + rows * PANEL_PX + LEGEND_PX.
    """
    hu = np.asarray(hu)
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"ijk_to_ras must be a 4x4 matrix, got shape {m.shape}.")
    instances = np.asarray(result.lesion_instances)
    liver_mask = np.asarray(result.liver_mask)
    if not (hu.shape == instances.shape == liver_mask.shape):
        raise ValueError(
            f"CT {hu.shape}, liver mask {np.shape(result.liver_mask)} and lesion map {instances.shape} "
            "must have the same size."
        )
    ras_to_ijk = np.linalg.inv(m)
    colours = {r.lesion_id: _rgb255(LESION_TYPE_COLORS.get(r.lesion_type, UNCLASSIFIED_COLOR))
               for r in result.lesions}

    # Field of view: the liver with a margin, else the whole scan.
    organ_box = nonzero_box(liver_mask, instances)
    box = organ_box or tuple(slice(0, n) for n in hu.shape)
    lo, hi = _ras_bounds(box, m)
    # A cube around it, so axial and coronal panels share one scale and both fill their square.
    half = float((hi - lo).max()) / 2 + FOV_MARGIN_MM
    lo, hi = (lo + hi) / 2 - half, (lo + hi) / 2 + half
    step = max(VIEW_SPACING_MM, 2 * half / PANEL_PX)

    in_box = instances[box]
    sizes = np.bincount(in_box.ravel())
    present = {int(i) for i in np.flatnonzero(sizes) if i > 0}
    largest = sorted((r for r in result.lesions if r.lesion_id in present),
                     key=lambda r: (-r.voxel_count, r.lesion_id))[:MAX_OVERVIEW_LESIONS]
    if not largest and present:  # lesions without records: still show them
        ids = sorted(present, key=lambda i: -sizes[i])[:MAX_OVERVIEW_LESIONS]
    else:
        ids = [r.lesion_id for r in largest]
    if ids:
        lesion_boxes = ndimage.find_objects(in_box, max_label=max(ids))
        centres = [(f"lesion {lid}", _point_inside(instances, lid, _offset(lesion_boxes[lid - 1], box), m))
                   for lid in ids]
    else:
        centres = [("liver centre" if organ_box else "scan centre", (lo + hi) / 2)]

    font = _font(14)
    rows = len(centres)
    canvas = Image.new("RGB", (2 * PANEL_PX, TITLE_PX + rows * PANEL_PX + LEGEND_PX), (0, 0, 0))
    for row, (what, centre) in enumerate(centres):
        for col, kind in enumerate(("axial", "coronal")):
            grid = _view_grid(kind, centre, lo, hi, step)
            panel = _render_panel(hu, liver_mask, instances, colours, ras_to_ijk, grid,
                                  f"{kind} through {what}  (R on left)", font)
            canvas.paste(panel, (col * PANEL_PX, TITLE_PX + row * PANEL_PX))

    draw = ImageDraw.Draw(canvas)
    n = len(present)
    title = (f"{case_name + '  |  ' if case_name else ''}liver {result.liver_volume_ml:.0f} mL  |  "
             f"{n} lesion{'s' if n != 1 else ''}")
    draw.text((6, 6), title, fill=(255, 255, 255), font=_font(16))
    x, y = 6, TITLE_PX + rows * PANEL_PX + 7
    for name, colour in (("liver", LIVER_COLOR), *((t, LESION_TYPE_COLORS[t]) for t in LESION_TYPES)):
        draw.rectangle((x, y, x + 14, y + 14), fill=_rgb255(colour))
        draw.text((x + 20, y), name, fill=(255, 255, 255), font=font)
        x += 40 + int(draw.textlength(name, font=font))

    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return _write_atomic(path, buf.getvalue(), overwrite)


# ----------------------------------------------------------------------------------- explanations
EXPLANATION_PANEL_PX = 256
ATTRIBUTION_FOR, ATTRIBUTION_AGAINST = (202, 0, 32), (5, 113, 176)  # red / blue of a colour-blind-safe RdBu
EXPLANATION_MARGIN_MM = 20.0  # of the CT shown around the lesion
ATTRIBUTION_SCALE_PERCENTILE = 99.5


def attribution_scale(attribution: np.ndarray) -> float:
    """|attribution| shown at full colour: a high percentile of the nonzero values (the lesion and its band),
    so that one voxel does not wash out the rest."""
    values = np.abs(attribution[attribution != 0])
    return float(max(np.percentile(values, ATTRIBUTION_SCALE_PERCENTILE), 1e-12)) if values.size else 1.0


def _explanation_panel(hu, attribution, lesion, colour, caption, font) -> Image.Image:
    width, level = WINDOW_LEVEL_HU
    grey = np.clip((hu - (level - width / 2)) / width, 0, 1)[..., None] * 255.0
    strength = np.clip(np.abs(attribution), 0, 1)[..., None] * 0.6
    tint = np.where(attribution[..., None] >= 0, np.array(ATTRIBUTION_FOR, float), np.array(ATTRIBUTION_AGAINST, float))
    rgb = (grey * (1 - strength) + tint * strength).astype(np.uint8)
    rgb[lesion & ~ndimage.binary_erosion(lesion, border_value=0)] = colour  # 1 pixel: the rim's colour shows
    scale = EXPLANATION_PANEL_PX / max(rgb.shape[:2])
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    image = Image.fromarray(np.ascontiguousarray(rgb), "RGB").resize(size, Image.NEAREST)
    panel = Image.new("RGB", (EXPLANATION_PANEL_PX, EXPLANATION_PANEL_PX), (0, 0, 0))
    panel.paste(image, ((EXPLANATION_PANEL_PX - size[0]) // 2, (EXPLANATION_PANEL_PX - size[1]) // 2))
    ImageDraw.Draw(panel).text((4, EXPLANATION_PANEL_PX - 18), caption, fill=(255, 255, 255), font=font,
                               stroke_width=1, stroke_fill=(0, 0, 0))
    return panel


def render_explanation_png(path, explanation, hu_window, overwrite: bool = False) -> Path:
    """Axial, coronal and sagittal views through the lesion (explain.LesionExplanation): the CT, the
    attribution in red (for the type) and blue (against), the lesion's outline in its type's colour.
    Radiological display: patient right on image left, anterior and superior up, anterior left in sagittal."""
    hu = denormalize_hu(explanation.image, hu_window)
    attribution = explanation.attribution / attribution_scale(explanation.attribution)
    k, j, i = (int(round(c)) for c in ndimage.center_of_mass(explanation.lesion_mask))
    margin = int(round(EXPLANATION_MARGIN_MM / float(abs(explanation.ijk_to_ras[0, 0]))))
    kb, jb, ib = (slice(max(box.start - margin, 0), box.stop + margin)
                  for box in ndimage.find_objects(explanation.lesion_mask.astype(np.uint8))[0])
    canonical_views = {  # canonical [k: superior, j: posterior, i: patient left] -> (rows, columns) on screen
        "axial": lambda a: a[k, jb, ib],
        "coronal": lambda a: a[kb, j, ib][::-1],
        "sagittal": lambda a: a[kb, jb, i][::-1],
    }
    colour = _rgb255(LESION_TYPE_COLORS.get(explanation.lesion_type, UNCLASSIFIED_COLOR))
    font = _font(14)
    canvas = Image.new("RGB", (3 * EXPLANATION_PANEL_PX, TITLE_PX + EXPLANATION_PANEL_PX + LEGEND_PX), (0, 0, 0))
    for column, (view, cut) in enumerate(canonical_views.items()):
        panel = _explanation_panel(cut(hu), cut(attribution), cut(explanation.lesion_mask), colour, view, font)
        canvas.paste(panel, (column * EXPLANATION_PANEL_PX, TITLE_PX))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 6), f"Lesion {explanation.lesion_id}: why stage 2 calls it {explanation.lesion_type} "
                      f"(mean probability {explanation.score:.2f}; {explanation.baseline_score:.2f} without it)",
              fill=(255, 255, 255), font=_font(15))
    x, y = 6, TITLE_PX + EXPLANATION_PANEL_PX + 7
    for name, tint in ((f"for {explanation.lesion_type}", ATTRIBUTION_FOR),
                       (f"against {explanation.lesion_type}", ATTRIBUTION_AGAINST)):
        draw.rectangle((x, y, x + 14, y + 14), fill=tint)
        draw.text((x + 20, y), name, fill=(255, 255, 255), font=font)
        x += 40 + int(draw.textlength(name, font=font))
    draw.text((x, y), f"Integrated Gradients, {explanation.steps} steps", fill=(190, 190, 190), font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return _write_atomic(path, buf.getvalue(), overwrite)
