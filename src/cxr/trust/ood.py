"""The out-of-distribution score of an image: how unlike the model's training images it is.

Multi-layer Mahalanobis (Lee et al., NeurIPS 2018, without their input perturbation or their
layer weights learnt on outliers): for each ResNet stage, the squared Mahalanobis distance of the
image's mean-pooled features to the nearest class mean of the training images, under one shared
covariance; each stage's distance is standardised by its mean and spread on the validation
images, and the score is their average. An image scoring above the threshold (the 95th
percentile of the validation images' scores, so 5% of validation images are flagged) is flagged.

Early stages see contrast, texture and noise, the last one what the classifier reads, so the
score flags a photograph, a page of text, an inverted film and another hospital's adults alike.
The covariance is shrunk (Ledoit-Wolf, scikit-learn): with 64-512 ReLU channels and about two
thousand images the plain estimate is near singular. pytorch-ood implements the same detector
(`MultiMahalanobis`); cxr computes the score itself because importing pytorch-ood takes seconds
(scipy.stats) on every `cxr predict`, and stores only tensors in the checkpoint;
`studies/ood_study.py` measures both side by side with pytorch-ood's other detectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .features import LAYERS

ACCEPT = 0.95  # share of in-distribution (validation) images the flag accepts
FORMAT = 1


def class_gaussians(z: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means (K, C) and the precision (C, C) of one shared, Ledoit-Wolf-shrunk covariance of
    the class-centred features, in float32 (float64 inside)."""
    from sklearn.covariance import LedoitWolf

    z = z.double()
    means = torch.stack([z[y == k].mean(0) if (y == k).any() else z.mean(0) for k in range(n_classes)])
    centred = (z - means[y]).numpy()
    precision = LedoitWolf(assume_centered=True).fit(centred).get_precision()
    return means.float(), torch.from_numpy(np.ascontiguousarray(precision)).float()


def mahalanobis(z: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(N,) squared Mahalanobis distance of each row of `z` to the nearest of `means`."""
    d = z.double()[:, None, :] - means.double()[None]             # (N, K, C)
    return torch.einsum("nkc,cd,nkd->nk", d, precision.double(), d).min(1).values


@dataclass(frozen=True)
class Detector:
    """The fitted score: per stage, class means and a precision; the standardisation of each
    stage's distance and the flag's threshold, both from validation."""

    layers: tuple[str, ...]
    means: tuple[torch.Tensor, ...]
    precisions: tuple[torch.Tensor, ...]
    center: torch.Tensor     # (L,) each stage's mean distance on validation
    scale: torch.Tensor      # (L,) and its standard deviation
    threshold: float         # a score above it is flagged
    accept: float = ACCEPT   # share of validation images at or below the threshold, as chosen

    def distances(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, L) squared distances, one column per stage."""
        return torch.stack([mahalanobis(features[name], m, p)
                            for name, m, p in zip(self.layers, self.means, self.precisions)], 1)

    def score(self, features: dict[str, torch.Tensor]) -> np.ndarray:
        """(N,) scores: the stages' standardised distances averaged; higher is less like training."""
        z = (self.distances(features) - self.center.double()) / self.scale.double()
        return z.mean(1).numpy()

    def in_distribution(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) <= self.threshold

    def to_dict(self) -> dict:
        return {"format": FORMAT, "method": "multi-layer Mahalanobis", "layers": list(self.layers),
                "means": list(self.means), "precisions": list(self.precisions), "center": self.center,
                "scale": self.scale, "threshold": float(self.threshold), "accept": float(self.accept)}

    @classmethod
    def from_dict(cls, d: dict) -> "Detector":
        return cls(tuple(d["layers"]), tuple(d["means"]), tuple(d["precisions"]), d["center"], d["scale"],
                   float(d["threshold"]), float(d.get("accept", ACCEPT)))


def fit_detector(train: dict[str, torch.Tensor], train_labels: torch.Tensor, val: dict[str, torch.Tensor],
                 n_classes: int, layers: tuple[str, ...] = LAYERS, accept: float = ACCEPT) -> Detector:
    """Class Gaussians on the training images' features; each stage's standardisation and the
    threshold (the `accept` quantile of the scores) on the validation images'."""
    means, precisions = zip(*(class_gaussians(train[name], train_labels, n_classes) for name in layers))
    partial = Detector(tuple(layers), means, precisions, torch.zeros(len(layers)), torch.ones(len(layers)), 0.0)
    d = partial.distances(val)
    center, scale = d.mean(0).float(), d.std(0).clamp_min(1e-6).float()
    scored = Detector(tuple(layers), means, precisions, center, scale, 0.0)
    threshold = float(np.quantile(scored.score(val), accept, method="higher"))
    return Detector(tuple(layers), means, precisions, center, scale, threshold, accept)


FLAG_WARNING = ("this image is not like the chest X-rays this model was trained on; its probability means little")
