"""Fitting what a checkpoint needs to say whether an image, or a set, looks like its training
images: the detector (ood.py) and the validation images' outputs that the shift check and the
accuracy estimates compare against. Stored in the checkpoint under "trust", plain tensors only."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from .estimate import Calibration, calibrate
from .features import LAYERS, forward_with_features
from .ood import Detector, fit_detector

MAX_FIT_IMAGES = 2000   # training images the class Gaussians are fitted on (a stratified draw)
MAX_REFERENCE_FEATURES = 500  # validation images whose penultimate features the kernel test keeps
MIN_VALIDATION = 2      # fewer validation images cannot standardise a score: no statistics are stored
FEW_VALIDATION = 20     # fewer: the threshold is rough (said when training)


def stratified_draw(labels: torch.Tensor, limit: int, seed: int = 0) -> torch.Tensor:
    """Indices of at most `limit` images, each class in proportion, drawn with `seed`."""
    n = len(labels)
    if n <= limit:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    picked = []
    for k in labels.unique():
        idx = torch.nonzero(labels == k).flatten()
        take = max(1, round(limit * len(idx) / n))
        picked.append(idx[torch.randperm(len(idx), generator=g)[:take]])
    return torch.cat(picked).sort().values


@dataclass(frozen=True)
class Reference:
    """The model's validation images as the shift check and the estimates see them."""

    logits: torch.Tensor     # (N, K)
    labels: torch.Tensor     # (N,)
    scores: torch.Tensor     # (N,) out-of-distribution scores (float64; float32 in checkpoints stored before)
    features: torch.Tensor   # (M, 512) penultimate features of at most MAX_REFERENCE_FEATURES of them
    feature_rows: torch.Tensor | None = None  # (M,) which validation images those are (None: stored before)

    def probabilities(self, temperature: float) -> np.ndarray:
        return torch.softmax(self.logits.double() / temperature, 1).numpy()

    def calibration(self, threshold: float, temperature: float, accept_below: float | None = None) -> Calibration:
        """The estimates' calibration at this operating point; `accept_below`: the flag's threshold,
        so that only the validation images it accepts calibrate (estimates are made on those)."""
        accepted = None if accept_below is None else self.scores.numpy() <= accept_below
        return calibrate(self.probabilities(temperature), self.labels.numpy(), threshold, accepted)


@dataclass(frozen=True)
class Trust:
    """A checkpoint's detector and validation reference."""

    detector: Detector
    reference: Reference
    n_fit: int

    def to_dict(self) -> dict:
        r = self.reference
        rows = {} if r.feature_rows is None else {"feature_rows": r.feature_rows}
        return {**self.detector.to_dict(), "n_fit": self.n_fit,
                "reference": {"logits": r.logits, "labels": r.labels, "scores": r.scores, "features": r.features,
                              **rows}}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "Trust | None":
        """The checkpoint's, or None for one written before cxr stored it (or without it)."""
        d = checkpoint.get("trust")
        if not isinstance(d, dict) or "reference" not in d:
            return None
        r = d["reference"]
        return cls(Detector.from_dict(d), Reference(r["logits"], r["labels"], r["scores"], r["features"],
                                                    r.get("feature_rows")),
                   int(d.get("n_fit", 0)))


def fit_trust(net: nn.Module, intensity: str, train_images: torch.Tensor, train_labels: torch.Tensor,
              val_images: torch.Tensor, val_labels: torch.Tensor, device: torch.device | str, *,
              seed: int = 0, batch_size: int = 64) -> Trust:
    """Fit the detector on (a stratified draw of at most MAX_FIT_IMAGES) training images, its
    standardisation and threshold on the validation images, and keep validation's outputs."""
    n_classes = net.fc.out_features
    if len(val_labels) < MIN_VALIDATION:
        raise ValueError(f"{len(val_labels)} validation images: the score's threshold needs at least {MIN_VALIDATION}")
    fit_idx = stratified_draw(train_labels, MAX_FIT_IMAGES, seed)
    _, train_feats = forward_with_features(net, train_images[fit_idx], device, intensity, batch_size)
    val_logits, val_feats = forward_with_features(net, val_images, device, intensity, batch_size)
    detector = fit_detector(train_feats, train_labels[fit_idx], val_feats, n_classes)
    keep = stratified_draw(val_labels, MAX_REFERENCE_FEATURES, seed)
    # the scores in float64, as predictions are scored: a threshold taken from them (a site's) is one of them exactly
    reference = Reference(val_logits, val_labels.clone(), torch.from_numpy(detector.score(val_feats)),
                          val_feats[LAYERS[-1]][keep].clone(), keep.clone())
    return Trust(detector, reference, len(fit_idx))


def store_trust(checkpoint_path, train_images: torch.Tensor, train_labels: torch.Tensor, val_images: torch.Tensor,
                val_labels: torch.Tensor, device: torch.device | str, *, seed: int = 0,
                extra: dict | None = None, val_sites: list[str] | None = None) -> Trust | None:
    """Fit the checkpoint's trust statistics on its own training and validation images and write
    them into it (under "trust", with `extra` entries beside), atomically; None (nothing written
    but `extra`) with fewer than MIN_VALIDATION validation images. `val_sites`: each validation
    image's site when the model was trained on several (`cxr run --data NAME=DIR ...`): the reference
    then holds each site's images together, and "operating_points" one point per site, the run's
    own decision with that site's flag threshold and reference rows (site_points)."""
    from ..training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    trust = None
    parts = {}
    if val_sites is not None and len(set(val_sites)) > 1:  # each site's rows together, in the sites' order
        order = sorted(range(len(val_sites)), key=lambda i: val_sites[i])
        val_images, val_labels = val_images[order], val_labels[order]
        parts = {site: val_sites.count(site) for site in sorted(set(val_sites))}
    if len(val_labels) >= MIN_VALIDATION:  # else the checkpoint stays without: outputs say the score is unavailable
        net, config = model_from_checkpoint(checkpoint)
        trust = fit_trust(net, config.intensity, train_images, train_labels, val_images, val_labels, device,
                          seed=seed)
        checkpoint["trust"] = trust.to_dict()
        if parts:
            checkpoint["operating_points"] = site_points(checkpoint, trust, parts)
    if trust is None and not extra:
        return None
    checkpoint.update(extra or {})
    save_checkpoint(checkpoint_path, checkpoint)
    return trust


def part_thresholds(trust: Trust, parts: dict[str, int], min_images: int = MIN_VALIDATION
                    ) -> dict[str, tuple[float, list[int]]]:
    """{part: (the flag's threshold on that part's validation images alone, [start, stop) its rows
    of the reference)}: the same share accepted (`accept`, the quantile the pooled threshold takes)
    of each part, where `parts` gives in order how many of the reference's validation images each
    part holds (several sites pooled: the pooled threshold flags more than its share of a site
    whose images score higher). A part of fewer than `min_images` images gets none."""
    scores, start, out = trust.reference.scores.numpy(), 0, {}
    if sum(parts.values()) != len(scores):
        raise ValueError(f"parts of {sum(parts.values())} validation images; the reference holds {len(scores)}")
    for name, n in parts.items():
        if n >= min_images:
            out[name] = (float(np.quantile(scores[start:start + n], trust.detector.accept, method="higher")),
                         [start, start + n])
        start += n
    return out


def site_points(checkpoint: dict, trust: Trust, parts: dict[str, int]) -> dict[str, dict]:
    """{site: its operating point} of a model trained on several sites: the run's own decision
    (threshold and temperature, chosen on every site's validation images), with the site's own flag
    threshold and reference rows where it has FEW_VALIDATION validation images or more."""
    from ..training.operating_point import OperatingPoint

    run = OperatingPoint.from_dict(checkpoint.get("operating_point"))
    run = replace(run, threshold=float(checkpoint.get("threshold", 0.5)),
                  temperature=float(checkpoint.get("temperature", 1.0)))
    found = part_thresholds(trust, parts, FEW_VALIDATION)
    return {site: (replace(run, ood_threshold=found[site][0], reference_rows=found[site][1]) if site in found
                   else run).to_dict() for site in parts}


def describe_fit(trust: Trust | None) -> str:
    if trust is None:
        return (f"no out-of-distribution statistics: fewer than {MIN_VALIDATION} validation images to set the "
                "threshold on (predictions will say the score is unavailable)")
    d = trust.detector
    n_val = len(trust.reference.labels)
    flagged = float((trust.reference.scores.numpy() > d.threshold).mean())
    return (f"out-of-distribution score fitted on {trust.n_fit} training images; threshold {d.threshold:.2f} "
            f"flags {flagged:.0%} of the {n_val} validation images"
            + (f" (fewer than {FEW_VALIDATION}: a rough threshold)" if n_val < FEW_VALIDATION else ""))
