"""Faults injected for real: killed and interrupted processes, bad images, duplicates, a full
disk, an unusable output folder, a reused run folder. Each ends cleanly and loses nothing."""

import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cxr.cli import main
from cxr.training.checkpoint import load_checkpoint

RUN = ["--tasks", "scratch", "--limit", 40, "--image-size", 64, "--batch-size", 8, "--epochs", 4,
       "--deterministic", "--workers", 2, "--n", 2]


def _default_sigint():
    # A child inherits an ignored SIGINT from shells that start background jobs (and some CI
    # runners); restore the default so the Ctrl-C test depends on the code, not on the launcher.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args, preexec_fn=None, **kwargs):
    def prepare():
        _default_sigint()
        if preexec_fn is not None:
            preexec_fn()

    return subprocess.Popen([sys.executable, "-m", "cxr", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=prepare, **kwargs)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def completed_epochs(run_dir):
    try:
        return len(rows(run_dir / "history.csv"))
    except (OSError, csv.Error):
        return 0


def wait_for_epochs(proc, run_dir, n, timeout=300):
    deadline = time.time() + timeout
    while completed_epochs(run_dir) < n:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "the run never reached the epoch to interrupt"
        time.sleep(0.02)


def without_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


@pytest.fixture(scope="module")
def uninterrupted(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "out"
    code, _, err = finish(start("run", "--data", shared_data, "--out", out, *RUN))
    assert code == 0, err[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_killed_run_resumes_to_the_same_result(shared_data, uninterrupted, tmp_path, how):
    out = tmp_path / "out"
    proc = start("run", "--data", shared_data, "--out", out, *RUN)
    wait_for_epochs(proc, out / "scratch", 1)
    time.sleep(0.3)  # into the next epoch
    proc.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGINT)
    code, _, err = finish(proc)
    if how == "SIGINT":
        assert code == 130 and "--resume" in err and "Traceback" not in err, err[-2000:]
    last = load_checkpoint(out / "scratch" / "last.pt")  # whatever moment it died, this loads
    assert 1 <= last["epoch"] < 4, "the kill came too late to test anything"
    assert not (out / "scratch" / "metrics.json").exists()
    code, stdout, err = finish(start("run", "--data", shared_data, "--out", out, *RUN, "--resume"))
    assert code == 0, err[-2000:]
    assert f"resuming after epoch {last['epoch']}" in stdout
    assert without_seconds(rows(out / "scratch" / "history.csv")) == \
        without_seconds(rows(uninterrupted / "scratch" / "history.csv"))
    assert rows(out / "scratch" / "predictions.csv") == rows(uninterrupted / "scratch" / "predictions.csv")
    assert not list((out / "scratch").glob(".*.tmp"))


# The child: cxr with torch.save replaced, for the second write of last.pt only, by one that writes
# half of the file, says so through a marker file and hangs, so the kill lands mid-write.
_HANG_IN_WRITE = """
import io, os, sys, time, torch
real, calls = torch.save, []
def half_then_hang(obj, f, *a, **k):
    if ".last.pt." in str(f):
        calls.append(f)
        if len(calls) == 2:
            buffer = io.BytesIO()
            real(obj, buffer, *a, **k)
            with open(f, "wb") as out:
                out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                out.flush()
                os.fsync(out.fileno())
            open(os.environ["CXR_TEST_MARKER"], "w").close()
            time.sleep(600)
    return real(obj, f, *a, **k)
torch.save = half_then_hang
from cxr.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_checkpoint_write_loses_nothing(shared_data, uninterrupted, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", _HANG_IN_WRITE, "run", "--data", str(shared_data), "--out", str(out),
                             *map(str, RUN)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CXR_TEST_MARKER": str(marker)}, preexec_fn=_default_sigint)
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "the second write of last.pt never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    run_dir = out / "scratch"
    half = list(run_dir.glob(".last.pt.*.tmp"))
    assert len(half) == 1  # the write that was killed: half a file, under a temporary name
    with pytest.raises(Exception):
        load_checkpoint(half[0].rename(run_dir / "half.pt"))
    (run_dir / "half.pt").rename(half[0])
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1  # the previous epoch's, whole
    code, stdout, err = finish(start("run", "--data", shared_data, "--out", out, *RUN, "--resume"))
    assert code == 0, err[-2000:]
    assert "resuming after epoch 1" in stdout
    assert without_seconds(rows(run_dir / "history.csv")) == without_seconds(rows(uninterrupted / "scratch" / "history.csv"))
    assert rows(run_dir / "predictions.csv") == rows(uninterrupted / "scratch" / "predictions.csv")
    assert not list(run_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_truncated_checkpoint_is_named_on_resume(uninterrupted, shared_data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    last = out / "scratch" / "last.pt"
    last.write_bytes(last.read_bytes()[:1_000_000])
    code, _, err = finish(start("run", "--data", shared_data, "--out", out, *RUN, "--resume"))
    assert code == 2 and str(last) in err and "truncated or corrupted" in err and "Traceback" not in err


@pytest.mark.slow
def test_reused_folder_needs_resume_with_the_same_settings_or_overwrite(uninterrupted, shared_data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    args = ["train", "--data", str(shared_data), "--out", str(out), "--task", "scratch", "--limit", "40",
            "--image-size", "64", "--batch-size", "8", "--epochs", "4"]
    assert main(args) == 2
    assert main(args + ["--resume", "--lr", "0.01"]) == 2
    assert main(args + ["--resume", "--image-size", "96"]) == 2
    before = (out / "scratch" / "history.csv").read_text()
    assert main(args + ["--resume"]) == 0  # complete already: nothing to train
    assert (out / "scratch" / "history.csv").read_text() == before
    assert main(args[:-1] + ["1", "--overwrite"]) == 0
    assert completed_epochs(out / "scratch") == 1


@pytest.fixture
def data_with_bad_images(tiny_data):
    bad = [tiny_data / "train" / "NORMAL" / "IM-0500-0001.jpeg", tiny_data / "train" / "PNEUMONIA" / "person500_virus_1.png"]
    bad[0].write_text("not a jpeg")
    bad[1].write_bytes(b"")
    return tiny_data, bad


def test_bad_images_stop_the_run_and_are_all_listed(data_with_bad_images, tmp_path, capsys):
    data, bad = data_with_bad_images
    bad.append(data / "test" / "NORMAL" / "IM-0600-0001.png")  # and one in another split: listed together
    bad[-1].write_text("not a png")
    code = main(["run", "--data", str(data), "--out", str(tmp_path / "out"), "--tasks", "scratch", "--image-size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and all(str(b) in err for b in bad) and "--skip-bad-images" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_skip_bad_images_goes_on_and_counts_them(data_with_bad_images, tmp_path, capsys):
    data, bad = data_with_bad_images
    code = main(["run", "--data", str(data), "--out", str(tmp_path / "out"), "--tasks", "scratch", "--image-size",
                 "32", "--epochs", "1", "--val-ratio", "0.25", "--skip-bad-images", "--n", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert all(f"skipped unreadable image: {b}" in out for b in bad)
    recorded = json.loads((tmp_path / "out" / "scratch" / "config.json").read_text())
    summary = recorded["data_summary"]
    counted = sum(int(line.split()[-1]) for line in summary.splitlines()[1:3])  # train + val totals
    assert counted == 16  # 8 + 8 readable train images, the 2 bad ones left out
    assert recorded["command"][:4] == ["cxr", "run", "--data", str(data)]  # main()'s argv, not pytest's


@pytest.mark.slow
def test_identical_files_in_two_splits_are_reported(tiny_data, tmp_path, capsys):
    leak = tiny_data / "test" / "NORMAL" / "IM-0777-0001.png"
    shutil.copy(tiny_data / "train" / "NORMAL" / "IM-0003-0001.png", leak)
    main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "a"), "--image-size", "32", "--epochs", "1"])
    assert "identical files" not in capsys.readouterr().out  # train alone: the test split is not looked at
    code = main(["run", "--data", str(tiny_data), "--out", str(tmp_path / "out"), "--tasks", "scratch",
                 "--image-size", "32", "--epochs", "1", "--n", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "warning: 1 identical files sit in two splits" in out and "IM-0777-0001.png" in out


def test_output_folder_that_cannot_be_made(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file, not a folder")
    code = main(["train", "--data", str(tiny_data), "--out", str(blocker / "out"), "--image-size", "32"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(blocker) in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_full_disk_keeps_earlier_artefacts(tiny_data, tmp_path):
    out = tmp_path / "out"

    def small_disk():  # a file may not grow past 100 MB: best.pt (45 MB) fits, last.pt (135 MB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000_000, 100_000_000))

    proc = start("train", "--data", tiny_data, "--out", out, "--image-size", "32", "--epochs", "2",
                 preexec_fn=small_disk)
    code, _, err = finish(proc)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert str(out / "scratch" / "last.pt") in err and "is the disk full?" in err
    best = load_checkpoint(out / "scratch" / "best.pt")
    assert best["epoch"] == 1
    assert not (out / "scratch" / "last.pt").exists()
    assert not list((out / "scratch").glob(".*.tmp")), "a half-written temporary file was left behind"
    assert os.path.getsize(out / "scratch" / "config.json") > 0
