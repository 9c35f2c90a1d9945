"""Is a difference between two models real? Paired tests on the same images (pure functions).

- ROC AUC: DeLong, DeLong & Clarke-Pearson (1988), Biometrics 44:837-845, in the fast midrank form
  of Sun & Xu (2014), IEEE Signal Processing Letters 21:1389-1393: the variance of the *paired*
  difference, from each image's structural components, so what the two models share cancels.
- Accuracy, sensitivity, specificity at each model's own threshold: McNemar's exact test on the
  discordant images (those one model gets right and the other wrong; a two-sided binomial test
  with p = 1/2), and a patient-level paired bootstrap interval (metrics.paired_difference).
- Holm's step-down correction across the comparisons of one report.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank."""
    return stats.rankdata(x, method="average")


def delong(y_true, prob_a, prob_b, level: float = 0.95) -> dict:
    """DeLong's test of AUC(A) = AUC(B) for two sets of scores of the same images.
    Returns {"auc_a", "auc_b", "difference", "se", "z", "p", "ci"} (ci: normal interval of the
    difference at `level`). Needs both classes; with fewer than two images of a class the variance
    cannot be estimated, and se, z, p and ci are None with the reason under "undefined" (never a p
    of 0 from a variance of nothing)."""
    y = np.asarray(y_true, dtype=int)
    scores = np.vstack([np.asarray(prob_a, dtype=float), np.asarray(prob_b, dtype=float)])
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError("DeLong's test needs images of both classes")
    aucs, v10, v01 = [], [], []
    for k in range(2):
        tz = _midranks(np.concatenate([pos[k], neg[k]]))
        tx, ty = _midranks(pos[k]), _midranks(neg[k])
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)        # each positive's share of negatives ranked below it
        v01.append(1 - (tz[m:] - ty) / m)    # each negative's share of positives ranked above it
    diff = aucs[0] - aucs[1]
    if m < 2 or n < 2:
        few = "positive" if m < 2 else "negative"
        return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": float(diff), "se": None, "z": None,
                "p": None, "ci": None,
                "undefined": f"DeLong's variance needs at least two images of each class ({m if m < 2 else n} {few})"}
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    se = float(np.sqrt(max(var, 0.0)))
    z = diff / se if se > 0 else (0.0 if diff == 0 else np.inf * np.sign(diff))
    p = float(2 * stats.norm.sf(abs(z))) if se > 0 else (1.0 if diff == 0 else 0.0)
    half = stats.norm.ppf(0.5 + level / 2) * se
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": float(diff), "se": se,
            "z": float(z), "p": p, "ci": [float(diff - half), float(diff + half)]}


def mcnemar_exact(correct_a, correct_b) -> dict:
    """McNemar's exact test: of the images exactly one model gets right, is each model equally
    likely to be that one? {"a_only", "b_only", "p"} (two-sided binomial, p = 1 without discordance)."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if a_only + b_only == 0 else float(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p": p}


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values, in the order given (family-wise error control). An
    undefined p (None) stays None and is no member of the family."""
    defined = [i for i, v in enumerate(pvalues) if v is not None]
    out: list[float | None] = [None] * len(pvalues)
    for i, adjusted in zip(defined, _holm([pvalues[i] for i in defined])):
        out[i] = adjusted
    return out


def apply_holm(tests: list[dict]) -> None:
    """Set each test's "p_holm": Holm across the defined p-values of `tests`, one family."""
    for t, adjusted in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = adjusted


def _holm(pvalues: list[float]) -> list[float]:
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()
