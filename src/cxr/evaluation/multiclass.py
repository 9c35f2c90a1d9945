"""Pure functions of labels and (N, K) probabilities for label sets of more than two classes
(labels.py: three-way). The decision is the argmax; each class is also read one-vs-rest
(sensitivity = its recall, specificity = the other classes' rate of not being called it, PPV, F1,
ROC AUC of its probability), with the macro ROC AUC (mean of the one-vs-rest AUCs, scikit-learn's
multi_class="ovr", average="macro"), balanced accuracy (mean recall) and Cohen's kappa. Intervals:
the patient bootstrap of metrics.resample_counts, one set of resamples for every number.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import cohen_kappa_score, confusion_matrix, roc_auc_score

from .metrics import _ranking, expected_calibration_error, resample_counts

PER_CLASS = ("sensitivity", "specificity", "ppv", "f1", "roc_auc")
OVERALL = ("accuracy", "balanced_accuracy", "kappa", "macro_roc_auc")


def _from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Every threshold metric from confusion matrices cm (..., K, K) (rows true, columns
    predicted; counts or bootstrap weights), as arrays over the leading axes."""
    cm = np.asarray(cm, dtype=float)
    total = cm.sum((-2, -1))
    diag = np.diagonal(cm, axis1=-2, axis2=-1)
    rows, cols = cm.sum(-1), cm.sum(-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = diag / rows
        fp = cols - diag
        negatives = total[..., None] - rows
        out = {"sensitivity": recall, "specificity": (negatives - fp) / negatives, "ppv": diag / cols,
               "f1": 2 * diag / (rows + cols)}
        accuracy = diag.sum(-1) / total
        expected = (rows * cols).sum(-1) / total ** 2  # chance agreement
        out.update(accuracy=accuracy, balanced_accuracy=np.nanmean(np.where(rows > 0, recall, np.nan), -1),
                   kappa=(accuracy - expected) / (1 - expected))
    return out


def multiclass_metrics(y_true, prob, classes) -> dict:
    """Point values at the argmax: n, accuracy, per_class {name: accuracy (= recall), correct,
    total, and the one-vs-rest metrics}, the K x K confusion matrix (rows true), macro ROC AUC
    ("roc_auc"; None unless every class is present), balanced accuracy and kappa."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob, dtype=float)
    k = len(classes)
    pred = p.argmax(1)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    rates = _from_confusion(cm)
    every = len(np.unique(y)) == k
    per_class = {}
    for i, name in enumerate(classes):
        one = (y == i).astype(int)
        auc = float(roc_auc_score(one, p[:, i])) if 0 < one.sum() < len(one) else None
        per_class[name] = {"accuracy": float(rates["sensitivity"][i]) if cm[i].sum() else None,
                           "correct": int(cm[i, i]), "total": int(cm[i].sum()),
                           **{m: _num(rates[m][i]) for m in ("sensitivity", "specificity", "ppv", "f1")},
                           "roc_auc": auc}
    macro = float(roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr", average="macro")) \
        if every else None
    return {"n": int(cm.sum()), "accuracy": _num(rates["accuracy"]), "per_class": per_class,
            "confusion_matrix": cm.tolist(), "roc_auc": macro, "decision": "argmax",
            "balanced_accuracy": _num(rates["balanced_accuracy"]),
            "kappa": float(cohen_kappa_score(y, pred, labels=list(range(k)))) if len(y) else None}


def _num(x) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def multiclass_bootstrap(y_true, prob, classes, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                         groups=None) -> dict:
    """{"resampled", "overall": {metric: {"value", "ci"}}, "per_class": {name: {metric: ...}}}:
    percentile intervals from resampling patients with all their images (resample_counts)."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob, dtype=float)
    k = len(classes)
    pred = p.argmax(1)
    w, unit = resample_counts(y, groups, n_boot, np.random.default_rng(seed))
    cell = np.eye(k * k)[y * k + pred]  # (N, K*K): which confusion cell each image adds to
    boot = _from_confusion((w @ cell).reshape(n_boot, k, k))
    point = _from_confusion(confusion_matrix(y, pred, labels=list(range(k))))
    aucs = np.full((n_boot, k), np.nan)
    point_auc = np.full(k, np.nan)
    for i in range(k):
        one = (y == i).astype(int)
        if 0 < one.sum() < len(one):
            aucs[:, i] = _ranking(one, p[:, i], w)["roc_auc"]
            point_auc[i] = roc_auc_score(one, p[:, i])
    boot["roc_auc"], point["roc_auc"] = aucs, point_auc
    boot["macro_roc_auc"] = aucs.mean(1)
    point["macro_roc_auc"] = point_auc.mean()
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def cell_of(value, samples) -> dict:
        samples = samples[~np.isnan(samples)]
        return {"value": _num(value),
                "ci": [float(np.percentile(samples, lo)), float(np.percentile(samples, hi))] if len(samples) else None}

    return {"resampled": unit,
            "overall": {m: cell_of(point[m], boot[m]) for m in OVERALL},
            "per_class": {name: {m: cell_of(point[m][i], boot[m][:, i]) for m in PER_CLASS}
                          for i, name in enumerate(classes)}}


def top_label_ece(y_true, prob, n_bins: int = 15) -> tuple[float, list[dict]]:
    """Top-label ECE and its bins: metrics.expected_calibration_error of "classified right"
    against the winning class's probability."""
    p = np.asarray(prob, dtype=float)
    return expected_calibration_error((p.argmax(1) == np.asarray(y_true)).astype(float), p.max(1), n_bins)


def top_label_calibration(y_true, prob, groups=None, n_bins: int = 15, n_boot: int = 1000, seed: int = 0,
                          level: float = 0.95) -> dict:
    """Multiclass (top-label) ECE: over equal-width bins of the winning class's probability, the
    share of images times |accuracy - mean winning probability| (Guo et al., 2017); with a
    patient-bootstrap interval (resamples stratified by the true class), and the bins."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob, dtype=float)
    confidence, correct = p.max(1), (p.argmax(1) == y).astype(float)
    ece, bins = top_label_ece(y, p, n_bins)
    w, _ = resample_counts(y, groups, n_boot, np.random.default_rng(seed))
    onehot = np.eye(n_bins)[np.minimum((confidence * n_bins).astype(int), n_bins - 1)]
    count, conf, right = w @ onehot, (w * confidence) @ onehot, (w * correct) @ onehot
    boot = np.abs(right - conf).sum(1) / count.sum(1)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {"ece": ece, "ece_ci": [float(np.percentile(boot, lo)), float(np.percentile(boot, hi))], "bins": bins,
            "definition": "top-label ECE: bins of the highest class probability, |accuracy - mean probability| "
                          "weighted by the share of images in each bin"}
