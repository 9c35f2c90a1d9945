"""What `cxr adapt --finetune` takes from its inputs before any work: the site's name beside the
source run's operating point, and the source run's training images that batch norm is re-estimated
on after weights are mixed (WiSE-FT, a soup), with --replay 0 too."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr.cli import main
from cxr.adaptation.settings import AdaptSettings
from cxr.config import FinetuneSpec

from .helpers import make_run_dir, make_tiny_data, write_png

SIZE = 32


def _run_dir(root, data) -> Path:
    """A run folder as `cxr train` leaves it (random weights, an operating point chosen on validation)."""
    return make_run_dir(root / "runs" / "scratch", threshold=0.5, rule="youden", temperature=1.0,
                        data=data.resolve())


def _site(root, n: int = 12):
    for i in range(n):
        write_png(root / "NORMAL" / f"IM-{i:04d}-0001.png", 300 + i)
        write_png(root / "PNEUMONIA" / f"person{i}_bacteria_{i}.png", 400 + i)
    return root


def test_a_site_folder_named_source_is_refused_before_any_work(tmp_path, capsys):
    """The fine-tuned model keeps one operating point per site, the source run's under "source": a
    site folder of that name took its key (only --site-name source was refused)."""
    run = _run_dir(tmp_path, make_tiny_data(tmp_path / "data"))
    out = tmp_path / "adapted"
    assert main(["adapt", str(run), "--data", str(_site(tmp_path / "source")), "--out", str(out), "--finetune",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "named 'source'" in err and "--site-name" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("replay", [0.0, 0.5])
def test_a_wise_fine_tune_gets_the_source_runs_training_images_with_or_without_replay(tmp_path, monkeypatch, replay):
    """--wise (or --soup): batch norm is re-estimated on both sites after mixing, so the source run's
    training images reach the fine-tune with --replay 0 as well (they were left out, and batch norm
    re-estimated on the site alone)."""
    import cxr.adaptation.adapt as adapt

    data = make_tiny_data(tmp_path / "data")
    run = _run_dir(tmp_path, data)
    seen = []

    class Stop(Exception):
        pass

    def stop(checkpoint, plan, images, y, device, seed, patients, context):
        seen.append(context)
        raise Stop

    monkeypatch.setattr(adapt, "adapt_model", stop)
    with pytest.raises(Stop):
        adapt.adapt_run(run, _site(tmp_path / "nih"), tmp_path / "adapted",
                        settings=AdaptSettings(device="cpu", workers=1, log=lambda _: None),
                        finetune=FinetuneSpec(replay=replay, wise=True))
    (context,) = seen
    assert context.replay is not None and len(context.replay[1]) > 0
    assert not (tmp_path / "adapted").exists()
