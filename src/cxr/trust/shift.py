"""Has a set of images shifted away from the model's validation images? Two-sample tests
("Failing Loudly", Rabanser et al., NeurIPS 2019), each against the validation images stored in
the checkpoint:

- `outputs`: Kolmogorov-Smirnov on the model's predicted probabilities (black-box shift detection,
  BBSD; one test per class, Bonferroni-corrected, for more than two classes);
- `ood_score`: Mann-Whitney U, one-sided, on the out-of-distribution scores (are the new images
  further from the training images than validation is?);
- `features`: maximum mean discrepancy on the penultimate features (Gaussian kernel, median
  bandwidth) with a permutation p-value.

The verdict combines the three by Bonferroni: shifted when the smallest p-value times three is
below `alpha`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

ALPHA = 0.01
MIN_IMAGES = 5     # fewer: refused; no test says anything
FEW_IMAGES = 20    # fewer: a shift can go unseen (the power table in the manual)
PERMUTATIONS = 500
MAX_MMD_IMAGES = 1000  # larger sets are subsampled for the kernel test (a 1000 x 1000 kernel)


@dataclass(frozen=True)
class Test:
    name: str
    statistic: float
    p_value: float
    what: str

    def to_dict(self) -> dict:
        return asdict(self)


def outputs_test(probs: np.ndarray, reference: np.ndarray) -> Test:
    """KS on P(class k) per class (one for two classes), Bonferroni over the classes."""
    from scipy.stats import ks_2samp

    columns = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    results = [ks_2samp(probs[:, k], reference[:, k]) for k in columns]
    stat = max(r.statistic for r in results)
    p = min(1.0, min(r.pvalue for r in results) * len(results))
    return Test("outputs", float(stat), float(p), "Kolmogorov-Smirnov on the predicted probabilities (BBSD)")


def score_test(scores: np.ndarray, reference: np.ndarray) -> Test:
    from scipy.stats import mannwhitneyu

    r = mannwhitneyu(scores, reference, alternative="greater")
    auc = r.statistic / (len(scores) * len(reference))  # P(a new image scores above a validation image)
    return Test("ood_score", float(auc), float(r.pvalue),
                "Mann-Whitney U on the out-of-distribution scores (statistic: P(new > validation))")


def mmd_test(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, permutations: int = PERMUTATIONS,
             seed: int = 0) -> Test:
    """Unbiased MMD^2 between the rows of x and y, Gaussian kernel with the median pairwise
    distance as bandwidth, p-value from `permutations` random relabellings."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(np.asarray(x), dtype=torch.float64), torch.as_tensor(np.asarray(y), dtype=torch.float64)
    if len(y) > MAX_MMD_IMAGES:
        y = y[torch.randperm(len(y), generator=g)[:MAX_MMD_IMAGES]]
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    off = d2[~torch.eye(len(z), dtype=torch.bool)]
    kernel = torch.exp(-d2 / off.median().clamp_min(1e-12))
    kernel.fill_diagonal_(0.0)
    n, m = len(x), len(y)
    # every relabelling at once: row r of `first` marks the images drawn as the first sample
    first = torch.zeros(permutations + 1, n + m, dtype=torch.float64)
    first[0, :n] = 1.0
    for r in range(1, permutations + 1):
        first[r, torch.randperm(n + m, generator=g)[:n]] = 1.0
    second = 1.0 - first
    kf, ks = first @ kernel, second @ kernel
    stats = ((kf * first).sum(1) / (n * (n - 1)) + (ks * second).sum(1) / (m * (m - 1))
             - 2 * (kf * second).sum(1) / (n * m))
    observed = float(stats[0])
    exceed = int((stats[1:] >= stats[0]).sum())
    return Test("features", observed, (1 + exceed) / (1 + permutations),
                f"maximum mean discrepancy on the penultimate features ({permutations} permutations)")


def shifted_draws(probs: np.ndarray, reference_probs: np.ndarray, scores: np.ndarray, reference_scores: np.ndarray,
                  alpha: float = ALPHA) -> np.ndarray:
    """`compare(...).shifted` of many draws at once, the same p-values (scipy's tests along an axis):
    probs (D, n, K) and scores (D, n) of D draws against reference_probs (D or 1, m, K) and
    reference_scores (D or 1, m), the outputs and score tests combined by Bonferroni. (D,) bools."""
    from scipy.stats import ks_2samp, mannwhitneyu

    columns = [1] if probs.shape[2] == 2 else range(probs.shape[2])
    reference_probs = np.broadcast_to(reference_probs, (len(probs), *reference_probs.shape[1:]))
    ks = np.stack([ks_2samp(probs[:, :, k], reference_probs[:, :, k], axis=1).pvalue for k in columns])
    outputs_p = np.minimum(1.0, ks.min(0) * len(columns))
    score_p = mannwhitneyu(scores, np.broadcast_to(reference_scores, (len(scores), reference_scores.shape[1])),
                           alternative="greater", axis=1).pvalue
    return np.minimum(1.0, np.minimum(outputs_p, score_p) * 2) < alpha


@dataclass(frozen=True)
class ShiftResult:
    n: int
    n_reference: int
    tests: tuple[Test, ...]
    p_value: float          # the Bonferroni-combined p-value
    alpha: float
    shifted: bool
    flagged_share: float | None
    verdict: str

    def to_dict(self) -> dict:
        return {**asdict(self), "tests": [t.to_dict() for t in self.tests]}


def compare(probs: np.ndarray, reference_probs: np.ndarray, scores: np.ndarray | None = None,
            reference_scores: np.ndarray | None = None, features: np.ndarray | None = None,
            reference_features: np.ndarray | None = None, flagged_share: float | None = None,
            alpha: float = ALPHA, seed: int = 0) -> ShiftResult:
    """Every test the inputs allow, combined; `flagged_share`: the share of the new images the
    out-of-distribution flag refused (said in the verdict)."""
    n = len(probs)
    tests = [outputs_test(np.asarray(probs), np.asarray(reference_probs))]
    if scores is not None and reference_scores is not None:
        tests.append(score_test(np.asarray(scores), np.asarray(reference_scores)))
    if features is not None and reference_features is not None:
        tests.append(mmd_test(reference_features, features, seed=seed))
    p = min(1.0, min(t.p_value for t in tests) * len(tests))
    shifted = p < alpha
    verdict = (f"these {n} images differ from the model's validation images (p = {p:.2g} < {alpha:g})"
               if shifted else f"no shift detected between these {n} images and the model's validation images "
                               f"(p = {p:.2g})")
    fired = [t.name for t in tests if t.p_value * len(tests) < alpha]
    if fired == ["outputs"]:
        verdict += ("; only the predicted probabilities moved, which a different share of pneumonia among the "
                    "images also does")
    if not shifted and n < FEW_IMAGES:
        verdict += f"; with fewer than {FEW_IMAGES} images a real shift can go unseen"
    if flagged_share is not None:
        verdict += f"; {flagged_share:.0%} of them are flagged as unlike the training images"
    return ShiftResult(n, len(reference_probs), tuple(tests), p, alpha, shifted, flagged_share, verdict)
