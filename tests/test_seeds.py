"""`cxr run --seeds`: one complete run per seed (the same as `--seed K` alone), images decoded once,
the aggregate over seeds, paired tests on seed-averaged probabilities with the per-seed spread,
a report that leads with them, and --resume that skips finished seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import cxr.pipeline
import cxr.study_data
from cxr.cli import main
from cxr.errors import CxrError
from cxr.evaluation.seeds import aggregate, check_layout, seed_comparisons, seeded_runs
from cxr.files import write_csv, write_json

from .helpers import make_image_files, make_predictions_run, make_tiny_data, read_history

ARGS = ["--image-size", "32", "--epochs", "2", "--device", "cpu", "--no-cache", "--n", "2"]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeds")
    root = make_tiny_data(tmp / "data", n_test=4)
    decoded = []
    real = cxr.study_data.load_samples
    mp = pytest.MonkeyPatch()
    mp.setattr(cxr.study_data, "load_samples", lambda samples, *a, **kw: decoded.extend(s.path for s in samples)
               or real(samples, *a, **kw))
    try:
        assert main(["run", "--data", str(root), "--out", str(tmp / "out"), "--tasks", "scratch,scratch-robust",
                     "--seeds", "0,1,2", *ARGS]) == 0
    finally:
        mp.undo()
    return root, tmp / "out", decoded


@pytest.mark.slow
def test_every_seed_is_a_complete_run_and_the_images_are_decoded_once(seeded, tmp_path):
    root, out, decoded = seeded
    for task in ("scratch", "scratch-robust"):
        for k in (0, 1, 2):
            run = out / task / f"seed{k}"
            assert {"best.pt", "config.json", "history.csv", "metrics.json", "predictions.csv"} <= {
                p.name for p in run.iterdir()}
            assert json.loads((run / "config.json").read_text())["config"]["seed"] == k
    assert len(decoded) == len(set(decoded)) == 24  # 16 train + 8 test images, once for all 3 seeds
    # seed 1 of the loop is what `cxr run --seed 1` makes alone
    assert main(["run", "--data", str(root), "--out", str(tmp_path / "alone"), "--tasks", "scratch", "--seed", "1",
                 *ARGS]) == 0
    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(read_history(tmp_path / "alone" / "scratch")) == strip(read_history(out / "scratch" / "seed1"))
    alone = json.loads((tmp_path / "alone" / "scratch" / "metrics.json").read_text())
    looped = json.loads((out / "scratch" / "seed1" / "metrics.json").read_text())
    assert alone["roc_auc"] == looped["roc_auc"] and alone["confusion_matrix"] == looped["confusion_matrix"]


@pytest.mark.slow
def test_the_aggregate_is_the_mean_and_spread_of_the_seeds(seeded):
    _, out, _ = seeded
    agg = json.loads((out / "aggregate.json").read_text())
    values = [json.loads((out / "scratch" / f"seed{k}" / "metrics.json").read_text())["at_threshold"]["operating"]
              ["accuracy"]["value"] for k in (0, 1, 2)]
    cell = agg["scratch"]["test"]["accuracy"]
    assert cell["mean"] == pytest.approx(np.mean(values)) and cell["sd"] == pytest.approx(np.std(values, ddof=1))
    assert cell["min"] == min(values) and cell["max"] == max(values) and cell["n"] == 3
    assert cell["seeds"] == {str(k): v for k, v in zip((0, 1, 2), values)}
    report = (out / "report.md").read_text()
    head = report.split("## Each seed")[0]
    assert "| scratch | test | 3 |" in head and "over 3 seeds" in head  # the report leads with the aggregate
    assert "seed-averaged" in head and "Per-seed differences" in head
    trust = report.split("## Where this model can be trusted")[1].split("## Data")[0]  # each task's first seed
    assert "| scratch seed0 | test (in-distribution) |" in trust and "seed1" not in trust
    assert "Where this model can be trusted" in (out / "report.html").read_text()
    comparisons = json.loads((out / "comparisons.json").read_text())["test"]
    pair, = comparisons["pairs"]
    assert (pair["a"], pair["b"]) == ("scratch", "scratch-robust") and pair["seed_differences"]["seeds"] == [0, 1, 2]
    assert "Holm" in comparisons["correction"]
    before = (out / "aggregate.json").read_text()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0  # rebuilt from the seed folders alone
    assert (out / "aggregate.json").read_text() == before and "| scratch | test | 3 |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_resume_skips_finished_seeds_and_finishes_the_interrupted_one(seeded, tmp_path, capsys):
    root, out, _ = seeded
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "scratch-robust" / "seed2" / "metrics.json").unlink()  # killed after training, before evaluating
    capsys.readouterr()
    assert main(["run", "--data", str(root), "--out", str(copy), "--tasks", "scratch,scratch-robust",
                 "--seeds", "0,1,2", "--resume", *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "seed 0: every task trained and evaluated already; skipped" in printed
    assert "seed 1: every task trained and evaluated already; skipped" in printed
    assert "--- seed 2" in printed and "already trained for 2 epochs" in printed
    assert (copy / "scratch-robust" / "seed2" / "metrics.json").is_file()
    assert json.loads((copy / "aggregate.json").read_text()) == json.loads((out / "aggregate.json").read_text())


def _fake_seeds(root: Path, tasks: dict[str, list[np.ndarray]], y: np.ndarray, threshold: float = 0.5):
    """Run folders holding only what the comparison reads: predictions.csv and metrics.json."""
    images = []
    for i, label in enumerate(y):
        path = root / "images" / f"person{i}_x_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"image {i}".encode())
        images.append(path)
    for task, probs in tasks.items():
        for k, prob in enumerate(probs):
            run = root / task / f"seed{k}"
            run.mkdir(parents=True)
            write_csv(run / "predictions.csv", ["path", "true_label", "predicted_label", "prob_pneumonia"],
                      ([str(p), ["NORMAL", "PNEUMONIA"][t], "", f"{q:.9f}"] for p, t, q in zip(images, y, prob)))
            write_json(run / "metrics.json", {"threshold": threshold, "set": {"name": "test"},
                                              "at_threshold": {"operating": {"accuracy": {
                                                  "value": float(((prob >= threshold) == y).mean())}}}})
    return seeded_runs(root)


def test_seed_averaged_tests_see_a_real_difference_and_none_between_equals(tmp_path):
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60, int), np.ones(60, int)]
    good = [np.clip(0.5 * y + 0.25 + rng.normal(0, 0.12, 120), 0, 1) for _ in range(3)]
    shuffled = [rng.permutation(p) for p in good]  # the same values, no longer tied to the labels
    runs = _fake_seeds(tmp_path / "a", {"good": good, "shuffled": shuffled}, y)
    result = seed_comparisons(runs)
    tests = result["pairs"][0]["tests"]
    assert tests["roc_auc"]["p"] < 0.01 and tests["accuracy"]["p"] < 0.01 and tests["accuracy"]["p_holm"] < 0.01
    spread = result["pairs"][0]["seed_differences"]["accuracy"]
    assert spread["min"] > 0 and len(spread["per_seed"]) == 3
    same = seed_comparisons(_fake_seeds(tmp_path / "b", {"one": good, "two": [p.copy() for p in good]}, y))
    t = same["pairs"][0]["tests"]
    assert t["roc_auc"]["p"] == pytest.approx(1.0) and t["accuracy"]["p"] == 1.0
    assert t["accuracy"]["ci"][0] <= 0 <= t["accuracy"]["ci"][1]
    assert aggregate(runs)["good"]["test"]["accuracy"]["n"] == 3


def test_seeds_are_checked_at_the_command_line(tiny_data, tmp_path, capsys):
    for bad in ("0,0", "a,1", "-1"):
        with pytest.raises(SystemExit):
            main(["run", "--data", str(tiny_data), "--out", str(tmp_path / "x"), "--seeds", bad])
    assert main(["run", "--data", str(tiny_data), "--out", str(tmp_path / "x"), "--seeds", "0,1", "--seed", "3"]) == 2
    assert "--seed and --seeds" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_frozen_backbones_features_are_computed_once_for_all_seeds(tiny_data, weights_file, tmp_path, monkeypatch):
    import cxr.training.engine

    rows = []
    real = cxr.training.engine.extract_features
    monkeypatch.setattr(cxr.training.engine, "extract_features",
                        lambda model, images, *a, **kw: rows.append(len(images)) or real(model, images, *a, **kw))
    assert main(["run", "--data", str(tiny_data), "--out", str(tmp_path / "out"), "--tasks", "finetune", "--seeds",
                 "0,1", "--weights", str(weights_file), *ARGS]) == 0
    assert sum(rows) == 16  # the 16 train images once, though each seed splits them differently
    again = tmp_path / "alone"  # and what each seed learnt is what it learns alone
    assert main(["run", "--data", str(tiny_data), "--out", str(again), "--tasks", "finetune", "--seed", "1",
                 "--weights", str(weights_file), *ARGS]) == 0
    alone = json.loads((again / "finetune" / "metrics.json").read_text())
    looped = json.loads((tmp_path / "out" / "finetune" / "seed1" / "metrics.json").read_text())
    assert alone["confusion_matrix"] == looped["confusion_matrix"]
    assert alone["roc_auc"] == pytest.approx(looped["roc_auc"], abs=1e-6)


# --- paired tests on seed-averaged probabilities; one layout per output folder -----------------------

def test_seed_comparisons_average_the_seeds_probabilities_and_thresholds(tmp_path):
    rng = np.random.default_rng(4)
    n = 60
    y = np.r_[np.zeros(n // 2, int), np.ones(n // 2, int)]
    paths = make_image_files(tmp_path, [f"person{i}_x_{i}.png" for i in range(n)])
    probs = {"a": [np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1) for _ in range(3)],
             "b": [rng.random(n) for _ in range(3)]}
    thresholds = {"a": [0.3, 0.5, 0.7], "b": [0.4, 0.5, 0.9]}
    for task in probs:
        for k in range(3):
            make_predictions_run(tmp_path / "out" / task, f"seed{k}", paths, y, probs[task][k], thresholds[task][k])
            write_json(tmp_path / "out" / task / f"seed{k}" / "metrics.json",
                       {"threshold": thresholds[task][k], "set": {"name": "test"}})
    result = seed_comparisons(seeded_runs(tmp_path / "out"))
    auc = result["pairs"][0]["tests"]["roc_auc"]
    assert auc["auc_a"] == pytest.approx(roc_auc_score(y, np.mean(probs["a"], axis=0)))
    assert auc["auc_a"] != pytest.approx(roc_auc_score(y, probs["a"][0]))
    assert [r["threshold"] for r in result["runs"]] == [pytest.approx(0.5), pytest.approx(0.6)]

def test_an_output_folder_holds_one_layout(tmp_path):
    out = tmp_path / "out"
    (out / "scratch").mkdir(parents=True)
    (out / "scratch" / "best.pt").write_bytes(b"")
    check_layout(out, False)
    with pytest.raises(CxrError, match="a --seeds run"):
        check_layout(out, True)
    (out / "finetune" / "seed0").mkdir(parents=True)
    with pytest.raises(CxrError, match="plain runs .* and runs of several seeds"):
        check_layout(out, None)
    with pytest.raises(CxrError, match="without --seeds"):
        check_layout(tmp_path / "out", False)

def test_a_seeds_run_into_a_folder_of_plain_runs_is_refused_before_training(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "scratch").mkdir(parents=True)
    (out / "scratch" / "best.pt").write_bytes(b"")
    assert main(["run", "--data", str(tiny_data), "--out", str(out), "--tasks", "scratch", "--seeds", "0,1",
                 "--epochs", "1", "--image-size", "32", "--no-cache"]) == 2
    assert "a --seeds run" in capsys.readouterr().err and not (out / "scratch" / "seed0").exists()
