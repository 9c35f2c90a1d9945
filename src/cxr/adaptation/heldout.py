"""What `cxr adapt --evaluate K` gathers: the held-out predictions of every fold and draw, pooled
per row of the table (a variant with or without a site threshold, the nested choice), and their
summary: metrics with 95% intervals that resample patients, the paired difference from the source
on the same images, and every fitted model's numbers on the first site's sets.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ..config import CLASSES
from ..data.dataset import Sample
from ..evaluation.metrics import bootstrap_metrics, paired_difference

N_BOOTSTRAP = 1000
# The recipe cxr picks, estimated without bias: in each outer fold the variant with the highest ROC AUC on
# the training part's own validation patients is chosen, and only its predictions of the held fold count.
NESTED = ("nested choice", "nested choice+threshold")
PREDICTION_COLUMNS = ["per_class", "variant", "draw", "path", "patient", "true_label", "prob_pneumonia", "threshold"]


@dataclass(frozen=True)
class Decision:
    """A fitted model's predictions of the held fold under one operating point, and its numbers
    under the same point on each of the first site's sets."""

    prob: np.ndarray                 # P(pneumonia) of each held image, at the point's temperature
    threshold: float
    source_sets: dict[str, float]    # "{set}_accuracy", "{set}_roc_auc"


@dataclass
class HeldOut:
    """One row's held-out predictions (a variant, or the nested choice) at one size, pooled over
    folds and draws in the order made, and its fitted models' numbers on the first site's sets."""

    prob: list[np.ndarray] = field(default_factory=list)
    threshold: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    images: list[tuple[int, int]] = field(default_factory=list)   # (draw, index in the site sample)
    source_sets: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, decision: Decision, *, draw: int, held: np.ndarray, y: np.ndarray,
            patients: list[str]) -> None:
        """A fold's predictions: `held` indexes the site sample, whose labels and patients are `y`
        and `patients`."""
        self.prob.append(decision.prob)
        self.threshold.append(np.full(len(held), decision.threshold))
        self.labels.append(y[held])
        self.patients.extend(patients[i] for i in held)
        self.images.extend((draw, i) for i in held)
        for key, value in decision.source_sets.items():
            self.source_sets[key].append(value)


@dataclass
class Pooled:
    """What one number of adaptation images per class gathers over its folds and draws."""

    size: int | None
    rows: dict[str, HeldOut]     # per variant, with and without a site threshold, and the nested choice
    # per fold and draw: the variant its training part chose (adapt_evaluation.json's "nested")
    choices: list[dict] = field(default_factory=list)
    # per fold and draw: the adaptation images of each class
    used: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))


def summary_rows(pooled: Pooled, names: list[str], seed: int) -> list[dict]:
    """One row per name (a variant, the nested choice) at this size: pooled metrics with intervals that
    resample patients, the paired difference from the first (the source as trained) on the same
    images, and the fitted models' numbers on the first site's sets."""
    base = pooled.rows[names[0]]  # the source as trained, on the very same images in the same order
    base_prob, base_thr = np.concatenate(base.prob), np.concatenate(base.threshold)
    rows = []
    for name in names:
        held = pooled.rows[name]
        prob, thr = np.concatenate(held.prob), np.concatenate(held.threshold)
        labels = np.concatenate(held.labels)
        m = bootstrap_metrics(labels, prob, {"site": thr}, N_BOOTSTRAP, seed, groups=held.patients)["site"]
        d = paired_difference(labels, prob, thr, base_prob, base_thr, N_BOOTSTRAP, seed, groups=held.patients)
        rows.append({"per_class": pooled.size, "variant": name,
                     **({"nested": list(pooled.choices)} if name in NESTED else {}),
                     "adaptation_images": {c: [min(v), max(v)] for c, v in pooled.used.items()},
                     "thresholds": [float(thr.min()), float(thr.max())],
                     **{key: m[key] for key in ("accuracy", "sensitivity", "specificity", "roc_auc")},
                     "resampled": m["resampled"], "vs_source": d,
                     "source_sets": {key: {"mean": float(np.mean(v)), "min": float(np.min(v)),
                                           "max": float(np.max(v)), "models": len(v)}
                                     for key, v in held.source_sets.items()}})
    return rows


def prediction_rows(pooled: Pooled, names: list[str], samples: list[Sample], y: np.ndarray) -> list[tuple]:
    """adapt_predictions.csv's rows at this size (PREDICTION_COLUMNS): every held-out prediction of
    every named row and draw; `samples` and `y` are the site sample's."""
    size = "all" if pooled.size is None else pooled.size
    return [(size, name, r, samples[i].path, samples[i].patient, CLASSES[y[i]], f"{pr:.6f}", f"{t:.6f}")
            for name in names
            for (r, i), pr, t in zip(pooled.rows[name].images, np.concatenate(pooled.rows[name].prob),
                                     np.concatenate(pooled.rows[name].threshold))]
