"""The steps `cxr run` and `cxr train` chain together, with explicit arguments (no CLI namespace).

Everything that can fail because of the user's input (data layout, unreadable images, weights,
an occupied output folder) is checked before the first byte is written to OUT.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision

from . import __version__
from .checkpoint import load_checkpoint, model_from_checkpoint
from .config import TaskConfig
from .data import (Sample, Splits, describe, get_test_samples, labels_of, load_images, overlapping_patients,
                   prepare_splits)
from .engine import fit, seed_everything
from .errors import CxrError
from .evaluate import choose_operating_point, evaluate_model
from .explain import draw_comparison, draw_run_figures, explain_run
from .files import write_json
from .model import build_model, imagenet_state_dict
from .report import write_report

ARTEFACTS = ("config.json", "history.csv", "best.pt", "last.pt", "val_predictions.csv", "metrics.json",
             "predictions.csv")


@dataclass
class PreparedData:
    splits: Splits
    train_images: torch.Tensor
    val_images: torch.Tensor
    summary: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CxrError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return torch.device(name)


def plan_data(root: Path, config: TaskConfig, test: list[Sample] | None,
              log: Callable[[str], None] = print) -> tuple[Splits, str]:
    """Split train by patient; print the data summary (images and patients per split and class)
    and any warning. Lists files only; nothing is decoded yet."""
    splits = prepare_splits(root, config.val_ratio, config.seed, config.limit)
    table = {"train": splits.train, "val": splits.val}
    if test is not None:
        table["test"] = test
        leaked = overlapping_patients(splits.train + splits.val, test)
        if leaked:
            splits.notes.append(f"warning: {len(leaked)} patients have images in both train/ and test/ "
                                f"(e.g. {sorted(leaked)[:3]}); test results will be optimistic")
    summary = describe(table)
    log(f"data: {root}\n{summary}")
    for note in splits.notes:
        log(f"note: {note}")
    return splits, summary


def decode_data(splits: Splits, summary: str, image_size: int, workers: int) -> PreparedData:
    """Decode train and val once; every task of the run shares the result."""
    images = load_images([s.path for s in splits.train + splits.val], image_size, workers,
                         desc="decode train+val")
    n = len(splits.train)
    return PreparedData(splits, images[:n], images[n:], summary)


def pretrained_weights(configs: list[TaskConfig], weights: Path | None) -> dict | None:
    """ImageNet weights if any task needs them, checked against ResNet-18 before anything trains."""
    if not any(c.pretrained for c in configs):
        return None
    state = imagenet_state_dict(weights)
    build_model(state, source=str(weights) if weights else "torchvision ImageNet weights")
    return state


def claim_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to mix a new run into an old one, unless told to replace it."""
    existing = [name for name in ARTEFACTS if (run_dir / name).exists()]
    if existing and not overwrite:
        raise CxrError(f"{run_dir}: holds a previous run ({', '.join(existing)}); pass --overwrite to "
                       "replace it or choose another --out")


def start_run_dir(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ARTEFACTS:
        (run_dir / name).unlink(missing_ok=True)


def train_task(config: TaskConfig, data: PreparedData, root: Path, state: dict | None, run_dir: Path,
               device: torch.device, weights: Path | None, log: Callable[[str], None] = print) -> None:
    """Build, train and checkpoint one task into `run_dir`."""
    start_run_dir(run_dir)
    write_json(run_dir / "config.json", {
        "config": config.to_dict(),
        "data": str(Path(root).resolve()),
        "data_summary": data.summary,
        "weights": (str(weights) if weights else "torchvision:IMAGENET1K_V1") if config.pretrained else None,
        "device": str(device),
        "command": sys.argv,
        "versions": {"cxr": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
                     "torchvision": str(torchvision.__version__)},
    })
    seed_everything(config.seed)
    model = build_model(state if config.pretrained else None, config.train_backbone)
    fit(model, config, data.train_images, labels_of(data.splits.train), data.val_images,
        labels_of(data.splits.val), run_dir, device, log=log)
    chosen = choose_operating_point(run_dir, config, data.splits.val, data.val_images, device)
    log(f"{config.task} operating point from validation: threshold {chosen['threshold']:.3f} ({chosen['rule']}), "
        f"temperature {chosen['temperature']:.3f}")


def run_study(root: Path, out: Path, configs: list[TaskConfig], device: torch.device, workers: int,
              weights: Path | None, overwrite: bool, evaluate: bool = True, cam_method: str = "cam",
              n_examples: int = 16, log: Callable[[str], None] = print) -> dict | None:
    """Train every task and, with `evaluate`, test each best.pt, draw the figures and write the report."""
    for c in configs:
        claim_run_dir(out / c.task, overwrite)
    first = configs[0]
    test_list = get_test_samples(root, first.seed, first.limit) if evaluate else None
    splits, summary = plan_data(root, first, test_list, log)
    state = pretrained_weights(configs, weights)
    data = decode_data(splits, summary, first.image_size, workers)
    # The test images are decoded now only so that an unreadable one stops the run before hours
    # of training; they go to evaluation and nowhere else.
    test = (test_list, load_images([s.path for s in test_list], first.image_size, workers,
                                   desc="decode test")) if evaluate else None
    for c in configs:
        train_task(c, data, root, state, out / c.task, device, weights, log)
    if not evaluate:
        return None
    for c in configs:
        checkpoint = load_checkpoint(out / c.task / "best.pt")
        model, _ = model_from_checkpoint(checkpoint)
        m = evaluate_model(model, checkpoint, test[0], test[1], out / c.task, device, seed=c.seed)
        log(f"{c.task} test: accuracy {m['accuracy']:.3f}, ROC AUC {m['roc_auc']}, "
            f"confusion {m['confusion_matrix']} (best epoch {checkpoint['epoch']})")
        draw_run_figures(out / c.task)
        explain_run(out / c.task, n_examples, method=cam_method, device=device, workers=workers)
    draw_comparison(out, [c.task for c in configs])
    summary = write_report(out, [c.task for c in configs])
    log(f"wrote {out / 'report.html'}, {out / 'report.md'} and {out / 'summary.json'}")
    return summary


def read_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise CxrError(f"{path}: missing or unreadable; pass --data DIR, or a run folder made by cxr") from None
