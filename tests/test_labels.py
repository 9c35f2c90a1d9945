"""Label sets (issue: bacterial or viral): the subtype read from file names and manifests, K-class
metrics against scikit-learn, the K-class figures, a three-way run on the bundled sample from
training to predict / serve / export, and the study's binary run keeping its files' keys."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.data.dataset import Sample
from cxr.data.labels import class_names, relabel, subtype_of
from cxr.errors import DataError
from cxr.evaluation.multiclass import (
    multiclass_bootstrap,
    multiclass_metrics,
    top_label_calibration,
)

from .helpers import OFFICIAL_HALF, SHARED_DATA, cxr, free_port, write_png

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "cxr" / "sample"


# --- labels from file names ----------------------------------------------------------------------

@pytest.mark.parametrize("name, subtype", [
    ("person1_bacteria_1.jpeg", "BACTERIAL"), ("person1000_virus_1681.jpeg", "VIRAL"),
    ("person1661_virus_2872_2.jpeg", "VIRAL"),  # the one train file with a second number
    ("PERSON7_BACTERIA_9.JPEG", "BACTERIAL"), ("case-12-viral.png", "VIRAL"), ("scan.bacterial.3.png", "BACTERIAL")])
def test_the_subtype_is_read_from_the_file_name(name, subtype):
    assert subtype_of(name) == subtype


@pytest.mark.parametrize("name, says", [("IM-0115-0001.jpeg", "neither"), ("person3_bacteria_virus_2.jpeg", "both"),
                                        ("person4_viruses_1.jpeg", "neither"), ("bacteriaX.jpeg", "neither")])
def test_a_name_that_does_not_say_one_subtype_is_refused(name, says):
    with pytest.raises(DataError, match=f"{name}: a pneumonia image whose name says {says}"):
        subtype_of(name)


def test_a_manifest_subtype_column_wins_over_the_name_and_is_checked():
    assert subtype_of("img001.png", "viral") == "VIRAL" and subtype_of("person1_virus_1.png", "Bacterial") == "BACTERIAL"
    with pytest.raises(DataError, match="subtype 'fungal' is neither bacterial nor viral"):
        subtype_of("img002.png", "fungal")


def test_relabel_maps_the_study_labels_onto_each_label_set():
    samples = [Sample(Path("IM-0001-0001.jpeg"), 0, "IM-0001"), Sample(Path("person1_bacteria_1.jpeg"), 1, "person1"),
               Sample(Path("person2_virus_1.jpeg"), 1, "person2")]
    assert [s.label for s in relabel(samples, "pneumonia")] == [0, 1, 1]
    sub = relabel(samples, "subtype")  # normal images leave; VIRAL=0, BACTERIAL=1 (positive)
    assert [(s.path.name, class_names("subtype")[s.label]) for s in sub] == [
        ("person1_bacteria_1.jpeg", "BACTERIAL"), ("person2_virus_1.jpeg", "VIRAL")]
    assert [class_names("three-way")[s.label] for s in relabel(samples, "three-way")] == ["NORMAL", "BACTERIAL", "VIRAL"]


def test_every_pneumonia_file_name_of_the_shared_data_says_its_subtype():
    """All name forms in ../shared/data, and the counts the issue gives."""
    if not (SHARED_DATA / "train").is_dir() or not OFFICIAL_HALF.is_dir():
        pytest.skip("shared data not found")
    counts = {}
    for name, folder in (("train", SHARED_DATA / "train"), ("test", SHARED_DATA / "test"), ("half", OFFICIAL_HALF)):
        found = [subtype_of(p) for p in (folder / "PNEUMONIA").iterdir()]
        counts[name] = (found.count("BACTERIAL"), found.count("VIRAL"))
    assert counts == {"train": (2209, 1220), "test": (321, 125), "half": (127, 65)}


@pytest.mark.slow
def test_a_pneumonia_image_without_a_subtype_stops_the_run_in_one_line(tiny_data, tmp_path):
    first = sorted((tiny_data / "train" / "PNEUMONIA").iterdir())[0]
    first.rename(first.with_name("scan7.png"))
    out = tmp_path / "out"
    result = cxr("run", "--data", tiny_data, "--out", out, "--tasks", "scratch", "--labels", "subtype",
                 "--epochs", 1, "--image-size", 32)
    assert result.returncode != 0
    error = [ln for ln in result.stderr.strip().splitlines() if ln]
    assert len(error) == 1 and "1 pneumonia images carry no subtype" in error[0] and "scan7.png" in error[0], error
    assert "subtype column" in error[0] and not out.exists()


def test_a_manifest_with_a_subtype_column_labels_images_named_otherwise(tmp_path):
    from cxr.data.manifest import manifest_splits

    rows = []
    for i in range(12):
        for label, subtype in (("NORMAL", ""), ("PNEUMONIA", "bacterial"), ("PNEUMONIA", "viral")):
            path = tmp_path / "img" / f"{label}_{subtype}_{i}.png"
            write_png(path, len(rows))
            rows.append([path.relative_to(tmp_path).as_posix(), label, f"p{len(rows)}", subtype])
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "patient", "subtype"], *rows])
    train, val, test, _ = manifest_splits(tmp_path / "m.csv", 0.2, 0, labels="three-way")
    every = train + val + test
    names = class_names("three-way")
    assert sorted({(s.path.name.split("_")[1] or "-", names[s.label]) for s in every}) == [
        ("-", "NORMAL"), ("bacterial", "BACTERIAL"), ("viral", "VIRAL")]
    assert all({s.label for s in part} == {0, 1, 2} for part in (train, val, test))  # stratified on 3 labels


# --- K-class metrics against scikit-learn ----------------------------------------------------------

def _random_three_way(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_multiclass_metrics_agree_with_scikit_learn():
    from sklearn.metrics import (
        balanced_accuracy_score,
        cohen_kappa_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y, p = _random_three_way()
    classes = ("NORMAL", "BACTERIAL", "VIRAL")
    m = multiclass_metrics(y, p, classes)
    pred = p.argmax(1)
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, labels=[0, 1, 2])
    for i, c in enumerate(classes):
        cell = m["per_class"][c]
        rest = y != i
        assert cell["sensitivity"] == pytest.approx(recall[i]) and cell["ppv"] == pytest.approx(precision[i])
        assert cell["f1"] == pytest.approx(f1[i]) and cell["specificity"] == pytest.approx((pred[rest] != i).mean())
        assert cell["roc_auc"] == pytest.approx(roc_auc_score(y == i, p[:, i]))
    boot = multiclass_bootstrap(y, p, classes, n_boot=200, seed=1, groups=[f"p{k // 2}" for k in range(len(y))])
    assert boot["resampled"] == "patients"
    assert boot["overall"]["macro_roc_auc"]["value"] == pytest.approx(m["roc_auc"])
    assert boot["overall"]["kappa"]["value"] == pytest.approx(m["kappa"])
    for name, cell in [*boot["overall"].items(), *((f"{c} {k}", v) for c, d in boot["per_class"].items()
                                                    for k, v in d.items())]:
        lo, hi = cell["ci"]
        assert lo <= cell["value"] + 1e-12 and cell["value"] - 1e-12 <= hi and hi - lo > 0, name


def test_top_label_ece_is_the_binned_gap_between_confidence_and_accuracy():
    y, p = _random_three_way(seed=3)
    out = top_label_calibration(y, p, n_bins=10, n_boot=100)
    conf, right = p.max(1), p.argmax(1) == y
    which = np.minimum((conf * 10).astype(int), 9)
    expected = sum((which == b).mean() * abs(right[which == b].mean() - conf[which == b].mean())
                   for b in range(10) if (which == b).any())
    assert out["ece"] == pytest.approx(expected) and out["ece_ci"][0] <= out["ece"] <= out["ece_ci"][1]


def test_the_three_by_three_confusion_and_per_class_roc_figures_are_drawn(tmp_path):
    from cxr.reporting.plots import plot_confusion, plot_roc_per_class

    y, p = _random_three_way()
    classes = ("NORMAL", "BACTERIAL", "VIRAL")
    plot_confusion(multiclass_metrics(y, p, classes)["confusion_matrix"], "t", tmp_path / "c.png", classes)
    plot_roc_per_class(y, p, classes, "t", tmp_path / "r.png")
    for name in ("c.png", "r.png"):
        image = np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(float)
        assert image.shape[0] > 200 and image.std() > 20  # drawn, not blank
        colours = {tuple(c) for c in image.reshape(-1, 3)[::7].astype(int)}
        assert len(colours) > 20, name


# --- a three-way run end to end on the bundled sample ---------------------------------------------

@pytest.fixture(scope="module")
def three_way(tmp_path_factory):
    out = tmp_path_factory.mktemp("threeway") / "out"
    result = cxr("run", "--data", "sample", "--out", out, "--tasks", "scratch", "--labels", "three-way", "--epochs", 1,
                 "--image-size", 48, "--workers", 1)
    assert result.returncode == 0, result.stderr[-2000:]
    return out / "scratch"


@pytest.mark.slow
def test_a_three_way_run_writes_k_class_results(three_way):
    config = json.loads((three_way / "config.json").read_text())
    assert config["config"]["labels"] == "three-way"
    m = json.loads((three_way / "metrics.json").read_text())
    assert m["labels"] == {"set": "three-way", "classes": ["NORMAL", "BACTERIAL", "VIRAL"]}
    assert np.array(m["confusion_matrix"]).shape == (3, 3) and np.array(m["confusion_matrix"]).sum() == 100
    assert [m["per_class"][c]["total"] for c in ("NORMAL", "BACTERIAL", "VIRAL")] == [50, 30, 20]
    assert m["operating_point"]["rule"] == "argmax" and m["threshold"] is None
    assert set(m["multiclass"]["per_class"]) == {"NORMAL", "BACTERIAL", "VIRAL"}
    reading = m["pneumonia_reading"]
    assert [reading["per_class"][c]["total"] for c in ("NORMAL", "PNEUMONIA")] == [50, 50]
    with open(three_way / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        p = [float(r[k]) for k in ("prob_normal", "prob_bacterial", "prob_viral")]
        assert sum(p) == pytest.approx(1, abs=2e-6) and float(r["prob_pneumonia"]) == pytest.approx(1 - p[0], abs=2e-6)
        assert r["predicted_label"] == ("NORMAL", "BACTERIAL", "VIRAL")[int(np.argmax(p))]
    for name in ("confusion", "roc", "roc_pneumonia", "calibration", "misclassified", "cam_normal", "cam_bacterial",
                 "cam_viral"):
        assert (three_way / "figures" / f"{name}.png").stat().st_size > 5000, name
    report = (three_way.parent / "report.md").read_text()
    assert "normal, bacterial or viral pneumonia" in report and "| scratch | test | BACTERIAL | 30 |" in report
    assert "The pneumonia reading" in report and "argmax" in report


@pytest.mark.slow
def test_predict_serve_and_export_give_the_same_three_named_probabilities(three_way, tmp_path):
    from cxr.deploy.export import export_model
    from cxr.deploy.predict import load_model

    files = sorted((SAMPLE / "test" / "PNEUMONIA").glob("*virus*"))[:3] + sorted((SAMPLE / "test" / "NORMAL").iterdir())[:2]
    model = load_model(three_way / "best.pt")
    api = model.predict([str(f) for f in files])
    for r in api:
        assert list(r["probabilities"]) == ["NORMAL", "BACTERIAL", "VIRAL"]
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-9) and r["threshold"] is None
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        assert r["prob_pneumonia"] == pytest.approx(1 - r["prob_normal"], abs=1e-12)
    # cxr predict's JSON
    result = cxr("predict", three_way / "best.pt", *files, "--output", tmp_path / "p.json")
    assert result.returncode == 0, result.stderr[-2000:]
    cli = json.loads((tmp_path / "p.json").read_text())["predictions"]
    # evaluation's predictions.csv (6 decimals)
    with open(three_way / "predictions.csv", newline="") as f:
        evaluated = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    # the exported graph
    out, sidecar = export_model(three_way / "best.pt", "torchscript", tmp_path / "m.pt")
    meta = json.loads(sidecar.read_text())
    assert meta["class_names"] == ["NORMAL", "BACTERIAL", "VIRAL"] and meta["output"].startswith("probabilities (N, 3)")
    from cxr.data.images import load_image

    batch = torch.from_numpy(np.stack([load_image(f, meta["input_size"]) for f in files]))[:, None]
    with torch.no_grad():
        exported, scores = (t.numpy() for t in torch.jit.load(str(out))(batch))  # probabilities, ood_score
    assert exported.shape == (len(files), 3)
    assert np.allclose(scores, [a["ood_score"] for a in api], atol=2e-3, rtol=1e-3)
    # the served page's API
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cxr.deploy.serve import create_app

    with TestClient(create_app(three_way / "best.pt")) as client:
        body = client.post("/predict", files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files]).json()
        card = client.get("/model").json()
    assert card["classes"] == ["NORMAL", "BACTERIAL", "VIRAL"] and card["threshold"] is None
    for k, (f, a, c, s) in enumerate(zip(files, api, cli, body["predictions"])):
        want = np.array([a["probabilities"][n] for n in ("NORMAL", "BACTERIAL", "VIRAL")])
        for got in (c["probabilities"], s["probabilities"]):
            assert np.allclose([got[n] for n in ("NORMAL", "BACTERIAL", "VIRAL")], want, atol=1e-9)
        assert c["label"] == s["label"] == a["label"] == evaluated[f.name]["predicted_label"]
        assert np.allclose([float(evaluated[f.name][n]) for n in ("prob_normal", "prob_bacterial", "prob_viral")],
                           want, atol=1e-6)
        assert np.allclose(exported[k], want, atol=1e-5)


@pytest.mark.slow
def test_evaluate_an_external_set_named_by_subtype(three_way, tmp_path):
    ext = tmp_path / "site"
    for f in sorted((SAMPLE / "test" / "PNEUMONIA").iterdir())[:6] + sorted((SAMPLE / "test" / "NORMAL").iterdir())[:3]:
        dest = ext / f.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.read_bytes())
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "config.json"):
        (run / name).write_bytes((three_way / name).read_bytes())
    result = cxr("evaluate", run, "--data", ext, "--name", "site")
    assert result.returncode == 0, result.stderr[-2000:]
    m = json.loads((run / "metrics_site.json").read_text())
    counts = {c: m["per_class"][c]["total"] for c in ("NORMAL", "BACTERIAL", "VIRAL")}
    want = {"NORMAL": 3, "BACTERIAL": sum("bacteria" in f.name for f in (ext / "PNEUMONIA").iterdir()),
            "VIRAL": sum("virus" in f.name for f in (ext / "PNEUMONIA").iterdir())}
    assert counts == want and "multiclass" in m


@pytest.mark.slow
def test_adapt_and_robustness_refuse_a_three_way_model_in_one_line(three_way, tmp_path):
    result = cxr("adapt", three_way, "--data", SAMPLE / "test", "--out", tmp_path / "adapted")
    assert result.returncode != 0 and "cxr adapt fits pneumonia-vs-normal models" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "adapted").exists()
    result = cxr("robustness", three_way, "--data", "sample")
    assert result.returncode != 0 and "3-class model" in result.stderr, result.stderr[-500:]


@pytest.mark.slow
def test_subtype_is_binary_with_bacterial_positive(tmp_path):
    out = tmp_path / "out"
    result = cxr("run", "--data", "sample", "--out", out, "--tasks", "scratch", "--labels", "subtype", "--epochs", 1,
                 "--image-size", 32, "--workers", 1)
    assert result.returncode == 0, result.stderr[-2000:]
    m = json.loads((out / "scratch" / "metrics.json").read_text())
    assert list(m["per_class"]) == ["VIRAL", "BACTERIAL"] and m["n"] == 50  # pneumonia test images only
    assert m["labels"]["classes"] == ["VIRAL", "BACTERIAL"] and "at_threshold" in m
    with open(out / "scratch" / "predictions.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == ["path", "true_label", "predicted_label", "prob_bacterial", "patient", "ood_score",
                      "in_distribution"]
    assert "bacterial vs viral pneumonia" in (out / "report.md").read_text()


# --- the study's binary run keeps its files ------------------------------------------------------

def _keys(d, prefix=""):
    out = set()
    if isinstance(d, dict):
        for k, v in d.items():
            out |= {prefix + k} | _keys(v, prefix + k + ".")
    return out


# recorded from the study's run before label sets existed (commit 0d485c0; --data sample --tasks scratch)
_BLOCK = {f"{m}{leaf}" for m in ("accuracy", "balanced_accuracy", "f1", "npv", "ppv", "pr_auc", "roc_auc",
                                 "sensitivity", "specificity") for leaf in ("", ".ci", ".value")} | {"resampled",
                                                                                                      "threshold"}
METRICS_KEYS = ({"accuracy", "at_threshold", "calibration", "checkpoint", "confusion_matrix", "data_checks", "n",
                 "operating_point", "per_class", "roc_auc", "set", "threshold"}
                | {f"at_threshold.{t}" for t in ("0.5", "operating")}
                | {f"at_threshold.{t}.{k}" for t in ("0.5", "operating") for k in _BLOCK}
                | {f"calibration.{k}" for k in ("bins", "bins_uncalibrated", "ece", "ece_ci", "ece_uncalibrated",
                                                "temperature")}
                | {"checkpoint.epoch", "checkpoint.file", "checkpoint.val_loss", "data_checks.notes", "data_checks.ran"}
                | {f"operating_point.{k}" for k in ("chosen_on", "n_val", "rule", "temperature", "threshold", "val_ece",
                                                    "val_ece_calibrated", "val_nll", "val_nll_calibrated")}
                | {f"per_class.{c}{leaf}" for c in ("NORMAL", "PNEUMONIA") for leaf in ("", ".accuracy", ".correct",
                                                                                        ".total")}
                | {"set.external", "set.folder", "set.n_patients", "set.name"})
CONFIG_FIELDS = {"augment", "batch_size", "calibrate", "class_weights", "classes", "epochs", "image_size", "intensity",
                 "label_smoothing", "limit", "lr", "optimizer", "patience", "pretrained", "schedule", "seed",
                 "select_by", "target_sensitivity", "task", "threshold_rule", "train_backbone", "val_ratio",
                 "warmup_epochs", "weight_decay"}


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    """The study's `scratch` on the sample at the three-way run's settings."""
    out = tmp_path_factory.mktemp("binary") / "out"
    result = cxr("run", "--data", "sample", "--out", out, "--tasks", "scratch", "--epochs", 1, "--image-size", 48,
                 "--workers", 1)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.slow
def test_the_study_run_keeps_its_config_and_metrics_keys(binary):
    out = binary
    metrics = json.loads((out / "scratch" / "metrics.json").read_text())
    trust = metrics.pop("trust")  # added beside the study's keys: the flagged share and the label-free estimates
    assert _keys(metrics) == METRICS_KEYS
    assert trust["available"] and {"flagged_share", "accuracy", "estimate", "validation"} <= set(trust)
    config = json.loads((out / "scratch" / "config.json").read_text())
    assert set(config["config"]) == CONFIG_FIELDS | {"labels"} and config["config"]["labels"] == "pneumonia"
    with open(out / "scratch" / "predictions.csv", newline="") as f:
        assert next(csv.reader(f)) == ["path", "true_label", "predicted_label", "prob_pneumonia", "patient",
                                       "ood_score", "in_distribution"]
    with open(out / "scratch" / "val_predictions.csv", newline="") as f:
        assert next(csv.reader(f)) == ["path", "true_label", "logit_normal", "logit_pneumonia", "prob_pneumonia"]
    assert (out / "report.md").read_text().startswith("# cxr report: pneumonia vs normal, ResNet-18")


@pytest.mark.slow
def test_the_cam_of_any_chosen_class(three_way, tmp_path):
    from cxr.deploy.predict import load_model

    model = load_model(three_way / "best.pt")
    files = [str(f) for f in sorted((SAMPLE / "test" / "PNEUMONIA").iterdir())[:2]]
    viral, normal = model.explain(files, target="viral"), model.explain(files, target="NORMAL")
    assert np.array_equal(viral, model.explain(files, target=2)) and not np.allclose(viral, normal, atol=1e-3)
    result = cxr("predict", three_way / "best.pt", files[0], "--cam", tmp_path / "cams", "--cam-class", "VIRAL")
    assert result.returncode == 0 and (tmp_path / "cams" / f"{Path(files[0]).name}.cam.png").is_file()
    result = cxr("predict", three_way / "best.pt", files[0], "--cam", tmp_path / "x", "--cam-class", "fungal")
    assert result.returncode != 0 and "this model's classes are NORMAL, BACTERIAL, VIRAL" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_three_way_run_is_compared_with_a_binary_one_through_its_pneumonia_reading(three_way, binary, tmp_path):
    from cxr.evaluation.compare import compare_runs

    result = compare_runs([three_way, binary / "scratch"], out=tmp_path)
    assert result["images"] == {"NORMAL": 50, "PNEUMONIA": 50} and "pneumonia reading" in result["reading"]
    with open(three_way / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    reading_right = np.array([(float(r["prob_pneumonia"]) >= 0.5) == (r["true_label"] != "NORMAL") for r in rows])
    m = json.loads((binary / "scratch" / "metrics.json").read_text())
    want = reading_right.mean() - m["accuracy"]
    assert result["pairs"][0]["tests"]["accuracy"]["difference"] == pytest.approx(want)
    assert "Compared on the pneumonia question" in (tmp_path / "comparisons.md").read_text()
    sub = tmp_path / "subtype"
    assert cxr("run", "--data", "sample", "--out", sub, "--tasks", "scratch", "--labels", "subtype", "--epochs", 1,
               "--image-size", 48, "--limit", 5).returncode == 0
    result = cxr("compare", three_way, sub / "scratch")
    assert result.returncode != 0 and "answer different questions" in result.stderr
    assert "VIRAL/BACTERIAL" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_page_shows_the_three_probabilities_in_a_browser(browser, three_way):
    """The served page with a three-way model, in Chromium: the label, then each class's probability
    (no threshold: the highest decides), and the model card's decision rule."""
    import threading
    import time

    pytest.importorskip("fastapi")
    import uvicorn
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from cxr.deploy.predict import load_model
    from cxr.deploy.serve import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(three_way / "best.pt"), host="127.0.0.1", port=port,
                                           log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        image = sorted((SAMPLE / "test" / "PNEUMONIA").glob("*virus*"))[0]
        browser.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(browser, 30).until(lambda d: "highest probability" in d.find_element(By.ID, "card").text)
        browser.find_element(By.ID, "files").send_keys(str(image))
        WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result .prob")
                                         or d.find_elements(By.CSS_SELECTOR, ".result .error"))
        assert not browser.find_elements(By.CSS_SELECTOR, ".result .error")
        text = browser.find_element(By.CSS_SELECTOR, ".result .prob").text
        record = load_model(three_way / "best.pt").predict(str(image))[0]
        shown = {part.split(" = ")[0]: float(part.split(" = ")[1]) for part in text.split(": the")[0].split(", ")}
        assert shown == pytest.approx({f"P({c.lower()})": p for c, p in record["probabilities"].items()}, abs=5e-4)
        assert text.endswith("the highest decides") and "threshold" not in text
        assert browser.find_element(By.CSS_SELECTOR, ".result .label").text == record["label"]
        assert browser.find_elements(By.CSS_SELECTOR, ".result .warn")  # trained on the bundled sample
    finally:
        browser.get("about:blank")  # leave no page of this server loading for the next test's browser
        server.should_exit = True
