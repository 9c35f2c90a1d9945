"""The model's accuracy on images without labels, calibrated on its validation images.

- ATC, Average Thresholded Confidence (Garg et al., ICLR 2022): on validation, find the
  confidence t above which as many images lie as the model gets right; elsewhere, the share of
  images above t estimates the accuracy.
- DoC, Difference of Confidences (Guillory et al., ICCV 2021): validation accuracy minus the drop
  in mean confidence from validation to the new images.

Confidence is the probability of the class the model decides (at its stored threshold for two
classes). Both assume the new images are like validation up to a shift the confidences follow;
under other shifts both can be far off (ODP-Bench 2025), which is why `estimate_accuracy` works
on the images the out-of-distribution flag accepts and refuses to estimate when it flags many.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MAX_FLAGGED = 0.20  # above this share of flagged images (four times validation's 5%), no estimate is trusted
N_BOOTSTRAP = 1000


def decisions(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Class indices: P(class 1) >= threshold for two classes, the most probable class for more."""
    probs = np.asarray(probs)
    return (probs[:, 1] >= threshold).astype(int) if probs.shape[1] == 2 else probs.argmax(1)


def confidence(probs: np.ndarray, threshold: float) -> np.ndarray:
    """(N,) how sure the decision is, in [0.5, 1]: for two classes sigmoid(|logit(p) - logit(t)|) of
    P(class 1) = p against the threshold t, which is the decided class's probability when t = 0.5
    and, at any other threshold, still 0.5 at the threshold and rising with the margin (the decided
    class's plain probability would jump there); for more classes the highest probability."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[1] != 2:
        return probs.max(1)
    eps = 1e-12
    p, t = np.clip(probs[:, 1], eps, 1 - eps), min(max(threshold, eps), 1 - eps)
    margin = np.abs(np.log(p / (1 - p)) - np.log(t / (1 - t)))
    return 1.0 / (1.0 + np.exp(-margin))


@dataclass(frozen=True)
class Calibration:
    """Validation as the estimates need it: each image's confidence and whether it was decided right."""

    confidences: np.ndarray
    correct: np.ndarray

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if self.n else float("nan")

    @property
    def mean_confidence(self) -> float:
        return float(self.confidences.mean()) if self.n else float("nan")

    @property
    def atc_threshold(self) -> float:
        """The confidence t with mean(conf > t) == accuracy: the (1 - accuracy) quantile."""
        return float(np.quantile(self.confidences, 1.0 - self.accuracy)) if self.n else 0.5


def calibrate(probs: np.ndarray, labels: np.ndarray, threshold: float,
              accepted: np.ndarray | None = None) -> Calibration:
    """Validation's calibration; `accepted`: only the validation images the flag accepts, the
    population the estimates are made on elsewhere."""
    keep = np.ones(len(probs), bool) if accepted is None else np.asarray(accepted, bool)
    probs, labels = np.asarray(probs)[keep], np.asarray(labels)[keep]
    return Calibration(confidence(probs, threshold), decisions(probs, threshold) == labels)


def atc(conf: np.ndarray, cal: Calibration) -> float:
    return float((np.asarray(conf) > cal.atc_threshold).mean())


def doc(conf: np.ndarray, cal: Calibration) -> float:
    return float(np.clip(cal.accuracy - (cal.mean_confidence - np.asarray(conf).mean()), 0.0, 1.0))


@dataclass(frozen=True)
class Estimate:
    """The label-free accuracy of a set, on the images the flag accepted, with 95% intervals."""

    atc: float | None
    atc_ci: tuple[float, float] | None
    doc: float | None
    doc_ci: tuple[float, float] | None
    n: int
    n_accepted: int
    flagged_share: float
    trusted: bool
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_accuracy(probs: np.ndarray, threshold: float, cal: Calibration,
                      accepted: np.ndarray | None = None, seed: int = 0) -> Estimate:
    """ATC and DoC on the accepted images (all when `accepted` is None), with percentile bootstrap
    intervals over those images; no estimate (and a verdict saying why) when more than
    MAX_FLAGGED of the images were flagged or none is left."""
    probs = np.asarray(probs)
    n = len(probs)
    accepted = np.ones(n, bool) if accepted is None else np.asarray(accepted, bool)
    flagged = float(1.0 - accepted.mean()) if n else 0.0
    conf = confidence(probs[accepted], threshold) if accepted.any() else np.empty(0)
    if n == 0 or cal.n == 0:
        why = "no images to estimate on" if n == 0 else "no validation images to calibrate the estimate on"
        return Estimate(None, None, None, None, n, int(accepted.sum()), flagged, False, why)
    if not accepted.any() or flagged > MAX_FLAGGED:
        why = (f"{flagged:.0%} of the images are unlike the training images (more than {MAX_FLAGGED:.0%}): "
               "no estimate of accuracy can be trusted here; label some images to measure it")
        return Estimate(None, None, None, None, n, int(accepted.sum()), flagged, False, why)
    # intervals: resample the new images and validation together, recalibrating on each draw
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(conf), size=(N_BOOTSTRAP, len(conf)))
    vdraws = rng.integers(0, cal.n, size=(N_BOOTSTRAP, cal.n))
    vconf, vright = cal.confidences[vdraws], cal.correct[vdraws]
    vacc = vright.mean(1)
    vt = np.array([np.quantile(c, 1.0 - a) for c, a in zip(vconf, vacc)])
    boot_atc = (conf[draws] > vt[:, None]).mean(1)
    boot_doc = np.clip(vacc - (vconf.mean(1) - conf[draws].mean(1)), 0, 1)

    def ci(v: np.ndarray) -> tuple[float, float]:
        return float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))

    a, d = atc(conf, cal), doc(conf, cal)
    verdict = (f"estimated accuracy {a:.1%} (ATC; DoC {d:.1%}) on the {accepted.sum()} of {n} images the model "
               "accepts; an estimate, not a measurement: it holds only if the new images differ from "
               "validation in ways the model's confidence follows")
    return Estimate(a, ci(boot_atc), d, ci(boot_doc), n, int(accepted.sum()), flagged, True, verdict)
