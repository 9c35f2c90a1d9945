"""Training on several processes (torchrun, DistributedDataParallel, gloo on the CPU) computes what
one process computes with the same global batch.

Arithmetic first: `fit` itself on 2 gloo processes against 1, in float64 so that what is compared
is the arithmetic and not float32 rounding, which from-scratch training with Adam amplifies (one
process with 1 thread against 2 threads already differs by 1e-3 in the first epoch's loss at 64 px
on the bundled sample, `cxr train --task scratch --epochs 2 --image-size 64 --precision fp32`).
Then the command line under torchrun, in float32, where the problem is convex (fc on frozen
features), resume, and a killed rank.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cxr.config import make_config
from cxr.data.decode import decode_all
from cxr.data.folders import SAMPLE_ROOT
from cxr.training.checkpoint import load_checkpoint
from cxr.training.distributed import CpuSyncBatchNorm, Group, share
from cxr.training.engine import fit, seed_everything
from cxr.training.model import build_model

from .helpers import cxr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_images(n_train: int, n_val: int, size: int = 32):
    """Real radiographs from the bundled sample: (train images, labels), (val images, labels)."""
    paths = {c: sorted((SAMPLE_ROOT / "train" / c).iterdir()) for c in ("NORMAL", "PNEUMONIA")}
    chosen, labels = [], []
    for i in range(n_train + n_val):
        c = i % 2
        chosen.append(paths[("NORMAL", "PNEUMONIA")[c]][i // 2])
        labels.append(c)
    images, bad = decode_all(chosen, size, 2, "sample")
    assert not bad
    y = torch.tensor(labels)
    return (images[:n_train], y[:n_train]), (images[n_train:], y[n_train:])


CONFIGS = {
    # every layer trains: synchronised BatchNorm, augmentation drawn for the global batch, class
    # weights and label smoothing in the loss, a cosine schedule; 37 images in batches of 10 make
    # the last batch 7, shared 4 and 3
    "backbone": dict(task="scratch-robust", epochs=2, batch_size=10, image_size=32, lr=1e-3, seed=5,
                     class_weights="balanced", label_smoothing=0.1, augment="crop", schedule="cosine",
                     warmup_epochs=1, select_by="val_loss"),
    # the frozen backbone's features computed in shares and gathered, fc trained under DDP
    "frozen": dict(task="finetune", epochs=3, batch_size=10, image_size=32, lr=1e-2, seed=5,
                   class_weights="balanced"),
}


def train(rank: int, world: int, port: int, name: str, out: str) -> None:
    """One process's part: `fit` in float64 into OUT/rank<r>/ (rank 0 alone should write)."""
    if world > 1:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        kwargs = dict(CONFIGS[name])
        config = make_config(kwargs.pop("task"), **kwargs)
        (xt, yt), (xv, yv) = sample_images(37, 14)
        seed_everything(config.seed)
        model = build_model(None, config.train_backbone).double()
        run_dir = Path(out) / f"rank{rank}"
        run_dir.mkdir(parents=True)
        history = fit(model, config, xt, yt, xv, yv, run_dir, "cpu", log=lambda _: None,
                      group=Group(rank, world))
        (run_dir / "returned.json").write_text(json.dumps(history))
        assert all(type(m) is torch.nn.BatchNorm2d for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    finally:
        if world > 1:
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_gloo_processes_train_the_model_one_process_trains(tmp_path, name):
    train(0, 1, 0, name, str(tmp_path / "one"))
    mp.spawn(train, args=(2, free_port(), name, str(tmp_path / "two")), nprocs=2)
    one, two = tmp_path / "one" / "rank0", tmp_path / "two" / "rank0"
    # rank 0 alone wrote files; every rank returned the same history
    assert sorted(p.name for p in (tmp_path / "two" / "rank1").iterdir()) == ["returned.json"]
    h1 = json.loads((one / "returned.json").read_text())
    h2 = json.loads((two / "returned.json").read_text())
    h2_rank1 = json.loads((tmp_path / "two" / "rank1" / "returned.json").read_text())
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in h2_rank1] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in h2]
    assert len(h1) == len(h2) == CONFIGS[name]["epochs"]
    for a, b in zip(h1, h2):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), (a["epoch"], key)
    assert h1[0]["train_loss"] != h1[-1]["train_loss"]  # it learnt something
    for file in ("best.pt", "last.pt"):
        c1, c2 = load_checkpoint(one / file), load_checkpoint(two / file)
        assert c1["epoch"] == c2["epoch"]
        assert c1["model"].keys() == c2["model"].keys()  # plain BatchNorm keys, loadable anywhere
        for key in c1["model"]:
            torch.testing.assert_close(c2["model"][key], c1["model"][key], rtol=1e-6, atol=1e-9)
    s1, s2 = load_checkpoint(one / "last.pt")["optimizer"], load_checkpoint(two / "last.pt")["optimizer"]
    for k in s1["state"]:
        torch.testing.assert_close(s2["state"][k]["exp_avg_sq"], s1["state"][k]["exp_avg_sq"], rtol=1e-7, atol=1e-20)


def test_shares_cover_a_batch_in_order():
    for n in (0, 1, 7, 10, 32):
        for world in (1, 2, 3):
            parts = [share(n, Group(r, world)) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def test_cpu_sync_batchnorm_is_batchnorm_outside_a_process_group():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    plain, synced = torch.nn.BatchNorm2d(4), CpuSyncBatchNorm(4)
    x = torch.randn(6, 4, 5, 5)
    torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced.running_var, plain.running_var)


# ---- the command line under torchrun ----

def torchrun(*args, env=None, timeout=600):
    """`torchrun --standalone --nproc-per-node 2 -m cxr ARGS` (torch.distributed.run is torchrun)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "cxr", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


FP32 = ("--data", "sample", "--image-size", 32, "--precision", "fp32", "--device", "cpu", "--no-cache")


def history(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "history.csv") as f:
        return [{k: float(v) for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_torchrun_trains_the_frozen_task_as_one_process_does(tmp_path, weights_file):
    """fc on frozen features is convex, so float32 rounding stays small: 1e-5 end to end. The two
    processes read memory-mapped images that rank 0 decoded into a fresh cache."""
    args = ("train", "--task", "finetune", "--weights", weights_file, "--epochs", 3, *FP32)
    one = cxr(*args, "--out", tmp_path / "one")
    mapped = [a for a in args if a != "--no-cache"] + ["--mmap", "--cache-dir", tmp_path / "cache"]
    tracked = ["--track", "tensorboard"] if importlib.util.find_spec("tensorboard") else []  # torchrun takes --log
    two = torchrun(*mapped, *tracked, "--out", tmp_path / "two")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # train and val, memory-mapped from here
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("finetune epoch 1/3") == 1  # rank 0 alone prints
    assert "training done on 2 processes" in two.stdout
    h1, h2 = history(tmp_path / "one" / "finetune"), history(tmp_path / "two" / "finetune")
    assert len(h1) == len(h2) == 3
    for a, b in zip(h1, h2):
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    c1 = load_checkpoint(tmp_path / "one" / "finetune" / "best.pt")
    c2 = load_checkpoint(tmp_path / "two" / "finetune" / "best.pt")
    for key in ("fc.weight", "fc.bias"):
        torch.testing.assert_close(c2["model"][key], c1["model"][key], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "two" / "finetune" / "config.json").read_text())["processes"] == 2
    if tracked:  # rank 0 alone logs: one writer, each epoch once
        from tensorboard.backend.event_processing.event_accumulator import (
            EventAccumulator,
        )

        folder = tmp_path / "two" / "finetune" / "tensorboard"
        writers = {p.name.split(".")[-2] for p in folder.glob("events.out.tfevents.*")}  # ...<host>.<pid>.<n>
        assert len(writers) == 1  # one process wrote (the hparams summary is a second file of the same one)
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        assert [e.step for e in accumulator.Scalars("epoch/val_loss")] == [1, 2, 3]


def _rank_pid(marker: str, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"CXR_TEST_MARKER={marker}".encode() in env and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_cleanly_and_resume_equals_an_uninterrupted_run(tmp_path):
    args = ("train", "--task", "scratch-robust", "--epochs", 6, "--batch-size", 16, *FP32)
    whole = torchrun(*args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    run_dir = tmp_path / "killed" / "scratch-robust"
    marker = f"{os.getpid()}-{time.time()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cxr",
           *map(str, args), "--out", str(tmp_path / "killed")]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "CXR_TEST_MARKER": marker})
    deadline = time.time() + 300
    while not (run_dir / "last.pt").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    pid = _rank_pid(marker, 1)
    assert pid is not None and job.poll() is None, "the job ended before a rank could be killed"
    os.kill(pid, signal.SIGKILL)
    out, err = job.communicate(timeout=300)
    assert job.returncode != 0
    assert "cxr: error: rank 0: training stopped: lost another rank" in err, err[-3000:]
    assert "rerun the same torchrun command with --resume" in err
    assert not list(run_dir.glob(".*.tmp")), "a half-written file was left behind"
    last = load_checkpoint(run_dir / "last.pt")
    assert 1 <= last["epoch"] < 6
    assert len(history(run_dir)) >= last["epoch"]

    # resumed by `cxr run`, which goes on to evaluate and report on rank 0 alone
    resumed = torchrun("run", "--tasks", *args[2:], "--out", tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "killed" / "report.html").is_file()
    assert " s on 2 processes |" in (tmp_path / "killed" / "report.md").read_text()  # training time
    assert resumed.stdout.count("scratch-robust test: accuracy") == 1
    assert f"resuming after epoch {last['epoch']} " in resumed.stdout  # from the last.pt the kill left
    assert history(run_dir) == history(tmp_path / "whole" / "scratch-robust")
    a = load_checkpoint(run_dir / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "whole" / "scratch-robust" / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_commands_other_than_train_and_run_refuse_torchrun(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cxr", "predict", str(tmp_path / "best.pt"), str(tmp_path)],
                            capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "2", "RANK": "0"})
    assert result.returncode == 2
    assert result.stderr.strip() == ("cxr: error: cxr predict runs as one process: start it without torchrun "
                                     "(only cxr train and cxr run train on several processes)")


def _check_agreement(rank: int, world: int, port: int, out: str) -> None:
    from cxr.errors import CxrError
    from cxr.training.distributed import same_everywhere

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = Group(rank, world)
        same_everywhere(["fresh"], group, "the state of OUT")  # agreeing: nothing happens
        try:
            same_everywhere(3 if rank == 0 else 0, group, "the epoch to resume after")
            message = "no error"
        except CxrError as e:
            message = str(e)
        Path(out, f"rank{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_that_see_different_run_folders_stop_with_a_clear_message(tmp_path):
    """With several machines and an --out that is not shared, rank 0 would resume and the others
    start afresh: every rank must refuse instead."""
    mp.spawn(_check_agreement, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == (
            "the processes disagree on the epoch to resume after (rank 0: 3, rank 1: 0); with several machines, "
            "--data and --out must be on storage every machine sees at the same path")


def test_only_a_lost_rank_becomes_the_lost_rank_message():
    from cxr.errors import CxrError
    from cxr.training.distributed import Stopped, lost_rank_message

    two = Group(0, 2)
    gloo = RuntimeError("[/src/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:2473: Connection reset by "
                        "peer. This is typically caused by a remote worker hanging")
    with pytest.raises(CxrError) as e, lost_rank_message(two):
        raise gloo
    assert str(e.value) == ("rank 0: training stopped: lost another rank (Read error [127.0.0.1]:2473: Connection "
                            "reset by peer); every completed epoch is saved in last.pt: rerun the same torchrun "
                            "command with --resume")
    with pytest.raises(CxrError, match="stopped by torchrun"), lost_rank_message(two):
        raise Stopped("stopped by torchrun (SIGTERM), most likely because another rank failed")
    with pytest.raises(RuntimeError, match="^shape mismatch$"), lost_rank_message(two):
        raise RuntimeError("shape mismatch")  # a bug is not a lost rank
    with pytest.raises(RuntimeError, match="Connection reset"), lost_rank_message(Group()):
        raise gloo  # one process has no other rank to lose


def test_more_processes_than_gpus_is_refused_before_joining(monkeypatch):
    from cxr.errors import CxrError
    from cxr.training.distributed import init_from_env

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(CxrError, match=r"^rank 3: local rank 3 but only 2 CUDA devices here; start at most that many "
                                       r"processes per node \(--nproc-per-node\)$"):
        init_from_env(torch.device("cuda"))
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env(torch.device("cpu")) == (Group(), torch.device("cpu"))  # one process: nothing joined


def test_cpu_processes_get_their_share_of_the_cores(monkeypatch):
    from cxr.training.distributed import cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "cpu_count", lambda: 16)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets
        assert cpu_threads() == 8
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stays
        torch.set_num_threads(3)
        assert cpu_threads() == 3
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert cpu_threads() == 1  # more processes than cores: one each
    finally:
        torch.set_num_threads(before)
