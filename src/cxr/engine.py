"""Training: seeding, input normalisation, one epoch as a metrics dict, and `fit` writing the run.

`fit` appends one row per epoch to `history.csv` and keeps `best.pt` (lowest validation loss)
and `last.pt`. When only `fc` trains, the frozen backbone's features are computed once and `fc`
is trained on them: the same arithmetic as the plain loop (the backbone is in eval mode either
way), at the cost of one forward pass instead of one per epoch.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .checkpoint import make_checkpoint, save_checkpoint
from .config import TaskConfig
from .files import write_csv
from .model import backbone, set_train_mode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def memory_format(device: torch.device | str) -> torch.memory_format:
    """channels_last where it was measured to pay: on the CPU (2 cores, 224 px, benchmarks/bench.py)
    inference ran about 1.35x faster and training about 1.1x. Not measured on CUDA: left alone."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def place(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move `model` to `device` in the memory format `normalize` produces there."""
    return model.to(device=device, memory_format=memory_format(device))


def normalize(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """(N, 1, H, W) uint8 grayscale -> (N, 3, H, W) float, ImageNet-normalised, on `device`."""
    x = images.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std  # broadcasting makes the three (equal) channels ImageNet expects
    return x.contiguous(memory_format=memory_format(x.device))


def class_weights(labels: torch.Tensor, mode: str) -> torch.Tensor | None:
    """None for "none"; for "balanced", n / (classes x n_class), so each class weighs the same."""
    if mode == "none":
        return None
    counts = torch.bincount(labels, minlength=2).clamp_min(1).float()
    return counts.sum() / (len(counts) * counts)


def run_epoch(forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor,
              batch_size: int, device: torch.device | str, optimizer: torch.optim.Optimizer | None = None,
              generator: torch.Generator | None = None, desc: str = "",
              weight: torch.Tensor | None = None) -> dict[str, float]:
    """One pass over (inputs, labels): training when `optimizer` is given (shuffled by
    `generator`), evaluation otherwise. Returns the mean loss (class-weighted by `weight` when
    given) and the accuracy."""
    n = len(labels)
    training = optimizer is not None
    order = torch.randperm(n, generator=generator) if training else torch.arange(n)
    total_loss, correct = 0.0, 0
    with torch.set_grad_enabled(training):
        for idx in tqdm(order.split(batch_size), desc=desc, unit="batch", leave=False, disable=None):
            y = labels[idx].to(device, non_blocking=True)
            logits = forward(inputs[idx])
            loss = F.cross_entropy(logits, y, weight=weight)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
    return {"loss": total_loss / n, "acc": correct / n}


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, batch_size: int,
                     device: torch.device | str, desc: str = "features") -> torch.Tensor:
    """(N, 512) pooled backbone features of uint8 images, the backbone in eval mode."""
    net = backbone(place(model, device)).eval()
    chunks = [net(normalize(images[i:i + batch_size], device))
              for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False, disable=None)]
    return torch.cat(chunks) if chunks else torch.empty(0, model.fc.in_features, device=device)


def _write_history(run_dir: Path, history: list[dict]) -> None:
    write_csv(run_dir / "history.csv", HISTORY_COLUMNS, ([r[c] for c in HISTORY_COLUMNS] for r in history))


def fit(model: nn.Module, config: TaskConfig, train_images: torch.Tensor, train_labels: torch.Tensor,
        val_images: torch.Tensor, val_labels: torch.Tensor, run_dir: Path, device: torch.device | str,
        precompute_features: bool = True, resume: dict | None = None,
        log: Callable[[str], None] = print) -> list[dict]:
    """Train `model` as `config` says, writing history.csv, best.pt and last.pt into `run_dir`.

    Each epoch ends by writing best.pt (when validation loss improved), then last.pt, which holds
    everything needed to continue (optimiser, RNG states, history); `resume` is such a last.pt.
    A kill at any moment therefore loses at most the epoch in progress.
    """
    run_dir = Path(run_dir)
    place(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)  # batch order, apart from init RNG
    history: list[dict] = []
    best, first_epoch = math.inf, 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["rng"]["batch_order"])
        torch.set_rng_state(resume["rng"]["torch"])
        history = [dict(r) for r in resume["history"]]
        best, first_epoch = resume["best_val_loss"], resume["epoch"] + 1
        _write_history(run_dir, history)  # drop a row written after the last checkpoint
        log(f"{config.task}: resuming after epoch {resume['epoch']} (best validation loss {best:.4f})")
    frozen = not config.train_backbone
    start = time.perf_counter()
    if frozen and precompute_features:
        train_x = extract_features(model, train_images, config.batch_size, device, "train features")
        val_x = extract_features(model, val_images, config.batch_size, device, "val features")
        forward = model.fc
    else:
        train_x, val_x = train_images, val_images
        forward = lambda x: model(normalize(x, device))  # noqa: E731
    # The same weights for the validation loss, so the epoch kept is the best by the loss trained on.
    weight = class_weights(train_labels, config.class_weights)
    weight = weight.to(device) if weight is not None else None
    for epoch in range(first_epoch, config.epochs + 1):
        set_train_mode(model, config.train_backbone)
        tr = run_epoch(forward, train_x, train_labels, config.batch_size, device, optimizer, generator,
                       desc=f"{config.task} epoch {epoch}/{config.epochs} train", weight=weight)
        model.eval()
        va = run_epoch(forward, val_x, val_labels, config.batch_size, device,
                       desc=f"{config.task} epoch {epoch}/{config.epochs} val", weight=weight)
        now = time.perf_counter()
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"],
               "val_loss": va["loss"], "val_acc": va["acc"], "seconds": round(now - start, 3)}
        start = now
        history.append(row)
        is_best = epoch == 1 or va["loss"] < best or math.isnan(best)
        if is_best:
            best = va["loss"]
            save_checkpoint(run_dir / "best.pt", make_checkpoint(model, config, epoch, row, best))
        state = {"history": history, "rng": {"batch_order": generator.get_state(), "torch": torch.get_rng_state()}}
        save_checkpoint(run_dir / "last.pt", make_checkpoint(model, config, epoch, row, best, optimizer, state))
        _write_history(run_dir, history)
        log(f"{config.task} epoch {epoch}/{config.epochs}: train loss {tr['loss']:.4f} acc {tr['acc']:.3f}"
            f" | val loss {va['loss']:.4f} acc {va['acc']:.3f} | {row['seconds']:.1f}s" + (" *best" if is_best else ""))
    return history
