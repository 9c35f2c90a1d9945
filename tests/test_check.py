"""`cxr check` (evaluation/check.py) and the statistics `cxr adapt` leaves in an adapted model."""

from __future__ import annotations

import json
import shutil

import pytest

from cxr.cli import main
from cxr.training.checkpoint import load_checkpoint, save_checkpoint

from .helpers import make_site, make_trusted_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_trusted_run(tmp_path_factory.mktemp("check") / "run")


def test_a_folder_with_too_few_images_is_refused_in_one_line(run, tmp_path, capsys):
    site = make_site(tmp_path / "few", per_class=1, labelled=False)
    assert main(["check", str(run / "best.pt"), str(site), "--device", "cpu", "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(site) in err and "at least 5" in err


def test_a_small_folder_is_checked_and_the_verdict_says_it_is_small(run, tmp_path, capsys):
    site = make_site(tmp_path / "ten", per_class=5, labelled=False)
    out = tmp_path / "check.json"
    assert main(["check", str(run / "best.pt"), str(site), "--device", "cpu", "--no-cache",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["n"] == 10 and not result["labelled"] and "truth" not in result
    assert {t["name"] for t in result["shift"]["tests"]} == {"outputs", "ood_score", "features"}
    assert "flagged as unlike the training images" in printed and result["verdict"] in printed
    if not result["shift"]["shifted"]:
        assert "fewer than 20" in result["shift"]["verdict"]


def test_labels_bring_the_true_accuracy_beside_the_estimate(run, tmp_path, capsys):
    site = make_site(tmp_path / "labelled", per_class=10)
    assert main(["check", str(run / "best.pt"), str(site), "--device", "cpu", "--no-cache"]) == 0
    printed = capsys.readouterr().out
    assert "true accuracy (labels present)" in printed


def test_a_checkpoint_without_statistics_is_refused_in_one_line(run, tmp_path, capsys):
    ck = load_checkpoint(run / "best.pt")
    del ck["trust"]
    save_checkpoint(tmp_path / "old.pt", ck)
    site = make_site(tmp_path / "s", per_class=5, labelled=False)
    assert main(["check", str(tmp_path / "old.pt"), str(site), "--device", "cpu", "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no out-of-distribution statistics" in err


def test_adapting_without_labels_checks_the_site_first_and_keeps_no_stale_statistics(run, tmp_path, capsys):
    """AdaBN changes the features: the source's statistics no longer describe the model, so none are
    kept (and said); the source model's check of the site's images is in the provenance."""
    site = make_site(tmp_path / "site", per_class=10, labelled=False)
    out = tmp_path / "adapted"
    assert main(["adapt", str(run), "--data", str(site), "--unlabeled", "--out", str(out), "--device", "cpu",
                 "--no-cache"]) == 0
    printed = capsys.readouterr().out
    assert "before adapting" in printed and "estimated accuracy" in printed
    ck = load_checkpoint(out / "best.pt")
    assert "trust" not in ck
    assert ck["adaptation"]["trust"].startswith("none") and "source_check" in ck["adaptation"]


def test_a_threshold_only_adaptation_keeps_the_source_statistics(run, tmp_path):
    site = make_site(tmp_path / "site", per_class=10)
    out = tmp_path / "thresholded"
    assert main(["adapt", str(run), "--data", str(site), "--out", str(out), "--device", "cpu", "--no-cache"]) == 0
    ck, src = load_checkpoint(out / "best.pt"), load_checkpoint(run / "best.pt")
    assert ck["trust"]["threshold"] == src["trust"]["threshold"]
    assert "did not change" in ck["adaptation"]["trust"]
    shutil.rmtree(out)
