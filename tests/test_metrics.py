import numpy as np
import pytest

from cxr.evaluation.metrics import (
    _ranking,
    _rates,
    bootstrap_metrics,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    point_metrics,
    sensitivity_threshold,
    youden_threshold,
)


def test_metrics_match_hand_computed_values():
    y = [0, 0, 0, 1, 1, 1, 1]
    p = [0.1, 0.6, 0.2, 0.9, 0.8, 0.4, 0.7]
    m = classification_metrics(y, p)
    assert m["confusion_matrix"] == [[2, 1], [1, 3]]
    assert m["n"] == 7 and m["accuracy"] == pytest.approx(5 / 7)
    assert m["per_class"]["NORMAL"] == {"accuracy": pytest.approx(2 / 3), "correct": 2, "total": 3}
    assert m["per_class"]["PNEUMONIA"] == {"accuracy": pytest.approx(3 / 4), "correct": 3, "total": 4}
    # 12 positive/negative pairs; only 0.4 < 0.6 is ranked wrongly
    assert m["roc_auc"] == pytest.approx(11 / 12)


def test_threshold_moves_decisions():
    m = classification_metrics([0, 1], [0.3, 0.35], threshold=0.32)
    assert m["confusion_matrix"] == [[1, 0], [0, 1]] and m["threshold"] == 0.32


def test_single_class_has_no_auc():
    m = classification_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert m["roc_auc"] is None
    assert m["per_class"]["NORMAL"] == {"accuracy": None, "correct": 0, "total": 0}

Y = np.array([0, 0, 0, 1, 1, 1, 1])
P = np.array([0.1, 0.6, 0.2, 0.9, 0.8, 0.4, 0.7])


def test_clinical_metrics_by_hand():
    m = point_metrics(Y, P, 0.5)  # TP 3, FN 1, TN 2, FP 1
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["ppv"] == pytest.approx(3 / 4)
    assert m["npv"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert m["roc_auc"] == pytest.approx(11 / 12)
    # average precision: recall steps of 1/4 at precisions 1, 1, 1, then 4/5 (0.6 is a false positive)
    assert m["pr_auc"] == pytest.approx(0.25 * (1 + 1 + 1 + 0.8))


def test_vectorised_rates_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    p = rng.random(40)
    w = rng.integers(0, 4, (5, 40))  # image counts of 5 resamples
    rates = _rates(y, (p >= 0.4).astype(int), w)
    for r in range(5):
        expected = point_metrics(np.repeat(y, w[r]), np.repeat(p, w[r]), 0.4)
        for name, values in rates.items():
            assert values[r] == pytest.approx(expected[name]), name


@pytest.mark.parametrize("levels", [None, 5, 2])  # continuous scores, and heavy ties
def test_vectorised_ranking_metrics_equal_sklearn(levels):
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(levels or 0)
    y = rng.permutation(np.r_[np.zeros(30, int), np.ones(50, int)])
    p = rng.random(80) * 0.7 + 0.3 * y
    if levels:
        p = np.round(p * levels) / levels
    w = rng.integers(0, 3, (40, 80))
    w[:, :2] += 1
    got = _ranking(y, p, w)
    for r in range(len(w)):
        yr, pr = np.repeat(y, w[r]), np.repeat(p, w[r])
        assert got["roc_auc"][r] == pytest.approx(roc_auc_score(yr, pr), abs=1e-12)
        assert got["pr_auc"][r] == pytest.approx(average_precision_score(yr, pr), abs=1e-12)


@pytest.mark.slow
def test_bootstrap_covers_the_true_value_about_95_percent_of_the_time():
    # Specificity of a known model: each normal image is called normal with probability 0.8.
    rng = np.random.default_rng(7)
    covered = []
    for trial in range(200):
        y = np.r_[np.zeros(80, int), np.ones(40, int)]
        p = np.where(y == 0, rng.random(120) < 0.2, rng.random(120) < 0.9).astype(float)
        ci = bootstrap_metrics(y, p, {"t": 0.5}, n_boot=400, seed=trial)["t"]["specificity"]["ci"]
        covered.append(ci[0] <= 0.8 <= ci[1])
    assert 0.89 <= np.mean(covered) <= 0.99  # a 50% interval would cover about half the time


def test_patients_are_resampled_together_so_copies_widen_the_interval():
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(30, int), np.ones(30, int)]
    p = np.clip(0.3 * y + rng.random(60) * 0.7, 0, 1)
    ys, ps = np.repeat(y, 4), np.repeat(p, 4)  # each patient imaged 4 times, identically
    patients = np.repeat(np.arange(60), 4)
    independent = bootstrap_metrics(ys, ps, {"t": 0.5}, seed=0)["t"]
    clustered = bootstrap_metrics(ys, ps, {"t": 0.5}, seed=0, groups=patients)["t"]
    alone = bootstrap_metrics(y, p, {"t": 0.5}, seed=0)["t"]
    assert independent["resampled"] == "images" and clustered["resampled"] == "patients"
    for m in ("specificity", "accuracy", "roc_auc"):
        width = {k: v[m]["ci"][1] - v[m]["ci"][0] for k, v in
                 {"independent": independent, "clustered": clustered, "alone": alone}.items()}
        assert width["clustered"] > 1.5 * width["independent"], m  # 240 images are only 60 patients
        assert width["clustered"] == pytest.approx(width["alone"], rel=0.25), m  # as wide as 60 images
    # every patient of a class is drawn as often as the class has patients
    from cxr.evaluation.metrics import resample_counts

    w, _ = resample_counts(ys, patients, 50, np.random.default_rng(0))
    assert (w[:, ys == 0].sum(1) == 120).all() and (w.reshape(50, 60, 4).std(2) == 0).all()


def test_a_patient_with_images_of_both_classes_is_one_cluster():
    from cxr.evaluation.metrics import resample_counts

    # patient "m" has two NORMAL images and one PNEUMONIA image: one cluster in the NORMAL stratum
    y = np.array([0, 0, 1, 0, 0, 1, 1, 1])
    patients = np.array(["m", "m", "m", "a", "b", "c", "d", "e"])
    w, unit = resample_counts(y, patients, 400, np.random.default_rng(0))
    assert unit == "patients"
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 0] == w[:, 2]).all()  # all of m's images move together
    assert (w[:, [0, 3, 4]].sum(1) == 3).all()  # NORMAL stratum: m, a, b, three patients drawn
    assert (w[:, 5:].sum(1) == 3).all()  # PNEUMONIA stratum: c, d, e
    assert w[:, 0].max() >= 2  # m is drawn with replacement like anyone else


def test_bootstrap_intervals_contain_the_point_estimate_and_are_seeded():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(60, int), np.ones(140, int)]
    p = np.clip(0.35 * y + rng.random(200) * 0.65, 0, 1)
    a = bootstrap_metrics(y, p, {"0.5": 0.5, "op": 0.6}, n_boot=1000, seed=3)
    b = bootstrap_metrics(y, p, {"0.5": 0.5, "op": 0.6}, n_boot=1000, seed=3)
    assert a == b
    for block in a.values():
        for name, cell in block.items():
            if name in ("threshold", "resampled"):
                continue
            lo, hi = cell["ci"]
            assert lo <= cell["value"] <= hi and lo < hi, name


def test_youden_threshold_sits_in_the_gap():
    # best J: above 0.6 (the highest normal) and at 0.7 (a pneumonia); halfway between
    assert youden_threshold(Y, P) == pytest.approx(0.65)


def test_sensitivity_threshold_is_the_highest_that_reaches_the_target():
    assert sensitivity_threshold(Y, P, 0.95) == pytest.approx(0.4)  # needs all four positives
    assert sensitivity_threshold(Y, P, 0.75) == pytest.approx(0.7)
    assert point_metrics(Y, P, sensitivity_threshold(Y, P, 0.75))["sensitivity"] >= 0.75


def test_ece_by_hand():
    y = np.array([0, 1, 1, 1])
    p = np.array([0.1, 0.1, 0.9, 0.9])  # bin 0.0-0.2: mean p .1, observed .5; bin .8-1.0: .9 vs 1
    ece, bins = expected_calibration_error(y, p, n_bins=5)
    assert ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    assert [b["count"] for b in bins] == [2, 2]


def test_temperature_scaling_softens_an_overconfident_model_and_lowers_nll():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    clean = np.where(y[:, None] == np.arange(2), 1.0, -1.0) + rng.normal(0, 1.2, (400, 2))
    logits = 6 * clean  # far too confident
    t = fit_temperature(logits, y)
    nll = lambda t: float(F.cross_entropy(torch.tensor(logits) / t, torch.tensor(y)))  # noqa: E731
    assert t > 1.5 and nll(t) < nll(1.0)
    assert fit_temperature(logits / t, y) == pytest.approx(1.0, abs=0.05)  # already calibrated


def _best_j(y: np.ndarray, p: np.ndarray) -> float:
    """Youden's J maximised by brute force over every threshold that splits the scores."""
    return max(point_metrics(y, p, t)["sensitivity"] + point_metrics(y, p, t)["specificity"] - 1
               for t in np.append(np.unique(p), np.inf))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12))
def test_youden_threshold_reaches_the_maximum_of_j_with_ties_and_runs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 60))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    p = np.round(rng.random(n) * 0.5 + 0.4 * y, 1 + seed % 2)  # coarse rounding: many ties
    t = youden_threshold(y, p)
    j = point_metrics(y, p, t)["sensitivity"] + point_metrics(y, p, t)["specificity"] - 1
    assert j == pytest.approx(_best_j(y, p))


def test_youden_threshold_on_runs_of_one_class():
    # roc_curve's drop_intermediate would merge the run of negatives 0.5-0.7 and put the midpoint
    # at 0.45, below three of them (J 0.25 instead of 0.75).
    y = np.array([0, 0, 1, 0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    t = youden_threshold(y, p)
    assert 0.7 < t <= 0.8 and _best_j(y, p) == pytest.approx(0.75)


def test_an_interval_at_a_bound_is_wilsons_not_a_point():
    from cxr.evaluation.metrics import wilson_interval

    y = np.r_[np.zeros(25, int), np.ones(25, int)]
    p = np.r_[np.linspace(0.0, 0.45, 25), np.linspace(0.55, 1.0, 25)]  # every image right: all rates 1.0
    block = bootstrap_metrics(y, p, {"t": 0.5}, seed=0)["t"]
    sens = block["sensitivity"]
    assert sens["value"] == 1.0 and sens["ci_method"] == "wilson"
    assert sens["ci"] == pytest.approx([0.8668, 1.0], abs=1e-4)  # Wilson, 25 of 25 (by hand: 25/(25+z^2))
    assert sens["ci"] == wilson_interval(25, 25) and block["accuracy"]["ci"][0] == pytest.approx(0.9287, abs=1e-4)
    assert "ci_method" not in block["roc_auc"]  # a ranking metric keeps its bootstrap interval
    mixed = bootstrap_metrics(y, np.r_[p[:20], 0.6 * np.ones(5), p[25:]], {"t": 0.5}, seed=0)["t"]
    assert "ci_method" not in mixed["specificity"] and mixed["specificity"]["ci"][0] < mixed["specificity"]["ci"][1]
