"""Images the model has no business reading, scored beside its test split so that every run can
say how well its out-of-distribution score tells them from chest X-rays (the report's section
"Where this model can be trusted" reads the file).

Transformed test images (a seeded draw of PER_KIND of them): inverted, rotated 90 degrees, and a
heavy crop (the centre quarter, half the side, resized back up); and made images: uniform noise, a
smooth gradient, stripes like a page of text, a flat grey. Each is scored by the checkpoint's own
detector in the forward pass that predicts it, as `cxr predict` would score it, and written to
`ood_probes.csv` in the run folder. A checkpoint without the statistics writes nothing.

Nothing here is chosen on the test images: they are only transformed and scored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import config_from_dict
from ..data.labels import class_names, probability_key
from ..files import write_csv
from ..trust.features import forward_with_features
from ..trust.fit import Trust

PER_KIND = 32  # images of each kind: enough for an AUROC against the test split, cheap on a CPU
PROBES_FILE = "ood_probes.csv"
TRANSFORMED = ("inverted", "rotated", "cropped")
MADE = ("noise", "gradient", "text", "flat")
KINDS = TRANSFORMED + MADE
DESCRIPTIONS = {"inverted": "test images inverted (a negative film)", "rotated": "test images rotated 90 degrees",
                "cropped": "the centre quarter of test images (half the side), resized up",
                "noise": "uniform noise", "gradient": "a smooth grey gradient",
                "text": "dark stripes on white, like a page of text", "flat": "one flat grey level"}


def transformed(images: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, 1, S, S) uint8 images inverted, rotated 90 degrees or cropped to their centre quarter."""
    if kind == "inverted":
        return 255 - images
    if kind == "rotated":
        return torch.rot90(images, 1, (2, 3)).contiguous()
    s = images.shape[-1]
    centre = images[..., s // 4: s // 4 + s // 2, s // 4: s // 4 + s // 2].float()
    resized = F.interpolate(centre, size=(s, s), mode="bilinear", align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def _text_page(rng: np.random.Generator, s: int) -> np.ndarray:
    """Lines of dark dashes of random lengths (words) on a light page."""
    page = np.full((s, s), int(rng.integers(215, 250)), np.uint8)
    line = max(2, s // 20)
    for top in range(line, s - line, 2 * line):
        x = int(rng.integers(1, max(2, s // 10)))
        while x < s - s // 10:
            width = int(rng.integers(max(2, s // 25), max(3, s // 6)))
            page[top:top + line, x:x + width] = rng.integers(10, 70)
            x += width + int(rng.integers(max(1, s // 40), max(2, s // 20)))
    return page


def made(kind: str, n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """(n, 1, size, size) uint8 made images of `kind`: noise, gradient, text or flat."""
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    out = []
    for _ in range(n):
        if kind == "noise":
            img = rng.integers(0, 256, (size, size))
        elif kind == "gradient":
            angle = rng.uniform(0, 2 * np.pi)
            ramp = np.cos(angle) * xx + np.sin(angle) * yy
            ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)
            low, high = sorted(rng.integers(0, 256, 2))
            img = low + (high - low) * ramp
        elif kind == "text":
            img = _text_page(rng, size)
        else:
            img = np.full((size, size), rng.integers(40, 216))
        out.append(torch.from_numpy(np.asarray(img, np.uint8).copy()))
    return torch.stack(out)[:, None]


def probe_images(images: torch.Tensor, n: int = PER_KIND, seed: int = 0) -> dict[str, torch.Tensor]:
    """{kind: (m, 1, S, S) uint8}: each transform of a seeded draw of at most `n` of `images`, and
    `n` made images of each kind at the same size."""
    g = torch.Generator().manual_seed(seed)
    picked = images[torch.randperm(len(images), generator=g)[:n]]
    rng = np.random.default_rng(seed)
    size = images.shape[-1]
    return {**{k: transformed(picked, k) for k in TRANSFORMED if len(picked)},
            **{k: made(k, n, size, rng) for k in MADE}}


def probability_columns(classes) -> list[str]:
    """The probability columns of the probes file, as in predictions.csv: P(class 1) for two
    classes, every class's for more."""
    return [probability_key(classes[1])] if len(classes) == 2 else [probability_key(c) for c in classes]


@torch.no_grad()
def score_probes(model: nn.Module, checkpoint: dict, images: torch.Tensor, device: torch.device | str,
                 n: int = PER_KIND, seed: int = 0, batch_size: int = 64) -> tuple[list[str], list[list]] | None:
    """(columns, rows) of every probe image: kind, ood_score, in_distribution and the class
    probabilities at the checkpoint's temperature; None for a checkpoint without the statistics."""
    trust = Trust.from_checkpoint(checkpoint)
    if trust is None:
        return None
    config = config_from_dict(checkpoint["config"])
    classes = class_names(config.labels)
    temperature = float(checkpoint.get("temperature", 1.0))
    columns = ["probe", "ood_score", "in_distribution", *probability_columns(classes)]
    keep = [1] if len(classes) == 2 else list(range(len(classes)))
    probes = probe_images(images, n, seed)
    kinds = [kind for kind, batch in probes.items() for _ in range(len(batch))]
    logits, features = forward_with_features(model, torch.cat(list(probes.values())), device, config.intensity,
                                             batch_size, trust.detector.layers)  # every probe in one pass
    prob = torch.softmax(logits.double() / temperature, 1).numpy()
    scores = trust.detector.score(features)
    flags = trust.detector.in_distribution(scores)
    return columns, [[kind, f"{s:.4f}", str(bool(f)), *(f"{p[k]:.6f}" for k in keep)]
                     for kind, s, f, p in zip(kinds, scores, flags, prob)]


def write_probes(model: nn.Module, checkpoint: dict, images: torch.Tensor, run_dir: Path,
                 device: torch.device | str, seed: int = 0, batch_size: int = 64) -> Path | None:
    """Score the probes of `images` (the run's decoded test split) and write RUN/ood_probes.csv;
    nothing (None) for a checkpoint without the statistics."""
    scored = score_probes(model, checkpoint, images, device, seed=seed, batch_size=batch_size)
    if scored is None:
        return None
    path = Path(run_dir) / PROBES_FILE
    write_csv(path, *scored)
    return path
