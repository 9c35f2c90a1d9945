"""The audit of fine-tuning, k-fold, seeds and paired tests (issue 38): each defect with a test that
fails on it, and tests that fail when a feature is broken in the ways the audit tried (mutations)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from cxr.adaptation import finetune as ft
from cxr.adaptation import methods
from cxr.adaptation.adapt import estimate_settings, kfold_estimate
from cxr.adaptation.finetune import finetune, kept_epoch, replay_batches
from cxr.cli import main
from cxr.config import FinetuneSpec, make_config
from cxr.errors import CxrError, DataError
from cxr.evaluation.compare import compare_runs, comparison_table
from cxr.evaluation.metrics import paired_difference
from cxr.evaluation.paired import delong, holm
from cxr.evaluation.seeds import check_layout, seed_comparisons, seeded_runs
from cxr.files import write_csv, write_json
from cxr.training.model import build_model

SIZE = 32


def _run(root: Path, name: str, paths: list[Path], y, prob, threshold: float = 0.5, patients=None) -> Path:
    """A run folder holding only what cxr compare reads."""
    run = root / name
    run.mkdir(parents=True)
    cols = ["path", "true_label", "predicted_label", "prob_pneumonia"] + (["patient"] if patients else [])
    write_csv(run / "predictions.csv", cols,
              ([str(p), ["NORMAL", "PNEUMONIA"][t], "", f"{q:.9f}", *([patients[i]] if patients else [])]
               for i, (p, t, q) in enumerate(zip(paths, y, prob))))
    write_json(run / "metrics.json", {"threshold": threshold})
    return run


def _images(root: Path, names: list[str]) -> list[Path]:
    out = []
    for i, n in enumerate(names):
        p = root / "set" / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"image {i}".encode())
        out.append(p)
    return out


# --- 1: DeLong's variance undefined --------------------------------------------------------------

def test_delong_with_one_positive_has_no_p_and_the_table_says_why():
    y = np.array([0, 0, 0, 0, 0, 1])  # the audit's 6-image example
    a = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9])
    b = np.array([0.5, 0.4, 0.3, 0.2, 0.95, 0.6])
    r = delong(y, a, b)
    assert r["p"] is None and r["se"] is None and r["ci"] is None and "two images of each class" in r["undefined"]
    assert holm([0.01, None, 0.04]) == [pytest.approx(0.02), None, pytest.approx(0.04)]  # None is no member


def test_compare_on_a_set_with_one_positive_reports_the_auc_test_undefined(tmp_path):
    names = [f"IM-{i:04d}-0001.png" for i in range(9)] + ["person1_virus_1.png"]
    paths = _images(tmp_path, names)
    y = np.r_[np.zeros(9, int), 1]
    rng = np.random.default_rng(0)
    a = _run(tmp_path, "a", paths, y, rng.random(10))
    b = _run(tmp_path, "b", paths, y, rng.random(10))
    result = compare_runs([a, b])
    auc = result["pairs"][0]["tests"]["roc_auc"]
    assert auc["p"] is None and auc["p_holm"] is None
    table = comparison_table(result)
    assert "undefined" in table.split("roc_auc")[1].split("\n")[0] and "differ |" not in table


# --- 2 and mutation 2: the patient column, the unit said truthfully ------------------------------

def test_compare_resamples_the_patients_of_the_predictions_and_names_the_unit(tmp_path):
    rng = np.random.default_rng(1)
    n_pat, per = 12, 6
    names = [f"scan{i:03d}.png" for i in range(n_pat * per)]  # file names carry no patient id
    patients = [f"P{i // per}" for i in range(n_pat * per)]
    y = np.array([(i // per) % 2 for i in range(n_pat * per)])
    # model A is right or wrong on whole patients at once: clustered errors
    right = np.repeat(rng.random(n_pat) < 0.7, per)
    pa = np.where(right == (y == 1), 0.8, 0.2)
    pb = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, 0.3, len(y)), 0, 1)
    paths = _images(tmp_path, names)
    with_ids = compare_runs([_run(tmp_path, "a", paths, y, pa, patients=patients),
                             _run(tmp_path, "b", paths, y, pb, patients=patients)])
    assert with_ids["patients"] == n_pat and with_ids["bootstrap"]["unit"].startswith("patients with all")
    acc = with_ids["pairs"][0]["tests"]["accuracy"]
    by_patient = paired_difference(y, pa, 0.5, pb, 0.5, 2000, 0, groups=patients)["accuracy"]["ci"]
    by_image = paired_difference(y, pa, 0.5, pb, 0.5, 2000, 0, groups=None)["accuracy"]["ci"]
    assert acc["ci"] == pytest.approx(by_patient) and acc["ci"] != pytest.approx(by_image)
    without = compare_runs([_run(tmp_path, "c", paths, y, pa), _run(tmp_path, "d", paths, y, pb)])
    assert without["patients"] == len(y) and without["bootstrap"]["unit"].startswith("images one by one")
    assert "images one by one" in comparison_table(without)


def test_evaluation_writes_the_patient_it_grouped_by(tmp_path):
    from cxr.data.dataset import Sample
    from cxr.evaluation.evaluate import evaluate_model
    from cxr.training.checkpoint import make_checkpoint

    config = make_config("scratch", image_size=SIZE)
    model = build_model(None).eval()
    ck = make_checkpoint(model, config, 1, {"val_loss": 0.7}, 0.7)
    samples = [Sample(Path(f"scan{i}.png"), i % 2, f"table-patient-{i // 2}") for i in range(8)]
    images = torch.randint(0, 256, (8, 1, SIZE, SIZE), dtype=torch.uint8)
    evaluate_model(model, ck, samples, images, tmp_path, "cpu")
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows[0].split(",")[-1] == "patient" and rows[1].split(",")[-1] == "table-patient-0"


# --- 3: a one-class set ------------------------------------------------------------------------

def test_a_one_class_set_is_compared_without_a_crash(tmp_path):
    paths = _images(tmp_path, [f"person{i}_virus_{i}.png" for i in range(8)])
    y = np.ones(8, int)
    rng = np.random.default_rng(2)
    result = compare_runs([_run(tmp_path, "a", paths, y, rng.random(8)), _run(tmp_path, "b", paths, y, rng.random(8))])
    tests = result["pairs"][0]["tests"]
    assert tests["roc_auc"]["p"] is None and tests["specificity"]["difference"] is None
    assert tests["sensitivity"]["p"] is not None and tests["accuracy"]["p_holm"] is not None
    assert "no NORMAL images" in comparison_table(result)


# --- 6 and mutation 4: which epoch's weights come back ---------------------------------------------

def _site(n=16, imbalance=False):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (n, 1, SIZE, SIZE), dtype=torch.uint8)
    y = torch.tensor([1 if (imbalance and i % 4 == 0) or (not imbalance and i % 2) else 0 for i in range(n)])
    return x, y


def test_the_kept_epoch_is_the_best_scored_one_and_only_it_is_marked(monkeypatch):
    scripted = iter([0.60, 0.90, 0.70])
    seen = []

    def scores(model, sets, device, intensity):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {name: next(scripted) if name == "site" else 1.0 for name in sets}

    monkeypatch.setattr(ft, "validation_scores", scores)
    x, y = _site()
    config = make_config("scratch", image_size=SIZE)
    model, history, _ = finetune(build_model(None), config, FinetuneSpec(epochs=3, batch_size=8, replay=0), x, y,
                                 x[:4], y[:4], "cpu")
    assert [r["best"] for r in history] == [False, True, False] and kept_epoch(history) == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, seen[1][k]), k  # epoch 2's weights, not the last epoch's


def test_a_validation_split_of_one_class_is_refused_before_training():
    x, y = _site()
    config = make_config("scratch", image_size=SIZE)
    with pytest.raises(DataError, match="no NORMAL image"):
        finetune(build_model(None), config, FinetuneSpec(epochs=2, batch_size=8, replay=0), x, y,
                 x[y == 1][:3], y[y == 1][:3], "cpu")


def test_the_epoch_is_chosen_on_both_sites_validation(monkeypatch):
    """The spy sees the site's and the source's validation images, and the worst site decides."""
    calls = []
    site_scores, source_scores = iter([0.9, 0.8, 0.95]), iter([0.5, 0.7, 0.6])

    def scores(model, sets, device, intensity):
        calls.append({k: v[0].clone() for k, v in sets.items()})
        return {"site": next(site_scores), "source": next(source_scores)}

    monkeypatch.setattr(ft, "validation_scores", scores)
    x, y = _site()
    src_x, src_y = torch.full((6, 1, SIZE, SIZE), 9, dtype=torch.uint8), torch.tensor([0, 1] * 3)
    config = make_config("scratch", image_size=SIZE)
    _, history, _ = finetune(build_model(None), config, FinetuneSpec(epochs=3, batch_size=8, replay=0), x[4:], y[4:],
                             x[:4], y[:4], "cpu", source_val=(src_x, src_y))
    assert all(set(c) == {"site", "source"} for c in calls)
    assert torch.equal(calls[0]["site"], x[:4]) and torch.equal(calls[0]["source"], src_x)
    assert kept_epoch(history) == 2  # min(0.9, 0.5), min(0.8, 0.7), min(0.95, 0.6): epoch 2


# --- mutation 6: the class-balanced loss ------------------------------------------------------------

def test_the_site_loss_is_class_balanced(monkeypatch):
    """With the per-image loss 1 on PNEUMONIA and 0 on NORMAL, a class-balanced mean is 1/2 whatever
    the classes' shares; unweighted it would be the PNEUMONIA share (1/4 here)."""
    real = ft.F.cross_entropy

    def one_for_pneumonia(logits, y, reduction="none", label_smoothing=0.0):
        return real(logits, y, reduction="none") * 0 + y.float()

    monkeypatch.setattr(ft.F, "cross_entropy", one_for_pneumonia)
    x, y = _site(16, imbalance=True)
    config = make_config("scratch", image_size=SIZE)
    _, history, _ = finetune(build_model(None), config, FinetuneSpec(epochs=1, batch_size=16, replay=0), x, y,
                             torch.cat([x[:2], x[4:5]]), torch.tensor([1, 0, 1]), "cpu")
    assert history[0]["train_loss"] == pytest.approx(0.5)


# --- mutation 5: the validation patients are not the fit images ---------------------------------------

def test_the_fine_tuning_validation_is_held_out_patients(monkeypatch):
    got = {}

    def spy(model, config, spec, images, labels, val_images, val_labels, *a, **k):
        got.update(fit=images, val=val_images)
        return model, [{"epoch": 1, "best": True}], None

    monkeypatch.setattr(methods, "finetune", spy)
    x = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 4, 4).contiguous()
    y = np.array([i % 2 for i in range(40)])
    patients = [f"p{i // 2}" for i in range(40)]
    plan = methods.Plan(False, "finetune", 10, None, FinetuneSpec(val_ratio=0.25))
    fitted = methods._finetune(build_model(None), make_config("scratch"), x, y, patients, "cpu", 0, plan,
                               methods.Context())
    fit_ids, val_ids = set(got["fit"][:, 0, 0, 0].tolist()), set(got["val"][:, 0, 0, 0].tolist())
    assert fit_ids.isdisjoint(val_ids) and len(fit_ids) + len(val_ids) == 40
    assert val_ids == set(fitted.holdout.tolist())
    assert {patients[i] for i in fit_ids}.isdisjoint({patients[i] for i in val_ids})


# --- mutation 7: the interval's level --------------------------------------------------------------

def test_delongs_interval_is_the_two_sided_95_percent_one():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    a, b = rng.random(200) + 0.3 * y, rng.random(200) + 0.1 * y
    r = delong(y, a, b)
    half = (r["ci"][1] - r["ci"][0]) / 2
    assert half == pytest.approx(stats.norm.ppf(0.975) * r["se"]) and half == pytest.approx(1.959964 * r["se"], rel=1e-5)


# --- mutations 3 and 8: seed-averaged probabilities at the mean threshold -----------------------------

def test_seed_comparisons_average_the_seeds_probabilities_and_thresholds(tmp_path):
    rng = np.random.default_rng(4)
    n = 60
    y = np.r_[np.zeros(n // 2, int), np.ones(n // 2, int)]
    paths = _images(tmp_path, [f"person{i}_x_{i}.png" for i in range(n)])
    probs = {"a": [np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1) for _ in range(3)],
             "b": [rng.random(n) for _ in range(3)]}
    thresholds = {"a": [0.3, 0.5, 0.7], "b": [0.4, 0.5, 0.9]}
    for task in probs:
        for k in range(3):
            _run(tmp_path / "out" / task, f"seed{k}", paths, y, probs[task][k], thresholds[task][k])
            write_json(tmp_path / "out" / task / f"seed{k}" / "metrics.json",
                       {"threshold": thresholds[task][k], "set": {"name": "test"}})
    result = seed_comparisons(seeded_runs(tmp_path / "out"))
    auc = result["pairs"][0]["tests"]["roc_auc"]
    assert auc["auc_a"] == pytest.approx(roc_auc_score(y, np.mean(probs["a"], axis=0)))
    assert auc["auc_a"] != pytest.approx(roc_auc_score(y, probs["a"][0]))
    assert [r["threshold"] for r in result["runs"]] == [pytest.approx(0.5), pytest.approx(0.6)]


# --- 4, 5: cxr adapt checks its values and its inputs before any work ----------------------------------

@pytest.fixture
def source(tmp_path):
    from cxr.training.checkpoint import make_checkpoint, save_checkpoint

    config = make_config("scratch", image_size=SIZE)
    run = tmp_path / "runs" / "scratch"
    save_checkpoint(run / "best.pt", make_checkpoint(build_model(None), config, 1, {"val_loss": 0.7}, 0.7))
    write_json(run / "config.json", {"config": config.to_dict(), "data": str(tmp_path / "nowhere")})
    from PIL import Image

    for i in range(12):
        for cls, level in (("NORMAL", 90), ("PNEUMONIA", 150)):
            p = tmp_path / "site" / cls / (f"IM-{i:04d}-0001.png" if cls == "NORMAL" else f"person{i}_virus_{i}.png")
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((SIZE, SIZE), level + i, np.uint8)).save(p)
    return run


@pytest.mark.parametrize("lr", ["-1", "0", "nan", "inf"])
def test_adapt_refuses_a_learning_rate_that_cannot_train(source, tmp_path, lr, capsys):
    with pytest.raises(SystemExit) as e:
        main(["adapt", str(source), "--data", str(tmp_path / "site"), "--out", str(tmp_path / "new"), "--finetune",
              "--lr", lr])
    assert e.value.code == 2 and "--lr" in capsys.readouterr().err and not (tmp_path / "new").exists()


@pytest.mark.parametrize("extra, says", [(["--tent"], "--tent"), (["--adabn"], "--adabn"),
                                         (["--target-sensitivity", "0.9"], "--site-threshold")])
def test_adapt_refuses_options_finetuning_would_ignore(source, tmp_path, extra, says, capsys, monkeypatch):
    monkeypatch.setattr(methods, "finetune", lambda *a, **k: pytest.fail("trained"))
    assert main(["adapt", str(source), "--data", str(tmp_path / "site"), "--out", str(tmp_path / "new"),
                 "--finetune", "--replay", "0", *extra]) == 2
    assert says in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_adapt_finds_a_bad_external_folder_before_fine_tuning(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(methods, "finetune", lambda *a, **k: pytest.fail("fine-tuned before checking --external"))
    (tmp_path / "empty").mkdir()
    assert main(["adapt", str(source), "--data", str(tmp_path / "site"), "--out", str(tmp_path / "new"),
                 "--finetune", "--replay", "0", "--external", f"half={tmp_path / 'empty'}"]) == 2
    assert str(tmp_path / "empty") in capsys.readouterr().err and not (tmp_path / "new").exists()


# --- 7: --estimate-from compares every setting ----------------------------------------------------------

def test_estimate_from_refuses_an_evaluation_of_other_settings(tmp_path):
    src, site = tmp_path / "src", tmp_path / "site"
    spec = FinetuneSpec()
    row = {"variant": spec.name, "per_class": None, **{m: {"value": 0.7} for m in
                                                       ("accuracy", "sensitivity", "specificity", "roc_auc")}}
    write_json(tmp_path / "eval" / "adapt_evaluation.json", {
        "source_run": str(src.resolve()), "site": str(site.resolve()), "folds": 5, "finetune": [spec.to_dict()],
        "rows": [row], "settings": estimate_settings(None, 10, None, 0)})
    same = kfold_estimate(tmp_path / "eval", src, site, spec.name, spec, estimate_settings(None, 10, None, 0))
    assert same["folds"] == 5
    for other, named in [(estimate_settings(0.9, 10, None, 0), "target_sensitivity"),
                         (estimate_settings(None, 5, None, 0), "tent_steps"),
                         (estimate_settings(None, 10, None, 1), "seed")]:
        with pytest.raises(CxrError, match=named):
            kfold_estimate(tmp_path / "eval", src, site, spec.name, spec, other)
    table = tmp_path / "patients.csv"
    table.write_text("path,patient\na.png,1\n")
    with pytest.raises(CxrError, match="patients_sha256"):
        kfold_estimate(tmp_path / "eval", src, site, spec.name, spec, estimate_settings(None, 10, table, 0))


# --- 8: a manifest's test split does not move with the seed ----------------------------------------------

def test_a_manifests_carved_test_split_is_the_same_for_every_seed(tmp_path):
    from cxr.data.loading import get_test_samples
    from cxr.data.manifest import manifest_splits

    rows = ["path,label,patient"]
    for i in range(80):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
        rows.append(f"img/{i}.png,{'PNEUMONIA' if i % 2 else 'NORMAL'},p{i // 2}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    tests = [sorted(str(s.path) for s in manifest_splits(manifest, 0.2, seed)[2]) for seed in (0, 1, 2)]
    assert tests[0] == tests[1] == tests[2]
    vals = [sorted(str(s.path) for s in manifest_splits(manifest, 0.2, seed)[1]) for seed in (0, 1)]
    assert vals[0] != vals[1]  # validation still follows the seed
    limited = [sorted(str(s.path) for s in get_test_samples(manifest, seed, limit=3)) for seed in (0, 5)]
    assert limited[0] == limited[1]


# --- 10: one layout per output folder ---------------------------------------------------------------

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


# --- 11: replay never makes a batch larger than batch_size ----------------------------------------------

@pytest.mark.parametrize("replay", [0.5, 0.985, 0.99])
def test_replay_batches_hold_batch_size_images_with_a_site_image(replay):
    spec = FinetuneSpec(replay=replay, batch_size=32)
    steps = replay_batches(100, 500, spec, torch.Generator().manual_seed(0))
    assert all(len(s) >= 1 and len(s) + len(r) <= 32 for s, r in steps)
    assert all(len(s) + len(r) == 32 for s, r in steps[:-1])
    assert sum(len(s) for s, _ in steps) == 100


# --- issue 36: an operating point per site ----------------------------------------------------------

def test_a_fine_tuned_model_stores_an_operating_point_per_site_and_predict_uses_it(source, tmp_path, capsys):
    import csv

    from cxr.evaluation.metrics import youden_threshold
    from cxr.training.checkpoint import load_checkpoint

    new = tmp_path / "new"
    assert main(["adapt", str(source), "--data", str(tmp_path / "site"), "--out", str(new), "--finetune",
                 "--replay", "0", "--epochs", "2", "--site-name", "nih", "--no-cache"]) == 0
    ck = load_checkpoint(new / "best.pt")
    points = ck["operating_points"]
    assert set(points) == {"nih", "source"} and points["source"]["threshold"] == ck["threshold"]
    with open(new / "site_predictions.csv", newline="") as f:
        val = [r for r in csv.DictReader(f) if r["role"] == "validation"]
    assert points["nih"]["chosen_on"] == f"{len(val)} site validation images"
    # the site's threshold is Youden's J on the validation images alone, at the site's temperature:
    # site_predictions.csv holds P at the kept (source) temperature; back to the logit margin, then to the site's
    y = np.array([r["true_label"] == "PNEUMONIA" for r in val], dtype=int)
    q = np.array([float(r["prob_pneumonia"]) for r in val])
    margin = np.log(q / (1 - q)) * ck["temperature"]
    p_site = 1 / (1 + np.exp(-margin / points["nih"]["temperature"]))
    assert points["nih"]["threshold"] == pytest.approx(youden_threshold(y, p_site), abs=1e-6)
    capsys.readouterr()
    image = next((tmp_path / "site" / "PNEUMONIA").iterdir())
    assert main(["predict", str(new / "best.pt"), str(image), "--site", "nih", "--output", str(tmp_path / "r.json")]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["threshold"] == pytest.approx(points["nih"]["threshold"])
    assert record["temperature"] == pytest.approx(points["nih"]["temperature"])
    assert main(["predict", str(new / "best.pt"), str(image), "--site", "elsewhere"]) == 2
    err = capsys.readouterr().err
    assert "--site elsewhere" in err and "nih, source" in err
    assert json.loads((new / "adaptation.json").read_text())["operating_points"]["nih"] == points["nih"]
    assert main(["evaluate", str(new), "--data", str(tmp_path / "site"), "--name", "here", "--site", "nih",
                 "--no-cache"]) == 0
    m = json.loads((new / "metrics_here.json").read_text())
    assert m["threshold"] == pytest.approx(points["nih"]["threshold"]) and m["operating_point"]["site"] == "nih"
