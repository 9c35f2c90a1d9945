"""Features of a frozen backbone shared by the seeds of a study (`cxr run --seeds`): each image's
features are computed once and reused by every seed whose split holds it."""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

from .config import TaskConfig
from .run_options import RunOptions
from .study_data import PreparedData


def feature_memo(options: RunOptions, config: TaskConfig, data: PreparedData, model) -> Callable | None:
    """With several seeds (options.memo), a frozen backbone's features of each image are computed
    once and reused by every seed whose split holds it: keyed by the image's path, the input
    settings and a digest of the backbone's weights (the same ImageNet weights give the same
    features whatever the seed). None where features are not shared (one seed, a trained backbone)."""
    if options.memo is None or config.train_backbone:
        return None
    digest = _backbone_digest(model)
    paths = {"train": [s.path for s in data.splits.train], "val": [s.path for s in data.splits.val]}
    memo = options.memo

    def features(compute: Callable, images: torch.Tensor, which: str) -> torch.Tensor:
        keys = [("features", p, config.image_size, config.intensity, options.precision, digest)
                for p in paths[which]]
        missing = [i for i, k in enumerate(keys) if k not in memo]
        if missing:
            for k, row in zip((keys[i] for i in missing), compute(images[missing])):
                memo[k] = row
        return torch.stack([memo[k] for k in keys])

    return features


def _backbone_digest(model: torch.nn.Module) -> str:
    """A digest of every weight but the classifier's (`fc.`): equal for equal backbones."""
    h = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        if not name.startswith("fc."):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
