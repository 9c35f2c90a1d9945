"""Pure functions of label and probability arrays. Class 1 (PNEUMONIA) is the positive class."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score

from .config import CLASSES


def classification_metrics(y_true, prob, threshold: float = 0.5) -> dict:
    """Accuracy, per-class accuracy with counts, confusion matrix (rows true, columns predicted,
    in CLASSES order) and ROC AUC of P(PNEUMONIA); AUC is None when only one class is present."""
    y_true = np.asarray(y_true, dtype=int)
    prob = np.asarray(prob, dtype=float)
    y_pred = (prob >= threshold).astype(int)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(CLASSES))))
    per_class = {}
    for i, name in enumerate(CLASSES):
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
