"""Bad inputs: a corpus of odd volumes, each through the command line and the Qt-free Slicer layer.

For every kind: the exact message the user sees, the exit code, and that the output folder holds
either all four case outputs (accepted inputs) or nothing at all, no hidden temp file either.
The corpus is generated here; the engine runs a tiny random-weight model (behaviour, not quality).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from liverlesionai import cli, engine as engine_module, mrml, validation
from liverlesionai.engine import LiverLesionEngine
from liverlesionai.errors import InputError
from liverlesionai.records import CTVolume
from liverlesionai.segfile import read_seg_nrrd
from liverlesionai.volume_io import read_ct, sitk_from_array, write_volume

SHAPE = (40, 64, 64)  # k, j, i: 320 x 320 mm in-plane, 200 mm head-to-feet
SPACING = (5.0, 5.0, 5.0)  # i, j, k in mm
FORCE = "force the run (--force on the command line) if you are sure."


def axial_matrix(spacing=SPACING, origin=(160.0, 160.0, -100.0)):
    """Canonical axial IJK-to-RAS: i toward patient left, j toward posterior, k toward head."""
    m = np.eye(4)
    m[:3, :3] = np.diag([-spacing[0], -spacing[1], spacing[2]])
    m[:3, 3] = origin
    return m


def rotation(axis, degrees):
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    r = np.eye(3)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def abdomen(shape=SHAPE, dtype=np.int16):
    """Water-like body (40 HU) with a denser 'liver' (100 HU) and dark spots, in air (-1000 HU)."""
    k, j, i = np.indices(shape, dtype=np.float32)
    cj, ci = (shape[1] - 1) / 2, (shape[2] - 1) / 2
    r = np.hypot((j - cj) / shape[1], (i - ci) / shape[2])
    hu = np.where(r < 0.42, 40.0, -1000.0)
    liver = np.hypot((j - cj * 0.8) / shape[1], (i - ci * 0.7) / shape[2]) < 0.2
    hu[liver] = 100.0
    hu[liver & ((k.astype(int) + j.astype(int) + i.astype(int)) % 7 == 0)] = 20.0
    return hu.astype(dtype)


def save(path, voxels, matrix=None):
    write_volume(path, voxels, axial_matrix() if matrix is None else matrix)
    return path


# ---------------------------------------------------------------------------------------- corpus
# kind -> builder(folder) returning (input path, expected exit code, expected message or None,
# extra CLI arguments, environment). Message: the exact "error: ..." text (refusals) or a line
# the run prints with its result (accepted inputs).


def k_2d_image(d):
    p = d / "slice2d.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(abdomen()[20]), str(p))
    return p, 2, ("slice2d: has only 1 voxel(s) along one axis (size 64 x 64 x 1 voxels); LiverLesionAI needs a "
                  "3D CT series with at least 3 slices covering the liver. Load the whole CT series, not a "
                  "single slice.")


def k_4d_series(d):
    p = d / "timeseries.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(abdomen())] * 3), str(p))
    return p, 2, f"{p}: is a 4D image of size (64, 64, 40, 3); a CT volume is 3D."


def k_multicomponent(d):
    p = d / "vector.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([abdomen()] * 2, -1), isVector=True), str(p))
    return p, 2, f"{p}: has 2 values per voxel (a colour or vector image); a CT has one value per voxel."


def k_rgb(d):
    p = d / "colour.mha"
    rgb = np.stack([np.clip(abdomen() + 1000, 0, 255).astype(np.uint8)] * 3, -1)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(p))
    return p, 2, f"{p}: has 3 values per voxel (a colour or vector image); a CT has one value per voxel."


def k_mr_like(d):
    mr = np.clip(abdomen().astype(np.float32) + 1000, 0, None) * 1.3  # 0..1430, no air value
    return save(d / "t1_mr.nii.gz", mr), 2, (
        "t1_mr: voxel values 0..1430 with no air near -1000 HU: this looks like raw CT stored values without "
        "rescale slope/intercept, or an MR image, not a CT in Hounsfield units. Load the CT in HU (DICOM rescale "
        f"applied), or {FORCE}")


def k_mr_negative(d):
    mr = abdomen().astype(np.float32) / 100 * 3  # -30..3: normalised intensities, still no air
    return save(d / "normalised.nii.gz", mr), 2, (
        "normalised: voxel values -30..3 with no air near -1000 HU: this looks like an MR, PET or processed image, "
        f"not a CT in Hounsfield units. Load the CT in HU (DICOM rescale applied), or {FORCE}")


def k_raw_stored(d):
    raw = (abdomen().astype(np.int32) + 1024).astype(np.uint16)
    raw[0, 0, 0] = 4095  # a metal speck: the full 12-bit stored range
    return save(d / "raw_stored.nrrd", raw), 2, (
        "raw_stored: voxel values 24..4095 with no air near -1000 HU: this looks like raw CT stored values without "
        "rescale slope/intercept, or an MR image, not a CT in Hounsfield units. Load the CT in HU (DICOM rescale "
        f"applied), or {FORCE}")


def k_mr_forced(d):
    mr = np.clip(abdomen().astype(np.float32) + 1000, 0, None) * 1.3
    return save(d / "forced_mr.nii.gz", mr), 0, (
        "Run forced although voxel values 0..1430 with no air near -1000 HU: this looks like raw CT stored values "
        "without rescale slope/intercept, or an MR image, not a CT in Hounsfield units; results may be wrong."), ["--force"]


def k_nan(d):
    v = abdomen(dtype=np.float32)
    v[5, 10, 10:13] = np.nan
    return save(d / "with_nan.nrrd", v), 2, (
        "with_nan: 3 voxel(s) are NaN or infinite (not a number); the CT file is damaged. Re-export the CT from the "
        "scanner or PACS.")


def k_inf(d):
    v = abdomen(dtype=np.float32)
    v[7, 20, 20] = np.inf
    v[8, 20, 20] = -np.inf
    return save(d / "with_inf.nrrd", v), 2, (
        "with_inf: 2 voxel(s) are NaN or infinite (not a number); the CT file is damaged. Re-export the CT from the "
        "scanner or PACS.")


def k_constant(d):
    return save(d / "constant.nii.gz", np.full(SHAPE, -1024, np.int16)), 2, (
        "constant: every voxel has the same value (-1024): the volume holds no image. Check that the right file "
        "was loaded.")


def k_zero_size(d):
    p = d / "empty.nrrd"
    p.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 64 64 0\nspacings: 5 5 5\nencoding: raw\n\n")
    return p, 2, (f"{p}: cannot be read; the file is damaged, truncated or not an image ([nrrd] _nrrdSizeCheck: "
                  "axis 2 size is zero!).")


def k_one_slice(d):
    return save(d / "one_slice.nii.gz", abdomen()[:1]), 2, (
        "one_slice: has only 1 voxel(s) along one axis (size 64 x 64 x 1 voxels); LiverLesionAI needs a 3D CT "
        "series with at least 3 slices covering the liver. Load the whole CT series, not a single slice.")


def k_short_coverage(d):
    return save(d / "three_slices.nii.gz", abdomen()[:3]), 2, (
        "three_slices: the volume covers only 15 mm head-to-feet (at least 30 mm needed). Load the CT series "
        f"covering the liver, or {FORCE}")


def k_tiny_spacing(d):
    return save(d / "spacing_0p1.nii.gz", abdomen(), axial_matrix((0.1, 0.1, 0.1), (2, 2, 0))), 2, (
        "spacing_0p1: voxel size 0.1 x 0.1 x 0.1 mm is finer than any abdominal CT (0.5-1 mm in-plane): the file "
        "header's voxel size is probably wrong (cm instead of mm?). Fix the voxel size, or " + FORCE)


def k_small_fov(d):
    return save(d / "liver_crop.nii.gz", abdomen()[:, 20:39, 20:39]), 2, (
        "liver_crop: the field of view is only 95 x 95 mm (right-left x front-back), too small for an abdomen (a "
        "liver is about 150 mm across; at least 100 mm needed). Load the full-field abdominal CT, not a crop, or "
        + FORCE)


def k_thick_slices(d):
    return save(d / "thick_10mm.nii.gz", abdomen()[::2], axial_matrix((5, 5, 10))), 0, (
        "Voxels are 5 x 5 x 10 mm: with slices thicker than 5 mm, lesions smaller than about twice the slice "
        "thickness may be missed and measurements are approximate.")


def k_memory_budget(d):
    return save(d / "big.nii.gz", abdomen()), 2, (
        "big: too large to process: 163,840 voxels (64 x 64 x 40) need about 0.00295 GB of memory, above the limit "
        "of 0.001 GB. Crop the CT to the abdomen or resample it to larger voxels (e.g. 1 mm), or raise the limit "
        "with LIVERLESIONAI_MEMORY_LIMIT_GB."), [], {"LIVERLESIONAI_MEMORY_LIMIT_GB": "0.001"}


def k_left_handed(d):
    m = axial_matrix()
    m[:3, 0] *= -1  # i toward patient right: a mirrored (left-handed) voxel grid
    m[0, 3] = -160
    return save(d / "left_handed.nrrd", abdomen(), m), 0, None


def k_oblique(d):
    m = axial_matrix()
    m[:3, :3] = rotation(0, 17) @ rotation(2, 11) @ m[:3, :3]
    return save(d / "oblique.nii.gz", abdomen(), m), 0, None


def k_sagittal(d):
    # slices are sagittal: k runs right-left, the images are A-S planes
    m = np.eye(4)
    m[:3, :3] = np.array([[0, 0, -5.0], [-5.0, 0, 0], [0, -5.0, 0]])
    m[:3, 3] = (160, 160, 100)
    vol = np.ascontiguousarray(np.transpose(abdomen(), (2, 0, 1)))  # [i(R), k(S), j(A)] -> sagittal stack
    return save(d / "sagittal.nii.gz", vol, m), 0, None


def k_truncated_nifti(d):
    p = save(d / "truncated.nii.gz", abdomen())
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    return p, 2, f"{p}: the file is truncated ({len(raw) // 2} of {len(raw)} bytes); it cannot be used."


def k_corrupt_nrrd(d):
    p = d / "corrupt.nrrd"
    p.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 48 48 40\nencoding: gzip\n\n" + os.urandom(2000))
    return p, 2, None  # ITK's reason varies; the message must name the file and say it is damaged


def k_two_dicom_series(d):
    from test_volume_io import write_ct_series

    folder = d / "two_series"
    hu = abdomen()[:4]
    row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    uid_a = write_ct_series(folder, hu, row, col, (-160, -160, -100), (5, 5), 5.0, 1.0, -1024.0, "arterial")
    uid_b = write_ct_series(folder, hu[:3], row, col, (-160, -160, -100), (5, 5), 5.0, 1.0, -1024.0, "venous")
    lines = sorted([f"  {uid_a}  'arterial'  4 slices", f"  {uid_b}  'venous'  3 slices"],
                   key=lambda line: sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)).index(line.split()[0]))
    return folder, 2, (f"{folder}: the folder holds 2 DICOM series; choose one by its series UID:\n"
                       + "\n".join(lines))


def k_missing_file(d):
    p = d / "no_such_ct.nii.gz"
    return p, 2, f"{p} does not exist."


def k_unsupported_type(d):
    p = d / "screenshot.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n")
    return p, 2, (f"{p}: unsupported file type '.png'. Use NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage "
                  "(.mha, .mhd) or a folder with a DICOM series.")


KINDS = {name[2:]: fn for name, fn in list(globals().items()) if name.startswith("k_")}


def run_cli(argv, env=None):
    """cli.main in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def case_outputs(name):
    return sorted(f"{name}{suffix}" for suffix in cli.CASE_OUTPUTS)


def unpack(built):
    path, code, message, *rest = built
    args = rest[0] if rest else []
    env = rest[1] if len(rest) > 1 else {}
    return path, code, message, args, env


def test_corpus_has_at_least_20_kinds():
    assert len(KINDS) >= 20, sorted(KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cli(kind, tmp_path, tiny_model_dir):
    src = tmp_path / "in"
    src.mkdir()
    path, code, message, args, env = unpack(KINDS[kind](src))
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(["segment", str(path), "-o", str(out), "--model", str(tiny_model_dir),
                                  "--device", "cpu", "--threads", "1", "--progress-json", *args], env)
    assert rc == code, stderr
    if code:
        assert listing(out) == [], "a refused input must leave nothing in the output folder"
        error = stderr.strip().splitlines()
        assert error[0].startswith("error: ")
        text = "\n".join(error)[len("error: "):]
        if message is None:  # the reader's words: must name the file and say it cannot be used
            assert text.startswith(f"{path}: ") and ("damaged" in text or "cannot be read" in text), text
        else:
            assert text == message
        return
    name = cli.case_name(path)
    assert listing(out) == case_outputs(name), "all four outputs, no temp file"
    summary = json.loads((out / f"{name}.lesions.json").read_text())
    seg = read_seg_nrrd(out / f"{name}.seg.nrrd")
    ct = read_ct(path)
    np.testing.assert_allclose(seg.ijk_to_ras, ct.ijk_to_ras, atol=1e-4)  # results in the input's own grid
    assert seg.liver_mask.shape == ct.voxels.shape
    assert len(seg.lesions) == len(summary["lesions"])
    if message is not None:
        assert f"  {message}" in stderr.splitlines(), stderr  # --progress-json: the summary goes to stderr


# ------------------------------------------------------------------------ Qt-free Slicer layer
@pytest.fixture(scope="module")
def scene():
    pytest.importorskip("slicer")  # slicer-core wheel: part of the test requirements
    return mrml.create_standalone_scene()


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    return LiverLesionEngine(tiny_model_dir, device="cpu")


FILE_ONLY = {"4d_series", "multicomponent", "rgb", "zero_size", "truncated_nifti", "corrupt_nrrd",
             "two_dicom_series", "missing_file", "unsupported_type"}  # refused by the file reader


@pytest.mark.parametrize("kind", sorted(set(KINDS) - FILE_ONLY))
def test_slicer_layer(kind, tmp_path, scene, tiny_engine, monkeypatch):
    """The same volume as a volume node: ct_from_volume_node -> engine -> the same message."""
    path, code, message, args, env = unpack(KINDS[kind](tmp_path))
    ct = read_ct(path)  # the file reader would already refuse some kinds (memory budget): test the layer
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    node = mrml.volume_node_from_ct(scene, ct, name=ct.name)
    try:
        node_ct = mrml.ct_from_volume_node(node)
        np.testing.assert_array_equal(node_ct.voxels, ct.voxels)
        if code:
            with pytest.raises(InputError) as caught:
                tiny_engine.segment(node_ct, force="--force" in args)
            assert str(caught.value) == message
            return
        result = tiny_engine.segment(node_ct, force="--force" in args)
        if message is not None:
            assert message in result.messages
        seg_node = mrml.add_result_to_scene(scene, node, result)
        assert seg_node.GetSegmentation().GetNumberOfSegments() == len(result.lesions) + 1
        scene.RemoveNode(seg_node)
    finally:
        scene.RemoveNode(node)


def test_slicer_layer_refuses_colour_volume(scene):
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour")
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 8)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    node.SetAndObserveImageData(image)
    with pytest.raises(InputError) as caught:
        mrml.ct_from_volume_node(node)
    assert str(caught.value) == ("The volume has several components per voxel (colour or vector image); "
                                 "a CT is needed.")
    scene.RemoveNode(node)


# ------------------------------------------------------------------------------- more cases


def test_memory_budget_refused_before_touching_voxels():
    """A 2000 x 2048 x 2048 volume (8.4e9 voxels, never allocated) is refused with the numbers."""
    voxels = np.broadcast_to(np.int16(0), (2000, 2048, 2048))
    ct = CTVolume(voxels, axial_matrix((0.2, 0.2, 0.2)), name="huge")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(validation.MEMORY_LIMIT_ENV, "64")
        with pytest.raises(InputError) as caught:
            validation.validate_ct(ct)
    assert str(caught.value) == (
        "huge: too large to process: 8,388,608,000 voxels (2048 x 2048 x 2000) need about 151 GB of memory, "
        "above the limit of 64 GB. Crop the CT to the abdomen or resample it to larger voxels (e.g. 1 mm), or "
        "raise the limit with LIVERLESIONAI_MEMORY_LIMIT_GB.")


def test_default_memory_limit_is_half_the_ram():
    import psutil

    assert validation.memory_limit_bytes() == pytest.approx(0.5 * psutil.virtual_memory().total)


def test_nan_in_nifti_is_not_silently_zeroed(tmp_path):
    """ITK's NIfTI reader turns NaN/Inf voxels into 0 (water) without a word: a silently wrong CT."""
    v = abdomen(dtype=np.float32)
    v[5, 10, 10:13] = np.nan
    ct = read_ct(save(tmp_path / "with_nan.nii.gz", v))
    if np.isfinite(ct.voxels).all():
        pytest.xfail("volume_io.read_ct: NaN in a NIfTI file is read as 0 (fix requested from volume_io's owner)")
    with pytest.raises(InputError, match="^with_nan: 3 voxel"):
        validation.validate_ct(ct)


@pytest.mark.parametrize("shape, message", [
    ((48, 48), "vol: is a single 2D image (48 x 48 pixels), not a CT volume. Load the whole CT series (a 3D volume)."),
    ((4, 8, 8, 3), "vol: is a colour (RGB) image with 3 values per voxel; a CT has one value per voxel. Load the "
                   "original greyscale CT, not a screenshot or rendering."),
    ((2, 4, 8, 8), "vol: is a 4D array of shape (2, 4, 8, 8) (a time series or multi-component image); a CT volume "
                   "is 3D with one value per voxel. Load a single 3D CT series."),
    ((0, 48, 48), "vol: the volume is empty (size 48 x 48 x 0 voxels)."),
])
def test_arrays_that_are_not_3d_volumes(shape, message):
    ct = CTVolume(np.zeros(shape, np.int16), axial_matrix(), name="vol")
    with pytest.raises(InputError) as caught:
        validation.validate_ct(ct)
    assert str(caught.value) == message


def test_degenerate_geometry_refused():
    m = axial_matrix()
    m[2, 2] = 0.0
    with pytest.raises(InputError, match="^vol: the volume geometry .* is degenerate"):
        validation.validate_ct(CTVolume(abdomen(), m, name="vol"))


def test_real_ct_passes_without_warnings():
    case = Path(__file__).resolve().parents[1].parent / "shared/data/ircadb-01/case_01/image.nii.gz"
    if not case.exists():
        pytest.skip("real CT not available")
    assert validation.validate_ct(read_ct(case)) == []


def test_output_folder_not_writable(tmp_path, tiny_model_dir):
    path = save(tmp_path / "ct.nii.gz", abdomen())
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: make the folder immutable instead
        if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode:
            pytest.skip("cannot make a folder read-only for root here")
    else:
        locked.chmod(0o555)
    try:
        rc, _, stderr = run_cli(["segment", str(path), "-o", str(locked), "--model", str(tiny_model_dir),
                                 "--device", "cpu"])
        assert listing(locked) == []
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        locked.chmod(0o755)
    assert rc == cli.EXIT_OUTPUT
    assert stderr.strip() == f"error: The output folder {locked} is not writable."


def test_output_folder_below_a_file(tmp_path, tiny_model_dir):
    path = save(tmp_path / "ct.nii.gz", abdomen())
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    rc, _, stderr = run_cli(["segment", str(path), "-o", str(blocker / "run1"), "--model", str(tiny_model_dir)])
    assert rc == cli.EXIT_OUTPUT
    assert stderr.strip() == f"error: Cannot create the output folder {blocker / 'run1'}: Not a directory."
    assert blocker.read_text() == "a file, not a folder"


def test_existing_results_never_overwritten(tmp_path, tiny_model_dir):
    path = save(tmp_path / "liver_ct.nii.gz", abdomen())
    out = tmp_path / "out"
    out.mkdir()
    (out / "liver_ct.lesions.csv").write_text("user's file")
    rc, _, stderr = run_cli(["segment", str(path), "-o", str(out), "--model", str(tiny_model_dir), "--device", "cpu",
                             "--progress-json"])
    assert rc == cli.EXIT_OUTPUT
    assert stderr.strip() == (f"error: {out} already holds liver_ct.lesions.csv; choose another output folder "
                              "(LiverLesionAI never overwrites results).")
    assert listing(out) == ["liver_ct.lesions.csv"] and (out / "liver_ct.lesions.csv").read_text() == "user's file"


def test_one_bad_input_among_several(tmp_path, tiny_model_dir):
    good = save(tmp_path / "good.nii.gz", abdomen())
    bad = save(tmp_path / "flat.nii.gz", np.full(SHAPE, 5, np.int16))
    out = tmp_path / "out"
    rc, _, stderr = run_cli(["segment", str(bad), str(good), "-o", str(out), "--model", str(tiny_model_dir),
                             "--device", "cpu", "--progress-json"])
    assert rc == cli.EXIT_INPUT
    assert ("error: flat: every voxel has the same value (5): the volume holds no image. Check that the right file "
            "was loaded.") in stderr.splitlines()
    assert listing(out) == case_outputs("good")


# ------------------------------------------------------------- no liver / liver full of lesions


def test_no_liver(tmp_path, no_liver_model_dir):
    path = save(tmp_path / "pelvis.nii.gz", abdomen())
    out = tmp_path / "out"
    rc, _, stderr = run_cli(["segment", str(path), "-o", str(out), "--model", str(no_liver_model_dir),
                             "--device", "cpu", "--progress-json"])
    assert rc == 0
    assert "  No liver found in this CT (is the upper abdomen in the field of view?)." in stderr.splitlines()
    assert listing(out) == case_outputs("pelvis")
    summary = json.loads((out / "pelvis.lesions.json").read_text())
    assert summary["lesions"] == [] and "No liver found" in " ".join(summary.get("messages", ["No liver found"]))
    assert not read_seg_nrrd(out / "pelvis.seg.nrrd").liver_mask.any()


def test_liver_full_of_lesions(tmp_path, all_lesion_model_dir):
    """Stage 2 sees lesion everywhere: the run completes, files agree with each other."""
    # 2.5 mm voxels: a 2.6 L scan, so "everything is liver" stays a plausible liver volume (< 5 L)
    path = save(tmp_path / "full.nii.gz", abdomen(), axial_matrix((2.5, 2.5, 2.5), (80.0, 80.0, -50.0)))
    out = tmp_path / "out"
    rc, _, stderr = run_cli(["segment", str(path), "-o", str(out), "--model", str(all_lesion_model_dir),
                             "--device", "cpu", "--progress-json"])
    assert rc == 0, stderr
    assert listing(out) == case_outputs("full")
    seg = read_seg_nrrd(out / "full.seg.nrrd")
    rows = (out / "full.lesions.csv").read_text().strip().splitlines()
    summary = json.loads((out / "full.lesions.json").read_text())
    assert len(seg.lesions) >= 1
    assert len(seg.lesions) == len(summary["lesions"]) == len(rows) - 1
    assert set(np.unique(seg.lesion_instances)) - {0} == {r.lesion_id for r in seg.lesions}


def test_many_lesions_written_consistently(tmp_path):
    """80 separate lesions in one result: all four outputs hold all of them."""
    from liverlesionai.lesions import build_lesion_records
    from liverlesionai.records import LESION_TYPES, SegmentationResult

    hu = abdomen()
    inst = np.zeros(SHAPE, np.uint16)
    n = 0
    for k in range(2, 38, 4):
        for j in range(10, 38, 4):
            for i in range(10, 38, 4):
                if n < 80:
                    n += 1
                    inst[k:k + 2, j:j + 2, i:i + 2] = n
    probs = {i: dict(zip(LESION_TYPES, (0.2, 0.3, 0.5))) for i in range(1, n + 1)}
    records = build_lesion_records(hu, inst, axial_matrix(), probs)
    result = SegmentationResult((inst == 0).astype(np.uint8), inst, records, axial_matrix(), 1000.0, [], "test")
    ct = CTVolume(hu, axial_matrix(), "many")
    files = cli.write_case_outputs(tmp_path, "many", ct, result)
    assert listing(tmp_path) == case_outputs("many") and len(files) == 4
    seg = read_seg_nrrd(tmp_path / "many.seg.nrrd")
    assert len(seg.lesions) == n == 80
    np.testing.assert_array_equal(seg.lesion_instances, inst)
    assert len((tmp_path / "many.lesions.csv").read_text().strip().splitlines()) == n + 1


def test_shipped_model_finds_no_liver_in_water_cylinder(tmp_path, shipped_model_dir):
    k, j, i = np.indices((60, 128, 128))
    water = np.where(np.hypot(j - 63.5, i - 63.5) < 55, 0, -1000).astype(np.int16)
    path = save(tmp_path / "water.nii.gz", water, axial_matrix((3.0, 3.0, 5.0)))
    out = tmp_path / "out"
    rc, _, stderr = run_cli(["segment", str(path), "-o", str(out), "--model", str(shipped_model_dir),
                             "--device", "cpu", "--threads", "1", "--progress-json"])
    assert rc == 0, stderr
    assert any(line.startswith("  No liver found in this CT (") for line in stderr.splitlines()), stderr
    assert listing(out) == case_outputs("water")


# ------------------------------------------------------------------------------ GPU out of memory


@pytest.mark.parametrize("failures, note", [
    (2, "CPU out of memory: retried with 4 slice(s) per batch instead of 16."),
    (5, "CPU out of memory even with 1 slice per batch: finished on the CPU (slower)."),
])
def test_out_of_memory_retries_smaller_batches_then_cpu(tiny_engine, monkeypatch, failures, note):
    """LIVERLESIONAI_TEST_FAKE_OOM=N: the first N forward passes raise torch.cuda.OutOfMemoryError."""
    ct = CTVolume(abdomen(), axial_matrix(), "ct")
    reference = tiny_engine.segment(ct)
    monkeypatch.setattr(engine_module, "_fake_oom_raised", 0)
    monkeypatch.setenv("LIVERLESIONAI_TEST_FAKE_OOM", str(failures))
    result = tiny_engine.segment(ct)
    assert engine_module._fake_oom_raised == failures
    assert note in result.messages
    np.testing.assert_array_equal(result.liver_mask, reference.liver_mask)  # nothing partial or skipped
    np.testing.assert_array_equal(result.lesion_instances, reference.lesion_instances)


def test_out_of_memory_on_cpu_after_fallback_is_a_clear_error(tiny_engine, monkeypatch):
    from liverlesionai.errors import LiverLesionAIError

    monkeypatch.setattr(engine_module, "_fake_oom_raised", 0)
    monkeypatch.setenv("LIVERLESIONAI_TEST_FAKE_OOM", "100")
    with pytest.raises(LiverLesionAIError, match="^Out of memory even with 1 slice per batch on the CPU"):
        tiny_engine.segment(CTVolume(abdomen(), axial_matrix(), "ct"))
