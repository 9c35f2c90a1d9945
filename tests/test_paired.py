"""Paired tests between two models on the same images (paired.py, metrics.paired_difference) and
`cxr compare`, checked against references written from the definitions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from cxr.cli import main
from cxr.config import make_config
from cxr.evaluation.compare import compare_runs, comparison_table
from cxr.evaluation.metrics import paired_difference
from cxr.evaluation.paired import delong, holm, mcnemar_exact
from cxr.training.model import build_model

from .helpers import SIZE, make_image_files, make_predictions_run, write_png


def delong_by_definition(y, pa, pb):
    """DeLong et al. (1988) from the definition: placements psi(X_i, Y_j) of every positive X_i
    against every negative Y_j (1 above, 1/2 tied, 0 below), their means per image (structural
    components V10, V01), and var(AUC_A - AUC_B) = c' (S10/m + S01/n) c with c = (1, -1)."""
    y = np.asarray(y)
    comps10, comps01, aucs = [], [], []
    for p in (pa, pb):
        x, z = p[y == 1], p[y == 0]
        psi = (x[:, None] > z[None, :]).astype(float) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        comps10.append(psi.mean(1))
        comps01.append(psi.mean(0))
    s10, s01 = np.cov(comps10), np.cov(comps01)
    c = np.array([1.0, -1.0])
    var = c @ s10 @ c / len(comps10[0]) + c @ s01 @ c / len(comps01[0])
    return aucs, var


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_equals_the_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150)
    pa = np.round(np.clip(0.3 * y + rng.normal(0.4, 0.2, 150), 0, 1), 1)  # rounded: many ties
    pb = np.round(np.clip(0.2 * y + 0.5 * pa + rng.normal(0.2, 0.2, 150), 0, 1), 2)
    r = delong(y, pa, pb)
    (auc_a, auc_b), var = delong_by_definition(y, pa, pb)
    assert r["auc_a"] == pytest.approx(auc_a, abs=1e-12) == roc_auc_score(y, pa)
    assert r["auc_b"] == pytest.approx(auc_b, abs=1e-12)
    assert r["se"] ** 2 == pytest.approx(var, abs=1e-12)
    from scipy import stats

    assert r["p"] == pytest.approx(2 * stats.norm.sf(abs(auc_a - auc_b) / np.sqrt(var)), abs=1e-9)


def test_mcnemar_exact_by_hand_and_without_discordance():
    a = np.array([True] * 5 + [True] + [False] * 9)  # A alone right on 1 image, B alone on 9
    b = np.array([True] * 5 + [False] + [True] * 9)
    r = mcnemar_exact(a, b)
    assert (r["a_only"], r["b_only"]) == (1, 9)
    assert r["p"] == pytest.approx(2 * (1 + 10) / 2 ** 10)  # two-sided binomial(10, 1/2) at <= 1
    assert mcnemar_exact(a, a)["p"] == 1.0


@pytest.mark.parametrize("a_only, b_only", [(0, 1), (1, 9), (7, 7), (3, 12), (20, 31), (0, 40), (55, 45)])
def test_mcnemar_exact_equals_scipys_binomial_test(a_only, b_only):
    from scipy.stats import binomtest

    both = 11
    a = np.array([True] * both + [True] * a_only + [False] * b_only)
    b = np.array([True] * both + [False] * a_only + [True] * b_only)
    expected = binomtest(a_only, a_only + b_only, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(a, b)["p"] == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5] and holm([0.6, 0.9]) == [1.0, 1.0]


def test_a_real_difference_is_found_and_no_difference_is_not():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 150)
    good = np.clip(0.5 * y + rng.normal(0.25, 0.15, 300), 0, 1)
    shuffled = rng.permutation(good)  # the same scores on the wrong images: AUC near 0.5
    r = delong(y, good, shuffled)
    assert r["p"] < 0.01 and r["ci"][0] > 0
    assert mcnemar_exact((good >= 0.5) == y, (shuffled >= 0.5) == y)["p"] < 0.01
    same = delong(y, good, good)
    assert same["p"] == 1.0 and same["ci"][0] <= 0 <= same["ci"][1]
    d = paired_difference(y, good, 0.5, good, 0.5, 200, 0)
    assert d["accuracy"]["value"] == 0 and d["accuracy"]["ci"] == [0, 0]


@pytest.mark.slow
def test_paired_bootstrap_interval_covers_the_true_difference_at_about_95_percent():
    """200 synthetic paired studies of 120 patients (one to three images each, correlated within
    a patient and between the models); the true accuracy difference is known by construction."""
    rng = np.random.default_rng(42)
    covered = 0
    for study in range(200):
        n_patients = 120
        sizes = rng.integers(1, 4, n_patients)
        groups = np.repeat(np.arange(n_patients), sizes)
        y = np.repeat(rng.integers(0, 2, n_patients), sizes)
        hard = np.repeat(rng.random(n_patients), sizes)  # a patient's images are alike
        u = rng.random(len(y))
        right_a = (0.6 * hard + 0.4 * u) < 0.85  # P = 0.85 * ... : the same latent for both models
        right_b = (0.6 * hard + 0.4 * u) < 0.75
        true = _true_accuracy(0.85) - _true_accuracy(0.75)
        pa, pb = np.where(right_a, y, 1 - y).astype(float), np.where(right_b, y, 1 - y).astype(float)
        ci = paired_difference(y, pa, 0.5, pb, 0.5, 300, study, groups=groups)["accuracy"]["ci"]
        covered += ci[0] <= true <= ci[1]
    assert 0.90 <= covered / 200 <= 0.99


def _true_accuracy(t: float, n: int = 400_000) -> float:
    """P(0.6 H + 0.4 U < t) for H, U uniform, by simulation with a fixed seed."""
    rng = np.random.default_rng(7)
    return float(((0.6 * rng.random(n) + 0.4 * rng.random(n)) < t).mean())


def _evaluated_run(root: Path, name: str, data: Path, probs: dict[str, float], threshold: float = 0.5) -> Path:
    run = root / name
    run.mkdir(parents=True)
    rows = ["path,true_label,predicted_label,prob_pneumonia"]
    for p, prob in probs.items():
        label = "PNEUMONIA" if "PNEUMONIA" in p else "NORMAL"
        rows.append(f"{p},{label},{'PNEUMONIA' if prob >= threshold else 'NORMAL'},{prob}")
    (run / "predictions.csv").write_text("\n".join(rows) + "\n")
    (run / "metrics.json").write_text(json.dumps({"threshold": threshold}))
    return run


def test_cxr_compare_writes_the_tests_and_refuses_other_images(tmp_path, capsys):
    data = tmp_path / "set"
    paths = []
    for i in range(40):
        cls = "PNEUMONIA" if i % 2 else "NORMAL"
        path = data / cls / f"person{i // 2}_virus_{i}.png" if i % 2 else data / cls / f"IM-{i:04d}-0001.png"
        write_png(path, i)
        paths.append(str(path))
    rng = np.random.default_rng(0)
    a = {p: float(np.clip(0.6 * ("PNEUMONIA" in p) + rng.normal(0.2, 0.1), 0, 1)) for p in paths}
    b = {p: float(rng.random()) for p in reversed(paths)}  # another order: matched by content
    run_a, run_b = _evaluated_run(tmp_path, "a", data, a), _evaluated_run(tmp_path, "b", data, b)
    assert main(["compare", str(run_a), str(run_b), "--out", str(tmp_path / "cmp")]) == 0
    result = json.loads((tmp_path / "cmp" / "comparisons.json").read_text())
    (pair,) = result["pairs"]
    assert set(pair["tests"]) == {"roc_auc", "accuracy", "sensitivity", "specificity"}
    y = np.array([1 if "PNEUMONIA" in p else 0 for p in paths])
    assert pair["tests"]["roc_auc"]["auc_a"] == pytest.approx(roc_auc_score(y, [a[p] for p in paths]))
    assert pair["tests"]["roc_auc"]["auc_b"] == pytest.approx(roc_auc_score(y, [b[p] for p in paths]))
    assert all(t["p_holm"] >= t["p"] for t in pair["tests"].values())
    assert "Holm across all 4 p-values" in (tmp_path / "cmp" / "comparisons.md").read_text()
    # a run evaluated on another image is refused in one line
    write_png(tmp_path / "other" / "NORMAL" / "IM-9999-0001.png", 999)
    c = dict(a)
    c.pop(paths[0])
    c[str(tmp_path / "other" / "NORMAL" / "IM-9999-0001.png")] = 0.1
    run_c = _evaluated_run(tmp_path, "c", data, c)
    capsys.readouterr()
    assert main(["compare", str(run_a), str(run_c)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evaluated on other images" in err and "2 differ" in err
    assert main(["compare", str(run_a), str(run_b), "--set", "official_half"]) == 2
    assert "was not evaluated on the external set official_half" in capsys.readouterr().err


# --- where a test is undefined: one positive, one class ---------------------------------------------

def test_delong_with_one_positive_has_no_p_and_the_table_says_why():
    y = np.array([0, 0, 0, 0, 0, 1])  # the audit's 6-image example
    a = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9])
    b = np.array([0.5, 0.4, 0.3, 0.2, 0.95, 0.6])
    r = delong(y, a, b)
    assert r["p"] is None and r["se"] is None and r["ci"] is None and "two images of each class" in r["undefined"]
    assert holm([0.01, None, 0.04]) == [pytest.approx(0.02), None, pytest.approx(0.04)]  # None is no member

def test_compare_on_a_set_with_one_positive_reports_the_auc_test_undefined(tmp_path):
    names = [f"IM-{i:04d}-0001.png" for i in range(9)] + ["person1_virus_1.png"]
    paths = make_image_files(tmp_path, names)
    y = np.r_[np.zeros(9, int), 1]
    rng = np.random.default_rng(0)
    a = make_predictions_run(tmp_path, "a", paths, y, rng.random(10))
    b = make_predictions_run(tmp_path, "b", paths, y, rng.random(10))
    result = compare_runs([a, b])
    auc = result["pairs"][0]["tests"]["roc_auc"]
    assert auc["p"] is None and auc["p_holm"] is None
    table = comparison_table(result)
    assert "undefined" in table.split("roc_auc")[1].split("\n")[0] and "differ |" not in table

# --- the patient column: the unit resampled, said truthfully ----------------------------------------

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
    paths = make_image_files(tmp_path, names)
    with_ids = compare_runs([make_predictions_run(tmp_path, "a", paths, y, pa, patients=patients),
                             make_predictions_run(tmp_path, "b", paths, y, pb, patients=patients)])
    assert with_ids["patients"] == n_pat and with_ids["bootstrap"]["unit"].startswith("patients with all")
    acc = with_ids["pairs"][0]["tests"]["accuracy"]
    by_patient = paired_difference(y, pa, 0.5, pb, 0.5, 2000, 0, groups=patients)["accuracy"]["ci"]
    by_image = paired_difference(y, pa, 0.5, pb, 0.5, 2000, 0, groups=None)["accuracy"]["ci"]
    assert acc["ci"] == pytest.approx(by_patient) and acc["ci"] != pytest.approx(by_image)
    without = compare_runs([make_predictions_run(tmp_path, "c", paths, y, pa),
                            make_predictions_run(tmp_path, "d", paths, y, pb)])
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

# --- a one-class set --------------------------------------------------------------------------------

def test_a_one_class_set_is_compared_without_a_crash(tmp_path):
    paths = make_image_files(tmp_path, [f"person{i}_virus_{i}.png" for i in range(8)])
    y = np.ones(8, int)
    rng = np.random.default_rng(2)
    result = compare_runs([make_predictions_run(tmp_path, "a", paths, y, rng.random(8)),
                           make_predictions_run(tmp_path, "b", paths, y, rng.random(8))])
    tests = result["pairs"][0]["tests"]
    assert tests["roc_auc"]["p"] is None and tests["specificity"]["difference"] is None
    assert tests["sensitivity"]["p"] is not None and tests["accuracy"]["p_holm"] is not None
    assert "no NORMAL images" in comparison_table(result)

# --- the interval's level ---------------------------------------------------------------------------

def test_delongs_interval_is_the_two_sided_95_percent_one():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    a, b = rng.random(200) + 0.3 * y, rng.random(200) + 0.1 * y
    r = delong(y, a, b)
    half = (r["ci"][1] - r["ci"][0]) / 2
    assert half == pytest.approx(stats.norm.ppf(0.975) * r["se"]) and half == pytest.approx(1.959964 * r["se"], rel=1e-5)
