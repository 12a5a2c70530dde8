"""Training-data export: round trip, revisions, no overwrite, de-identification, SIGKILL atomicity."""

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from liverlesionai.errors import InputError, OutputError
from liverlesionai.export import (
    LABELS, MANIFEST_FILE, export_case, export_case_from_files, load_dataset, manifest_sha256, read_manifest,
)
from liverlesionai.records import CTVolume, LesionRecord, SegmentationResult
from liverlesionai.segfile import write_seg_nrrd
from liverlesionai.volume_io import read_ct, write_volume

SHAPE = (12, 20, 24)  # k, j, i
GEOM = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])


def make_ct(seed=0):
    rng = np.random.default_rng(seed)
    return CTVolume(rng.integers(-100, 200, SHAPE).astype(np.int16), GEOM.copy(), name="CT")


def rec(lid, t, n, status="unreviewed", probs=None):
    probs = probs or {x: (0.8 if x == t else 0.1) for x in ("cyst", "hemangioma", "metastasis")}
    return LesionRecord(lid, t, probs, n, n * 0.0016, 5.0, 3.0, (1.0, 2.0, 3.0), 40.0, 10.0, (2, 5), status)


def make_segs():
    """Proposed: lesions 1 (cyst), 2 (metastasis), 3 (hemangioma). Review: 1 grown + retyped to
    hemangioma, 2 rejected, 3 deleted, new lesion 4 (metastasis) drawn."""
    liver = np.zeros(SHAPE, np.uint8)
    liver[2:10, 4:16, 4:20] = 1
    p_inst = np.zeros(SHAPE, np.uint16)
    p_inst[3:5, 5:8, 5:8] = 1      # 18 voxels
    p_inst[6:8, 10:12, 10:12] = 2  # 8
    p_inst[8, 13:15, 15:17] = 3    # 4
    proposed = SegmentationResult(liver * (p_inst == 0), p_inst,
                                  [rec(1, "cyst", 18), rec(2, "metastasis", 8), rec(3, "hemangioma", 4)],
                                  GEOM.copy(), model_version="shipped")
    r_inst = np.zeros(SHAPE, np.uint16)
    r_inst[3:5, 5:8, 5:9] = 1      # 24 voxels: +6
    r_inst[6:8, 10:12, 10:12] = 2
    r_inst[4, 12:14, 17:19] = 4    # 4 voxels, new
    rv_liver = liver.copy()
    rv_liver[9, 4:16, 4:20] = 0    # reviewer trimmed the liver's last slice
    reviewed = SegmentationResult(
        rv_liver * (r_inst == 0), r_inst,
        [rec(1, "hemangioma", 24, "confirmed", probs=proposed.lesions[0].probabilities),
         rec(2, "metastasis", 8, "rejected"), rec(4, "metastasis", 4, "confirmed")],
        GEOM.copy(), model_version="shipped")
    return proposed, reviewed


def dataset_files(d: Path):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_round_trip(tmp_path):
    ct = make_ct()
    proposed, reviewed = make_segs()
    info = export_case(tmp_path / "ds", ct, reviewed, proposed, "v0003")
    assert info.new_case and info.revision == 1 and info.folder.name == "r1"
    manifest = read_manifest(tmp_path / "ds")
    assert [c["case_id"] for c in manifest["cases"]] == [info.case_id]
    assert manifest["cases"][0]["revisions"][0]["files"] == info.files and len(info.files) == 4
    assert len(manifest_sha256(tmp_path / "ds")) == 64

    [case] = load_dataset(tmp_path / "ds")
    assert (case.case_id, case.revision) == (info.case_id, 1)
    img = case.load_image()
    assert np.array_equal(img.voxels, ct.voxels) and np.allclose(img.ijk_to_ras, GEOM, atol=1e-5)
    label = case.load_label()
    expect = np.zeros(SHAPE, np.uint8)
    expect[(reviewed.liver_mask != 0)] = 1
    expect[reviewed.lesion_instances == 1] = LABELS["hemangioma"]
    expect[reviewed.lesion_instances == 2] = LABELS["liver"]  # rejected -> liver
    expect[reviewed.lesion_instances == 4] = LABELS["metastasis"]
    assert np.array_equal(label, expect)
    assert sorted(np.unique(label).tolist()) == [0, 1, 3, 4]

    by_id = {d["lesion_id"]: d for d in case.lesions}
    assert by_id[1]["lesion_type"] == "hemangioma" and by_id[1]["type_before_review"] == "cyst"
    assert by_id[1]["probabilities_before_review"]["cyst"] == pytest.approx(0.8)
    assert by_id[2]["label"] is None and by_id[2]["review_status"] == "rejected"
    assert by_id[4]["volume_ml"] == pytest.approx(4 * 0.0016)

    prov = case.provenance
    assert prov["model_version"] == "v0003"
    ch = {c["lesion_id"]: c for c in prov["lesions"]}
    assert (ch[1]["voxels_added"], ch[1]["voxels_removed"], ch[1]["type_changed"]) == (6, 0, True)
    assert (ch[2]["voxels_added"], ch[2]["voxels_removed"], ch[2]["review_status"]) == (0, 0, "rejected")
    assert ch[4]["added_by_reviewer"] and ch[4]["proposed_lesion_id"] is None and ch[4]["voxels_added"] == 4
    assert prov["proposed_lesions_deleted"] == [{"proposed_lesion_id": 3, "type": "hemangioma", "voxels": 4}]
    assert prov["liver_voxels_removed"] == 12 * 16 - 4 + 4  # trimmed slice incl. deleted lesion 3 voxels
    # no temp leftovers anywhere
    assert not [p for p in (tmp_path / "ds").rglob("*") if ".tmp-" in p.name]


def test_reexport_adds_revision_never_overwrites(tmp_path):
    ds = tmp_path / "ds"
    proposed, reviewed = make_segs()
    a1 = export_case(ds, make_ct(0), reviewed, proposed, "shipped")
    before = dataset_files(ds)
    reviewed.lesions[2].lesion_type = "cyst"
    a2 = export_case(ds, make_ct(0), reviewed, proposed, "shipped")
    b1 = export_case(ds, make_ct(1), reviewed, None, "shipped")
    assert (a2.case_id, a2.revision, a2.new_case) == (a1.case_id, 2, False)
    assert b1.case_id != a1.case_id and b1.revision == 1
    after = dataset_files(ds)
    for name, data in before.items():
        if name != MANIFEST_FILE and not name.startswith("."):
            assert after[name] == data  # r1 untouched
    assert [(c.case_id, c.revision) for c in load_dataset(ds)] == [(a1.case_id, 2), (b1.case_id, 1)]
    assert len(load_dataset(ds, all_revisions=True)) == 3
    assert load_dataset(ds)[1].provenance["proposal_available"] is False


def test_cli_path_from_files(tmp_path):
    ct = make_ct()
    proposed, reviewed = make_segs()
    write_volume(tmp_path / "ct.nii.gz", ct.voxels, ct.ijk_to_ras)
    write_seg_nrrd(tmp_path / "reviewed.seg.nrrd", reviewed)
    write_seg_nrrd(tmp_path / "proposed.seg.nrrd", proposed)
    info = export_case_from_files(tmp_path / "ds", tmp_path / "ct.nii.gz", tmp_path / "reviewed.seg.nrrd",
                                  tmp_path / "proposed.seg.nrrd", model_version="v0001")
    [case] = load_dataset(tmp_path / "ds")
    assert case.case_id == info.case_id
    assert sorted(np.unique(case.load_label()).tolist()) == [0, 1, 3, 4]
    # the same study exported from the files is recognised as the study exported in memory
    assert export_case(tmp_path / "ds", ct, reviewed, proposed, "v0001").revision == 2


def test_bad_input_writes_nothing(tmp_path):
    proposed, reviewed = make_segs()
    bad = SegmentationResult(reviewed.liver_mask[:-1], reviewed.lesion_instances[:-1], reviewed.lesions, GEOM)
    with pytest.raises(InputError, match="does not match"):
        export_case(tmp_path / "ds", make_ct(), bad, None, "x")
    reviewed.lesions.pop()  # lesion 4 now has voxels but no record
    with pytest.raises(InputError, match=r"\[4\].*no lesion record"):
        export_case(tmp_path / "ds", make_ct(), reviewed, proposed, "x")
    assert not (tmp_path / "ds").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    _, reviewed = make_segs()
    with pytest.raises(OutputError, match="not empty"):
        export_case(tmp_path / "other", make_ct(), reviewed, None, "x")
    assert [p.name for p in (tmp_path / "other").iterdir() if not p.name.startswith(".")] == ["notes.txt"]


def test_damaged_manifest_and_files(tmp_path):
    ds = tmp_path / "ds"
    _, reviewed = make_segs()
    a = export_case(ds, make_ct(0), reviewed, None, "x")
    b = export_case(ds, make_ct(1), reviewed, None, "x")
    lbl = a.folder / "label.nii.gz"
    lbl.write_bytes(lbl.read_bytes()[:-10])
    with pytest.warns(UserWarning, match=f"{a.case_id}.*checksum"):
        cases = load_dataset(ds)
    assert [c.case_id for c in cases] == [b.case_id]
    with pytest.raises(InputError, match="checksum"):
        load_dataset(ds, strict=True)
    (b.folder / "lesions.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_dataset(ds) == []
    assert sorted(str(w.message).split(":")[-1].split()[-1] for w in caught) == ["edited)", "missing"]
    (ds / MANIFEST_FILE).write_text("{broken")
    with pytest.raises(InputError, match="damaged"):
        export_case(ds, make_ct(2), reviewed, None, "x")
    assert (ds / MANIFEST_FILE).read_text() == "{broken"


def _write_dicom_series(folder: Path, voxels: np.ndarray, phi: dict):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k, sl in enumerate(voxels):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = phi["PatientName"], phi["PatientID"]
        ds.PatientBirthDate, ds.StudyDate, ds.SeriesDate = phi["PatientBirthDate"], phi["StudyDate"], phi["StudyDate"]
        ds.InstitutionName, ds.AccessionNumber = phi["InstitutionName"], phi["AccessionNumber"]
        ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "CT", study, series, frame
        ds.SeriesDescription = "ABD " + phi["PatientName"]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-100.0, -120.0, 50.0 + 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 2.5
        ds.Rows, ds.Columns = sl.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = sl.astype("<i2").tobytes()
        ds.save_as(str(folder / f"{k:03d}.dcm"), enforce_file_format=True)


def test_dicom_identifiers_leave_no_trace(tmp_path):
    phi = {"PatientName": "Doe^Janet", "PatientID": "PID48151623", "PatientBirthDate": "19510307",
           "StudyDate": "20190412", "InstitutionName": "StMungoHospital", "AccessionNumber": "ACC7734219"}
    dicom_dir = tmp_path / "Doe^Janet_PID48151623"
    _write_dicom_series(dicom_dir, make_ct().voxels, phi)
    ct = read_ct(dicom_dir)
    assert ct.voxels.shape == SHAPE
    assert "PID48151623" in ct.name  # the volume's name carries the identifier ...
    _, reviewed = make_segs()
    reviewed.ijk_to_ras = ct.ijk_to_ras.copy()
    info = export_case(tmp_path / "ds", ct, reviewed, None, "shipped")
    export_case(tmp_path / "ds", ct, reviewed, None, "shipped")  # and a revision

    needles = [v.encode() for v in phi.values()] + [b"Janet", b"48151623", b"2019-04-12", b"1951-03-07",
                                                    b"Doe", b"Mungo"]
    blobs = []
    for p in (tmp_path / "ds").rglob("*"):
        blobs.append(p.name.encode())
        if p.is_file():
            data = p.read_bytes()
            blobs.append(data)
            if p.name.endswith(".gz"):
                blobs.append(gzip.decompress(data))
    assert len(blobs) > 10
    for needle in needles:  # ... which must not reach any file name or byte of the dataset
        assert not any(needle.lower() in b.lower() for b in blobs), needle
    assert info.case_id.startswith("c") and len(info.case_id) == 13


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from liverlesionai.export import export_case_from_files
    ds, inputs, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    ready.write_text("ready")
    export_case_from_files(ds, inputs / "ct.nii.gz", inputs / "reviewed.seg.nrrd", inputs / "proposed.seg.nrrd", "v7")
""")


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "inputs"
    d.mkdir()
    ct = make_ct()
    proposed, reviewed = make_segs()
    write_volume(d / "ct.nii.gz", ct.voxels, ct.ijk_to_ras)
    write_seg_nrrd(d / "reviewed.seg.nrrd", reviewed)
    write_seg_nrrd(d / "proposed.seg.nrrd", proposed)
    return d


def run_and_kill(args, env_extra, kill_when, timeout=60):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=dict(os.environ, **env_extra))
    try:
        deadline = time.time() + timeout
        while not kill_when() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        return proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()


def assert_consistent(ds: Path, inputs: Path, committed_before: int) -> int:
    """Manifest readable; every listed revision verifies; a rerun works and leaves no unlisted data."""
    n = 0
    if (ds / MANIFEST_FILE).exists():
        n = len(load_dataset(ds, all_revisions=True, strict=True))
    assert n in (committed_before, committed_before + 1)
    export_case_from_files(ds, inputs / "ct.nii.gz", inputs / "reviewed.seg.nrrd", None, "rerun")
    cases = load_dataset(ds, all_revisions=True, strict=True)
    assert len(cases) == n + 1 and len({c.case_id for c in cases}) == 1  # same study -> same case
    listed = {c.folder.relative_to(ds).as_posix() for c in cases}
    on_disk = {p.relative_to(ds).as_posix() for p in (ds / "cases").glob("*/*")}
    assert on_disk == listed, on_disk ^ listed
    assert not [p for p in ds.rglob("*") if ".tmp-" in p.name]
    return n + 1


@pytest.mark.parametrize("step", ["export:image", "write:lesions.json", "export:before_rename",
                                  "export:before_manifest", "write:dataset.json", "export:done"])
def test_sigkill_mid_export(tmp_path, inputs, step):
    ds, marker = tmp_path / "ds", tmp_path / "marker"
    export_case_from_files(ds, inputs / "ct.nii.gz", inputs / "reviewed.seg.nrrd", None, "first")  # r1 committed
    manifest_before = (ds / MANIFEST_FILE).read_bytes()
    rc = run_and_kill([str(ds), str(inputs), str(tmp_path / "ready")],
                      {"LIVERLESIONAI_TEST_PAUSE_AT": step, "LIVERLESIONAI_TEST_PAUSE_MARKER": str(marker)},
                      kill_when=marker.exists)
    assert rc == -signal.SIGKILL and marker.read_text().strip() == step
    if step != "export:done":
        assert (ds / MANIFEST_FILE).read_bytes() == manifest_before  # not committed
    assert assert_consistent(ds, inputs, committed_before=1) == (3 if step == "export:done" else 2)


@pytest.mark.parametrize("step", ["export:before_rename", "export:before_manifest"])
def test_sigkill_mid_first_export(tmp_path, inputs, step):
    ds, marker = tmp_path / "ds", tmp_path / "marker"
    rc = run_and_kill([str(ds), str(inputs), str(tmp_path / "ready")],
                      {"LIVERLESIONAI_TEST_PAUSE_AT": step, "LIVERLESIONAI_TEST_PAUSE_MARKER": str(marker)},
                      kill_when=marker.exists)
    assert rc == -signal.SIGKILL and not (ds / MANIFEST_FILE).exists()
    with pytest.raises(InputError, match="no dataset.json"):
        load_dataset(ds)
    assert assert_consistent(ds, inputs, committed_before=0) == 1


def test_sigkill_at_random_times(tmp_path, inputs):
    ds, rng, committed = tmp_path / "ds", random.Random(99), 0
    for i in range(3):
        ready, t_kill = tmp_path / f"ready{i}", []

        def kill_when():
            if not ready.exists():
                return False
            if not t_kill:
                t_kill.append(time.time() + rng.uniform(0.0, 0.4))
            return time.time() >= t_kill[0]

        run_and_kill([str(ds), str(inputs), str(ready)], {"LIVERLESIONAI_TEST_STEP_DELAY": "0.05"}, kill_when)
        committed = assert_consistent(ds, inputs, committed)
