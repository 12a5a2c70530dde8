"""kill -9 while `segment` writes a case's outputs (and `explain` its folder): afterwards all outputs or none, and
rerunning works.

A real child process runs the command line and is SIGKILLed at each step of ``cli.write_case_outputs``
(test hook ``model_io.crash_point``, LIVERLESIONAI_TEST_PAUSE_AT). Export, registry and model saving
have their own kill tests (test_export.py, test_registry.py, test_model_io.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from liverlesionai import cli
from liverlesionai.model_io import temp_sibling
from liverlesionai.volume_io import write_volume

STEPS = ["segment:writing", "segment:staged", "segment:linking", "segment:linked_2", "segment:linked_3",
         "segment:linked_4"]
OUTPUTS = sorted(f"case7{suffix}" for suffix in cli.CASE_OUTPUTS)


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
    k, j, i = np.indices((24, 64, 64))
    hu = np.where(np.hypot(j - 31.5, i - 31.5) < 27, 60, -1000).astype(np.int16)
    m = np.diag([-5.0, -5.0, 5.0, 1.0])
    return write_volume(tmp_path_factory.mktemp("in") / "case7.nii.gz", hu, m)


def segment_argv(ct_file, out, model):
    return ["segment", str(ct_file), "-o", str(out), "--model", str(model), "--device", "cpu", "--threads", "1",
            "--progress-json"]


def kill_at(step, argv, tmp_path):
    marker = tmp_path / "marker"
    env = dict(os.environ, LIVERLESIONAI_TEST_PAUSE_AT=step, LIVERLESIONAI_TEST_PAUSE_MARKER=str(marker),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "liverlesionai.cli", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert marker.exists(), proc.stderr.read().decode()
        assert marker.read_text().strip() == step
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)  # reaped: its pid is dead, so its staging folder counts as abandoned
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def run_cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, err.getvalue()


def visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_while_writing_outputs(step, ct_file, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    kill_at(step, segment_argv(ct_file, out, tiny_model_dir), tmp_path)
    linked = {"segment:linking": 1, "segment:linked_2": 2, "segment:linked_3": 3, "segment:linked_4": 4}.get(step, 0)
    # Right after the kill: the staged files are hidden; the outputs linked so far are visible.
    assert len(visible(out)) == linked
    assert len(hidden(out)) == 1  # the dead run's staging folder

    rerun_recovers = step in ("segment:linking", "segment:linked_3")
    if not rerun_recovers:  # recovery alone: all four outputs or none
        removed = cli.recover_interrupted_outputs(out)
        assert len(removed) == (linked if linked < 4 else 0)
        assert visible(out) == (OUTPUTS if linked == 4 else []) and hidden(out) == []

    rc, stderr = run_cli(segment_argv(ct_file, out, tiny_model_dir))
    assert hidden(out) == []  # no staging folder, no temp file
    if linked == 4:  # the dead run had finished its outputs: they are kept, never overwritten
        assert rc == cli.EXIT_OUTPUT
        assert "already holds" in stderr
    else:
        assert rc == 0, stderr
        removed = [line for line in stderr.splitlines() if "left incomplete by an interrupted run" in line]
        assert len(removed) == (linked if rerun_recovers else 0)
    assert visible(out) == OUTPUTS
    assert cli.recover_interrupted_outputs(out) == []


def test_recovery_keeps_user_files_and_live_runs(tmp_path):
    """Only links to a dead run's staged files are removed; a running writer's staging is left alone."""
    out = tmp_path / "out"
    out.mkdir()
    user_file = out / "case7.seg.nrrd"
    user_file.write_text("the user's own file")  # same name as a staged file, but not the same inode
    staging = temp_sibling(out / "case7")  # named with this (live) process's pid
    staging.mkdir()
    for name in OUTPUTS:
        (staging / name).write_text(name)
    os.link(staging / "case7.lesions.csv", out / "case7.lesions.csv")
    assert cli.recover_interrupted_outputs(out) == []  # writer alive: nothing touched
    assert staging.exists() and (out / "case7.lesions.csv").exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = staging.with_name(staging.name.replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-"))
    staging.rename(abandoned)
    assert cli.recover_interrupted_outputs(out) == [out / "case7.lesions.csv"]
    assert sorted(os.listdir(out)) == ["case7.seg.nrrd"]
    assert user_file.read_text() == "the user's own file"


@pytest.mark.parametrize("step", ["explain:writing", "explain:staged"])
def test_sigkill_while_writing_explanations(step, ct_file, tiny_model_dir, tmp_path):
    """`explain` stages its folder and renames it in place: a kill leaves nothing visible, and a rerun clears the
    dead run's staging folder and writes the whole folder."""
    k, j, i = np.indices((24, 64, 64))
    mask = write_volume(tmp_path / "lesion.nii.gz", ((k - 12) ** 2 + (j - 32) ** 2 + (i - 32) ** 2 < 9).astype(np.uint8),
                        np.diag([-5.0, -5.0, 5.0, 1.0]))
    out = tmp_path / "out"
    argv = ["explain", str(ct_file), "-o", str(out), "--lesion-mask", str(mask), "--lesion-type", "cyst",
            "--model", str(tiny_model_dir), "--device", "cpu", "--threads", "1", "--progress-json"]
    kill_at(step, argv, tmp_path)
    assert visible(out) == [] and len(hidden(out)) == 1

    rc, stderr = run_cli(argv)
    assert rc == 0, stderr
    assert hidden(out) == [] and visible(out) == ["case7.explanations"]
    assert sorted(p.name for p in (out / "case7.explanations").iterdir()) == [
        "explanations.json", "lesion_1.attribution.nrrd", "lesion_1.png"]


def _write_case_after(barrier, folder):
    from liverlesionai.datasets import write_phantom_case
    from liverlesionai.errors import OutputError

    barrier.wait()
    try:
        write_phantom_case(folder, 500_003, max_in_plane=128)
        return "written"
    except OutputError as error:
        return f"OutputError: {error}"
    except Exception as error:  # anything else is the bug this test guards against
        return f"{type(error).__name__}: {error}"


def test_two_processes_writing_one_phantom_case_leave_one_complete_case(tmp_path):
    """Processes writing the same validation phantoms (build_model's phantom sets, the benchmarks' writers) race:
    one case folder appears, complete, and the other writer gets the clear OutputError its caller skips, leaving
    no staging folder behind."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from liverlesionai.datasets import find_cases

    context = multiprocessing.get_context("spawn")
    barrier = context.Manager().Barrier(2)
    folder = tmp_path / "val" / "phantom_500003"
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        outcomes = sorted(pool.map(_write_case_after, [barrier, barrier], [folder, folder]))
    assert outcomes[1] == "written", outcomes
    assert outcomes[0].startswith("OutputError: ") and str(folder) in outcomes[0], outcomes
    assert [case.case_id for case in find_cases(tmp_path / "val")] == ["phantom_500003"]
    assert sorted(p.name for p in folder.iterdir()) == ["image.nii.gz", "label.nii.gz", "labels.json",
                                                        "lesion_instances.nii.gz"]
    assert [p.name for p in (tmp_path / "val").iterdir()] == ["phantom_500003"]
