"""Issue 4 end to end: three regimes on real images, operating point and temperature from
validation only, every metric with its bootstrap interval."""

import csv
import json

import numpy as np
import pytest
import torch

from cxr.cli import main
from cxr.evaluation.metrics import point_metrics, youden_threshold

from .helpers import cxr

TASKS = ("scratch", "finetune", "finetune-full")


@pytest.fixture(scope="module")
def regimes(shared_data, weights_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("regimes") / "out"
    result = cxr("run", "--data", shared_data, "--out", out, "--tasks", ",".join(TASKS), "--calibrate",
                 "--limit", 24, "--image-size", 64, "--epochs", 1, "--weights", weights_file)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def read_val(run_dir):
    with open(run_dir / "val_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    y = np.array([r["true_label"] == "PNEUMONIA" for r in rows], dtype=int)
    return y, np.array([float(r["prob_pneumonia"]) for r in rows])


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_threshold_comes_from_validation_predictions(regimes, task):
    run_dir = regimes / task
    y, p = read_val(run_dir)
    test_paths = {r["path"] for r in csv.DictReader(open(run_dir / "predictions.csv"))}
    val_paths = {r["path"] for r in csv.DictReader(open(run_dir / "val_predictions.csv"))}
    assert not test_paths & val_paths and all("/train/" in v for v in val_paths)
    chosen = youden_threshold(y, p)
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert checkpoint["threshold"] == pytest.approx(chosen)
    assert metrics["threshold"] == pytest.approx(chosen)
    assert metrics["operating_point"]["chosen_on"] == "validation"
    assert metrics["at_threshold"]["operating"]["threshold"] == pytest.approx(chosen)


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_temperature_does_not_raise_validation_nll(regimes, task):
    op = torch.load(regimes / task / "best.pt", weights_only=True)["operating_point"]
    assert op["val_nll_calibrated"] <= op["val_nll"] + 1e-12
    assert abs(op["temperature"] - 1.0) > 1e-3  # --calibrate fitted one (a 1-epoch model is miscalibrated)
    metrics = json.loads((regimes / task / "metrics.json").read_text())
    assert metrics["calibration"]["temperature"] == pytest.approx(op["temperature"])
    assert 0 <= metrics["calibration"]["ece"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_every_metric_has_an_interval_around_it(regimes, task):
    metrics = json.loads((regimes / task / "metrics.json").read_text())
    names = {"sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy", "roc_auc", "pr_auc"}
    for block in metrics["at_threshold"].values():
        assert names <= set(block)
        for name in names:
            cell = block[name]
            if cell["value"] is None:  # e.g. PPV when nothing is called positive
                continue
            lo, hi = cell["ci"]
            assert lo <= cell["value"] + 1e-12 and cell["value"] <= hi + 1e-12, (name, cell)
    at_op = metrics["at_threshold"]["operating"]
    assert at_op["sensitivity"]["value"] == pytest.approx(metrics["per_class"]["PNEUMONIA"]["accuracy"])
    assert at_op["specificity"]["value"] == pytest.approx(metrics["per_class"]["NORMAL"]["accuracy"])


@pytest.mark.slow
def test_report_shows_three_regimes(regimes):
    md = (regimes / "report.md").read_text()
    for task in TASKS:
        assert f"| {task} |" in md
        for name in ("pr.png", "calibration.png", "roc.png"):
            assert (regimes / task / "figures" / name).is_file()
    assert "Clinical metrics" in md and "(youden)" in md


@pytest.mark.slow
def test_target_sensitivity_is_met_on_validation(tiny_data, tmp_path):
    out = tmp_path / "out"
    assert main(["train", "--data", str(tiny_data), "--out", str(out), "--epochs", "1", "--image-size", "32",
                 "--val-ratio", "0.4", "--target-sensitivity", "0.9", "--class-weights", "balanced"]) == 0
    y, p = read_val(out / "scratch")
    checkpoint = torch.load(out / "scratch" / "best.pt", weights_only=True)
    assert checkpoint["operating_point"]["rule"] == "sensitivity>=0.9"
    assert point_metrics(y, p, checkpoint["threshold"])["sensitivity"] >= 0.9
    assert checkpoint["config"]["class_weights"] == "balanced"
