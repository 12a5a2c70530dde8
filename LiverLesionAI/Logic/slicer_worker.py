"""Segment & Classify in a separate process, so that Slicer's window never freezes and Cancel is a kill.

The panel writes the CT to a temporary folder, starts this file with Slicer's Python
(``PythonSlicer slicer_worker.py segment CT.nrrd -o OUT --progress-json ...``), reads one JSON line
per progress step, and loads ``OUT/*.seg.nrrd`` into the scene only when the process succeeded:
a cancelled or failed run leaves the scene as it was.

Run as a script, this file makes the folder it lives in importable as ``liverlesionai`` (inside
Slicer the folder is called ``Logic``) and hands over to the command line (``liverlesionai.cli``).
No Qt here: the Qt process object lives in the module's Logic class.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

PACKAGE_NAME = "liverlesionai"
WORKER_SCRIPT = Path(__file__).resolve()


def import_package_from(folder: str | os.PathLike):
    """Import ``folder`` (holding __init__.py) as the package ``liverlesionai`` unless it already is."""
    import importlib.util

    if PACKAGE_NAME in sys.modules:
        return sys.modules[PACKAGE_NAME]
    folder = Path(folder)
    spec = importlib.util.spec_from_file_location(
        PACKAGE_NAME, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = module
    spec.loader.exec_module(module)
    return module


def python_executable() -> str:
    """Slicer's own Python launcher when inside Slicer (it sets up the libraries), else this Python."""
    return shutil.which("PythonSlicer") or sys.executable


def default_threads() -> int:
    """All cores but one, so Slicer's window stays responsive while the worker runs."""
    return max(1, (os.cpu_count() or 2) - 1)


def segment_command(
    input_path: str | os.PathLike, output_dir: str | os.PathLike, model: str | None = None, device: str = "auto",
    force: bool = False, liver_mask: str | os.PathLike | None = None,
) -> list[str]:
    """Program and arguments that segment ``input_path`` into ``output_dir`` with JSON progress lines (inside
    the liver of ``liver_mask`` when given)."""
    args = [python_executable(), str(WORKER_SCRIPT), "segment", str(input_path), "-o", str(output_dir),
            "--progress-json", "--device", device, "--threads", str(default_threads())]
    if force:
        args.append("--force")
    if liver_mask:
        args += ["--liver-mask", str(liver_mask)]
    if model:
        args += ["--model", str(model)]
    return args


def explain_command(
    input_path: str | os.PathLike, lesion_mask: str | os.PathLike, lesion_id: int, lesion_type: str,
    output_dir: str | os.PathLike, model: str | None = None, device: str = "auto",
) -> list[str]:
    """Program and arguments that write the Integrated-Gradients explanation of one (reviewed) lesion's type
    into ``output_dir`` (``liverlesionai explain --lesion-mask``), with JSON progress lines."""
    args = [python_executable(), str(WORKER_SCRIPT), "explain", str(input_path), "-o", str(output_dir),
            "--lesion-mask", str(lesion_mask), "--lesion", str(int(lesion_id)), "--lesion-type", lesion_type,
            "--progress-json", "--device", device, "--threads", str(default_threads())]
    if model:
        args += ["--model", str(model)]
    return args


def parse_progress_line(line: str) -> tuple[float, str] | None:
    """(fraction 0..1, message) from one line of worker output, or None for any other line."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or "progress" not in data:
        return None
    try:
        fraction = min(max(float(data["progress"]), 0.0), 1.0)
    except (TypeError, ValueError):
        return None
    return fraction, str(data.get("message", ""))


def missing_requirements(requirements_file: str | os.PathLike) -> list[str]:
    """Lines of a requirements file whose package is not installed or too old (for Slicer before 5.11,
    which lacks ``slicer.packaging.pip_ensure``)."""
    from importlib.metadata import PackageNotFoundError, version

    missing = []
    for line in Path(requirements_file).read_text(encoding="utf-8").splitlines():
        requirement = line.split("#", 1)[0].strip()
        if not requirement:
            continue
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        minimum = re.search(r">=\s*([0-9][0-9.]*)", requirement)
        try:
            installed = version(name)
        except PackageNotFoundError:
            missing.append(requirement)
            continue
        if minimum and _version_tuple(installed) < _version_tuple(minimum.group(1)):
            missing.append(requirement)
    return missing


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def write_volume_for_worker(volume_node, folder: str | os.PathLike) -> Path:
    """The CT as NRRD in ``folder`` (a temporary folder the panel made), for the worker to read."""
    import slicer

    from .errors import OutputError

    path = Path(folder) / "input_ct.nrrd"
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)  # faster; the file lives only until the run ends
    if not storage.WriteData(volume_node):
        raise OutputError(f"Could not write the CT to the temporary folder {folder}.")
    return path


def write_liver_mask_for_worker(seg_node, volume_node, folder: str | os.PathLike) -> Path:
    """The reviewed liver (mrml.reviewed_liver_mask) as NRRD on the CT's grid, for ``segment --liver-mask``."""
    from . import mrml
    from .volume_io import write_volume

    mask = mrml.reviewed_liver_mask(seg_node, volume_node)
    path = Path(folder) / "reviewed_liver.nrrd"
    return write_volume(path, mask.astype("uint8"), mrml.world_ijk_to_ras(volume_node))


def write_segment_mask_for_worker(seg_node, segment_id: str, volume_node, folder: str | os.PathLike) -> Path:
    """One segment as a mask on the CT's grid (NRRD), for ``explain --lesion-mask``."""
    from . import mrml
    from .errors import InputError
    from .volume_io import write_volume

    mask = mrml.segment_masks(seg_node, volume_node, [segment_id]) == 1
    if not mask.any():
        name = seg_node.GetSegmentation().GetSegment(segment_id).GetName()
        raise InputError(f"The segment '{name}' is empty: nothing to explain.")
    path = Path(folder) / "lesion_mask.nrrd"
    return write_volume(path, mask.astype("uint8"), mrml.world_ijk_to_ras(volume_node))


def load_worker_explanation(scene, output_dir: str | os.PathLike, name: str):
    """The attribution map the worker wrote (call only on success), as a volume node (mrml.load_attribution_volume)."""
    from . import mrml
    from .errors import OutputError

    found = sorted(Path(output_dir).glob("*.explanations/lesion_*.attribution.nrrd"))
    if len(found) != 1:
        raise OutputError(f"The explanation run left {len(found)} attribution maps in {output_dir}; expected 1.")
    return mrml.load_attribution_volume(scene, found[0], name)


def find_result_file(output_dir: str | os.PathLike) -> Path:
    from .errors import OutputError

    found = sorted(Path(output_dir).glob("*.seg.nrrd"))
    if len(found) != 1:
        raise OutputError(f"The segmentation run left {len(found)} segmentation files in {output_dir}; expected 1.")
    return found[0]


def load_worker_result(scene, volume_node, output_dir: str | os.PathLike, name: str | None = None):
    """The worker's seg.nrrd as a segmentation node referencing ``volume_node`` (call only on success)."""
    from . import mrml

    seg_node = mrml.load_segmentation(scene, find_result_file(output_dir),
                                      name or f"{volume_node.GetName()} liver lesions")
    # The file lives in a temporary folder: the node must not keep pointing at it.
    storage = seg_node.GetStorageNode()
    seg_node.SetAndObserveStorageNodeID(None)
    if storage is not None:
        scene.RemoveNode(storage)
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return seg_node


def main(argv: list[str] | None = None) -> int:
    import_package_from(Path(__file__).resolve().parent)
    from liverlesionai.cli import main as cli_main

    return cli_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
