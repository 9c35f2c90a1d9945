"""The weights a study's pretrained tasks start from: torchvision's ImageNet weights or a file
(--weights), checked against ResNet-18 before anything trains. A backbone written by `cxr pretrain`
carries its provenance: the run refuses one whose pretraining saw an image the run scores, and
config.json and the model card say in short how it was pretrained."""

from __future__ import annotations

from pathlib import Path

from .config import TaskConfig
from .data.dataset import Sample
from .data.overlap import backbone_overlap
from .data.unlabelled import read_provenance
from .errors import DataError
from .run_options import RunOptions
from .study_data import EvalSet
from .training.model import build_model, imagenet_state_dict


def pretrained_weights(configs: list[TaskConfig], weights: Path | None) -> dict | None:
    """ImageNet weights if any task needs them, checked against ResNet-18 before anything trains."""
    if not any(c.pretrained for c in configs):
        return None
    state = imagenet_state_dict(weights)
    build_model(state, source=str(weights) if weights else "torchvision ImageNet weights")
    return state


def refuse_seen_by_backbone(configs: list[TaskConfig], options: RunOptions, *, test_list: list[Sample] | None,
                            test: tuple | None, external_sets: dict[str, EvalSet]) -> None:
    """With a backbone from `cxr pretrain` as --weights: refuse (DataError) when its pretraining saw
    an image this run scores (the test split, an external set), by digest and by content; note when
    the pretraining normalised images otherwise than a task does. `test`: the decoded test split
    (samples, images), or None where it was not decoded (then `test_list` is compared by digest)."""
    provenance = read_provenance(options.weights) if any(c.pretrained for c in configs) else None
    if provenance is None:
        return
    sets = {"the test split": test if test is not None else (test_list, None),
            **{f"external set {n}": (s.samples, s.images) for n, s in external_sets.items()}}
    sets = {k: v for k, v in sets.items() if v[0]}
    refusal = backbone_overlap(options.weights, provenance, sets, options.workers)
    if refusal:
        raise DataError(refusal)
    seen = provenance["spec"].get("intensity")
    for c in configs:
        if c.pretrained and c.intensity != seen:
            print(f"note: {c.task} normalises images with intensity {c.intensity!r}, its backbone was "
                  f"pretrained with {seen!r}: pass --intensity {seen} to feed it what it learnt from")


def backbone_card(config: TaskConfig, options: RunOptions) -> dict | None:
    """{"backbone": its provenance in short} for a task started from a `cxr pretrain` backbone."""
    provenance = read_provenance(options.weights) if config.pretrained else None
    if provenance is None:
        return None
    spec = provenance["spec"]
    return {"backbone": {"method": provenance["method"], "epochs": provenance["epochs_done"],
                         "images": provenance["images"], "image_size": spec["image_size"],
                         "intensity": spec["intensity"], "seed": spec["seed"], "file": str(options.weights),
                         "sources": provenance["sources"]}}
