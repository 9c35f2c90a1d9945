"""The adapted model's out-of-distribution statistics (trust/): kept, fitted again after a
fine-tune, or dropped; and, for a model that serves several sites, each site's own flag threshold."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..training.operating_point import OperatingPoint
from ..trust.fit import FEW_VALIDATION, MIN_VALIDATION, Trust, fit_trust, part_thresholds


def refit_trust(checkpoint: dict, model, *, config, bn: str, images: torch.Tensor, y: np.ndarray | None,
                holdout, replay, source_val, device, seed: int) -> tuple[Trust | None, str, dict[str, int]]:
    """The adapted model's out-of-distribution statistics, a sentence saying where they come from,
    and how many of its validation reference's images are each site's, in their order ({"site": n,
    "source": m} for a fine-tune; {} otherwise). Unchanged weights keep the source's; a fine-tune is
    fitted again on what it now serves (the site's fitting images and the replayed source images;
    its validation: the site's validation patients, then the source's validation split); batch norm
    changed without labels (AdaBN, TENT) leaves none, since no labelled validation images can set
    the threshold and estimates."""
    if bn == "keep":
        kept = Trust.from_checkpoint(checkpoint)
        return kept, ("the source run's (the features did not change)" if kept else "none (the source run has none)"), {}
    if bn != "finetune" or y is None or holdout is None:
        return None, ("none: the batch-norm statistics changed without labelled validation images to fit them on; "
                      "predictions say the score is unavailable"), {}
    held = torch.as_tensor(holdout, dtype=torch.long)
    fit = torch.ones(len(images), dtype=torch.bool)
    fit[held] = False
    labels = torch.as_tensor(y, dtype=torch.long)
    train_x, train_y = [images[fit], *([replay[0]] if replay else [])], [labels[fit], *([replay[1]] if replay else [])]
    val_x = [images[held], *([source_val[0]] if source_val else [])]
    val_y = [labels[held], *([source_val[1]] if source_val else [])]
    if sum(len(v) for v in val_y) < MIN_VALIDATION:
        return None, f"none: fewer than {MIN_VALIDATION} validation images to set the score's threshold on", {}
    trust = fit_trust(model, config.intensity, torch.cat(train_x), torch.cat(train_y), torch.cat(val_x),
                      torch.cat(val_y), device, seed=seed)
    return trust, (f"fitted again on the fine-tuned model: {trust.n_fit} images (the site's fitting images"
                   + (" and the replayed source images" if replay is not None else "") + "), threshold on "
                   f"{len(trust.reference.labels)} validation images (the site's"
                   + (" and the source run's" if source_val is not None else "") + ")"), \
        {"site": len(val_y[0]), "source": len(val_y[1]) if len(val_y) > 1 else 0}


def flag_thresholds(per_site: dict[str, OperatingPoint], trust: Trust, parts: dict[str, int],
                    site: str) -> dict[str, OperatingPoint]:
    """Each site's operating point with its own flag threshold (`ood_threshold`: the share of its
    validation images the pooled threshold accepts overall, taken of that site's alone) and its rows
    of the validation reference (`reference_rows`), where it has FEW_VALIDATION validation images
    or more (fewer keep the pooled flag and reference). `parts`: refit_trust's, "site" standing for
    the site's name; `--site NAME` (checkpoint.for_site) flags with the site's threshold and
    compares with the site's rows alone."""
    found = part_thresholds(trust, {site if k == "site" else k: n for k, n in parts.items()}, FEW_VALIDATION)
    return {name: replace(op, ood_threshold=found[name][0], reference_rows=found[name][1]) if name in found else op
            for name, op in per_site.items()}
