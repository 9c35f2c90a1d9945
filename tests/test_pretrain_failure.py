"""`cxr pretrain` failing mid-run: no partial output that would refuse the rerun."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr.cli import main
from cxr.commands.pretrain import OUTPUTS

from .helpers import write_png

pytest.importorskip("lightly")


def _pretrain(data: Path, out: Path, *extra: str) -> int:
    return main(["pretrain", "--data", str(data), "--out", str(out), "--image-size", "32", "--batch-size", "4",
                 "--no-cache", "--device", "cpu", "--workers", "1", "--threads", "1", *extra])


@pytest.fixture
def data(tmp_path) -> Path:
    for i in range(12):
        write_png(tmp_path / "d" / ("NORMAL" if i % 2 else "PNEUMONIA") / f"person{i}_bacteria_{i}.png", i)
    return tmp_path / "d"


def _fail_at(monkeypatch, epoch: int) -> None:
    """The views of every batch from `epoch` on raise, as a failure in the middle of training would."""
    from cxr.training import pretrain

    real, calls = pretrain.views, {"n": 0}
    per_epoch = 3  # 12 images in batches of 4

    def views(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > (epoch - 1) * per_epoch:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "views", views)


@pytest.mark.slow  # pretrains for a few seconds
def test_a_failure_before_the_first_epoch_leaves_nothing_and_the_rerun_goes(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fail_at(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="injected"):
        _pretrain(data, out, "--epochs", "1")
    assert not out.exists()  # images.csv and thumbnails.npy were written before training began
    kept = tmp_path / "kept"
    (kept / "notes.txt").parent.mkdir()
    (kept / "notes.txt").write_text("the user's own")
    with pytest.raises(RuntimeError, match="injected"):
        _pretrain(data, kept, "--epochs", "1")
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]  # a folder that was there stays, with its files
    monkeypatch.undo()
    assert _pretrain(data, out, "--epochs", "1") == 0  # no --overwrite needed
    assert (out / "backbone.pt").is_file()


@pytest.mark.slow  # pretrains for a few seconds
def test_a_failure_after_an_epoch_keeps_what_resume_needs(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fail_at(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="injected"):
        _pretrain(data, out, "--epochs", "2")
    assert {"pretrain_last.pt", "images.csv", "thumbnails.npy", "backbone.pt"} <= {p.name for p in out.iterdir()}
    monkeypatch.undo()
    assert _pretrain(data, out, "--epochs", "2", "--resume") == 0
    assert set(OUTPUTS) <= {p.name for p in out.iterdir()}
