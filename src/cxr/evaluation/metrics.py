"""Pure functions of label and probability arrays. Class 1 (PNEUMONIA) is the positive class."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from ..config import CLASSES


def classification_metrics(y_true, prob, threshold: float = 0.5, classes=CLASSES) -> dict:
    """Accuracy, per-class accuracy with counts, confusion matrix (rows true, columns predicted,
    in `classes` order) and ROC AUC of P(class 1); AUC is None when only one class is present."""
    y_true = np.asarray(y_true, dtype=int)
    prob = np.asarray(prob, dtype=float)
    y_pred = (prob >= threshold).astype(int)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    per_class = {}
    for i, name in enumerate(classes):
        total = int(cm[i].sum())
        per_class[name] = {"accuracy": float(cm[i, i] / total) if total else None,
                           "correct": int(cm[i, i]), "total": total}
    n = int(cm.sum())
    auc = float(roc_auc_score(y_true, prob)) if len(np.unique(y_true)) == 2 else None
    return {
        "n": n,
        "accuracy": float(np.trace(cm) / n) if n else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "roc_auc": auc,
        "threshold": float(threshold),
    }


# --- clinical metrics at a threshold, with bootstrap intervals -------------------------------

THRESHOLD_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy", "accuracy")
RANKING_METRICS = ("roc_auc", "pr_auc")


def point_metrics(y_true, prob, threshold: float) -> dict[str, float | None]:
    """Sensitivity (pneumonia recall), specificity, PPV, NPV, F1, balanced accuracy, accuracy at
    `threshold`, and ROC AUC and PR AUC (average precision) of P(PNEUMONIA), via scikit-learn."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob, dtype=float)
    pred = (p >= threshold).astype(int)
    both = len(np.unique(y)) == 2
    z = dict(zero_division=np.nan)
    out = {
        "sensitivity": recall_score(y, pred, pos_label=1, **z),
        "specificity": recall_score(y, pred, pos_label=0, **z),
        "ppv": precision_score(y, pred, pos_label=1, **z),
        "npv": precision_score(y, pred, pos_label=0, **z),
        "f1": f1_score(y, pred, pos_label=1, **z),
        "balanced_accuracy": balanced_accuracy_score(y, pred) if both else np.nan,
        "accuracy": float((pred == y).mean()) if len(y) else np.nan,
        "roc_auc": roc_auc_score(y, p) if both else np.nan,
        "pr_auc": average_precision_score(y, p) if both else np.nan,
    }
    return {k: (None if v is None or np.isnan(v) else float(v)) for k, v in out.items()}


def _rates(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Threshold metrics for many resamples at once: y, pred are (N,) 0/1 arrays, w (R, N) the
    number of times each image is in each resample. Same definitions as `point_metrics` (a test
    checks they agree); vectorised for the bootstrap."""
    tp = (w * ((pred == 1) & (y == 1))).sum(1)
    tn = (w * ((pred == 0) & (y == 0))).sum(1)
    fp = (w * ((pred == 1) & (y == 0))).sum(1)
    fn = (w * ((pred == 0) & (y == 1))).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sens, spec = tp / (tp + fn), tn / (tn + fp)
        return {"sensitivity": sens, "specificity": spec, "ppv": tp / (tp + fp), "npv": tn / (tn + fn),
                "f1": 2 * tp / (2 * tp + fp + fn), "balanced_accuracy": (sens + spec) / 2,
                "accuracy": (tp + tn) / w.sum(1)}


def _ranking(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """ROC AUC and average precision for many resamples at once: y, p are (N,), w (R, N) image
    counts per resample (every resample holding both classes). The same values as scikit-learn's
    roc_auc_score and average_precision_score on the resampled arrays (a test checks it, ties
    included). The scores never change between resamples, only the counts, so the images are
    sorted once and grouped by equal score:
    - ROC AUC is the Mann-Whitney statistic: each positive beats the negatives of lower groups
      and ties its own group's negatives for one half;
    - AP is the mean over positives of the precision at that positive's score, where the
      threshold takes in every image scoring at least as high (ties together)."""
    order = np.argsort(-p, kind="stable")  # highest score first
    ps, ys, ws = p[order], y[order], w[:, order].astype(float)
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])  # first image of each equal-score group
    pos = np.add.reduceat(ws * (ys == 1), starts, axis=1)  # (R, groups) positives per group
    neg = np.add.reduceat(ws * (ys == 0), starts, axis=1)
    n1, n0 = pos.sum(1), neg.sum(1)
    neg_below = n0[:, None] - np.cumsum(neg, 1)  # negatives in strictly lower groups
    with np.errstate(divide="ignore", invalid="ignore"):
        roc = (pos * (neg_below + 0.5 * neg)).sum(1) / (n1 * n0)
        # precision at each group's score, ties in (a group of images drawn 0 times adds nothing)
        precision = np.cumsum(pos, 1) / np.maximum(np.cumsum(pos + neg, 1), 1e-300)
        ap = (pos * precision).sum(1) / n1
    return {"roc_auc": roc, "pr_auc": ap}


def resample_counts(y, groups, n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(R, N) how many times each image is in each of `n_boot` resamples, and what was resampled.
    Whole groups (patients) are drawn with replacement and every image of a drawn patient comes
    along, whatever its class: images of one patient are not independent, so resampling them one
    by one would make the intervals too narrow. Stratified: each patient belongs to the class most
    of their images have (ties: the lower class index), and each stratum keeps its number of
    patients. A patient with images of both classes is one cluster, not two. Without `groups`
    each image is its own group (the plain stratified bootstrap)."""
    y = np.asarray(y, dtype=int)
    groups = np.arange(len(y)) if groups is None else np.asarray([str(g) for g in groups])
    units, which = np.unique(groups, return_inverse=True)
    tally = np.zeros((len(units), int(y.max(initial=0)) + 1))
    np.add.at(tally, (which, y), 1)
    stratum = tally.argmax(1)
    drawn = np.zeros((n_boot, len(units)))
    for c in np.unique(stratum):
        members = np.flatnonzero(stratum == c)
        drawn[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)), size=n_boot)
    unit = "images" if len(units) == len(y) else "patients"
    return drawn[:, which], unit


def bootstrap_metrics(y_true, prob, thresholds: dict[str, float], n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95, groups=None) -> dict[str, dict]:
    """Point estimates and percentile bootstrap intervals, resampling patients (with all their
    images) within their class stratum when `groups` gives each image's patient (resample_counts),
    seeded. A threshold may be an array, one per image (e.g. pooled cross-validation folds, each
    with its own threshold); its "threshold" is then None. Returns {name: {"threshold",
    "resampled", metric: {"value", "ci"}}} per threshold."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob, dtype=float)
    w, unit = resample_counts(y, groups, n_boot, np.random.default_rng(seed))
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(samples: np.ndarray) -> list[float] | None:
        samples = samples[~np.isnan(samples)]
        return [float(np.percentile(samples, lo)), float(np.percentile(samples, hi))] if len(samples) else None

    both = len(np.unique(y)) == 2
    ranking = _ranking(y, p, w) if both else {m: np.array([np.nan]) for m in RANKING_METRICS}
    result = {}
    for name, t in thresholds.items():
        point = point_metrics(y, p, t)
        samples = {**_rates(y, (p >= t).astype(int), w), **ranking}
        cells = {m: {"value": point[m], "ci": interval(samples[m])} for m in (*THRESHOLD_METRICS, *RANKING_METRICS)}
        for m, n in _denominators(y, (p >= t).astype(int)).items():
            cell = cells[m]
            # every resample gives 1.0 (or 0.0): the bootstrap cannot show uncertainty at a bound,
            # so a zero-width [1, 1] would read as certainty; Wilson's score interval can
            if cell["ci"] and cell["ci"][0] == cell["ci"][1] and cell["value"] in (0.0, 1.0) and n:
                cell.update(ci=wilson_interval(round(cell["value"] * n), n, level), ci_method="wilson")
        result[name] = {"threshold": float(t) if np.ndim(t) == 0 else None, "resampled": unit, **cells}
    return result


def _denominators(y: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    """How many images each proportion counts (for an interval at 0 or 1)."""
    return {"accuracy": len(y), "sensitivity": int((y == 1).sum()), "specificity": int((y == 0).sum()),
            "ppv": int((pred == 1).sum()), "npv": int((pred == 0).sum())}


def wilson_interval(successes: int, n: int, level: float = 0.95) -> list[float]:
    """Wilson's score interval of a proportion (images counted as independent)."""
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    phat = successes / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def paired_difference(y_true, prob_a, threshold_a, prob_b, threshold_b, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95, groups=None) -> dict[str, dict]:
    """Model A minus model B on the same images: accuracy, sensitivity, specificity (each at its
    own threshold; arrays allowed, as in bootstrap_metrics) and ROC AUC, with percentile intervals
    of a paired bootstrap: one resample of patients (resample_counts) serves both models, so what
    the two share cancels. Returns {metric: {"value", "ci", "p_sign"}}; p_sign is the share of
    resamples in which the difference has the other sign than its value (a rough two-sided check:
    doubled, and at least 1/n_boot)."""
    y = np.asarray(y_true, dtype=int)
    pa, pb = np.asarray(prob_a, dtype=float), np.asarray(prob_b, dtype=float)
    w, _ = resample_counts(y, groups, n_boot, np.random.default_rng(seed))
    ra = _rates(y, (pa >= threshold_a).astype(int), w)
    rb = _rates(y, (pb >= threshold_b).astype(int), w)
    qa, qb = point_metrics(y, pa, threshold_a), point_metrics(y, pb, threshold_b)
    samples = {m: ra[m] - rb[m] for m in ("accuracy", "sensitivity", "specificity")}
    # a metric of one model undefined (no image of the class it counts): the difference is too
    values = {m: None if qa[m] is None or qb[m] is None else qa[m] - qb[m] for m in samples}
    if len(np.unique(y)) == 2:
        samples["roc_auc"] = _ranking(y, pa, w)["roc_auc"] - _ranking(y, pb, w)["roc_auc"]
        values["roc_auc"] = qa["roc_auc"] - qb["roc_auc"]
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = {}
    for m, d in samples.items():
        if values[m] is None:
            out[m] = {"value": None, "ci": None, "p_sign": None}
            continue
        d = d[~np.isnan(d)]
        other = float(np.mean(d < 0) if values[m] >= 0 else np.mean(d > 0)) if len(d) else float("nan")
        out[m] = {"value": float(values[m]),
                  "ci": [float(np.percentile(d, lo)), float(np.percentile(d, hi))] if len(d) else None,
                  "p_sign": min(1.0, max(2 * other, 1 / n_boot))}
    return out


# --- operating point and calibration -------------------------------------------------------------

def youden_threshold(y_true, prob) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1 on (y_true, prob).
    Placed halfway between the maximising score and the next lower one, so it sits in the gap
    between the two groups rather than on one image's score."""
    # Every distinct score is a candidate: with roc_curve's default drop_intermediate=True the
    # "next lower" threshold can skip several negatives and the midpoint falls off the maximum.
    fpr, tpr, thr = roc_curve(y_true, prob, drop_intermediate=False)
    i = int(np.argmax(tpr - fpr))
    upper = min(float(thr[i]), 1.0)
    lower = float(thr[i + 1]) if i + 1 < len(thr) else 0.0
    return (upper + lower) / 2


def sensitivity_threshold(y_true, prob, target: float) -> float:
    """The highest threshold whose sensitivity on (y_true, prob) reaches `target`."""
    pos = np.sort(np.asarray(prob, dtype=float)[np.asarray(y_true) == 1])
    if len(pos) == 0:
        raise ValueError("no positive examples to set a sensitivity target on")
    k = int(np.floor((1 - target) * len(pos) + 1e-9))  # at most k positives may fall below
    return float(pos[min(k, len(pos) - 1)])


def expected_calibration_error(y_true, prob, n_bins: int = 15) -> tuple[float, list[dict]]:
    """ECE of P(PNEUMONIA) over equal-width bins: sum over bins of (share of images) x
    |observed pneumonia rate - mean predicted probability|. Also returns the bins (for a diagram)."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(prob, dtype=float)
    which = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece, bins = 0.0, []
    for b in range(n_bins):
        mask = which == b
        if mask.any():
            gap = abs(y[mask].mean() - p[mask].mean())
            ece += mask.mean() * gap
            bins.append({"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": int(mask.sum()),
                         "mean_prob": float(p[mask].mean()), "observed": float(y[mask].mean())})
    return float(ece), bins


def ece_interval(y_true, prob, groups=None, n_bins: int = 15, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of expected_calibration_error, resampling patients with all
    their images (resample_counts), the bins fixed."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(prob, dtype=float)
    w, _ = resample_counts(y.astype(int), groups, n_boot, np.random.default_rng(seed))
    onehot = np.eye(n_bins)[np.minimum((p * n_bins).astype(int), n_bins - 1)]  # (N, B)
    count, pred, seen = w @ onehot, (w * p) @ onehot, (w * y) @ onehot  # (R, B) each
    ece = np.abs(seen - pred).sum(1) / count.sum(1)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return [float(np.percentile(ece, lo)), float(np.percentile(ece, hi))]


def fit_temperature(logits, labels, max_iter: int = 100) -> float:
    """Temperature T minimising the negative log-likelihood of softmax(logits / T) (Guo et al.,
    2017), fitted by L-BFGS on log T and kept within [0.05, 100] (a model that separates nothing
    drives T to infinity). Never worse than T = 1 on the data it is fitted on."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(np.clip(float(log_t.detach().exp()), 0.05, 100.0))
    with torch.no_grad():
        if not np.isfinite(t) or F.cross_entropy(z / t, y) > F.cross_entropy(z, y):
            return 1.0
    return t


def format_auc(value: float | None) -> str:
    """A ROC AUC as the logs print it: 4 decimals, or why there is none."""
    return "undefined (one class)" if value is None else f"{value:.4f}"
