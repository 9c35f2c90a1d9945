"""Evaluation: the only reader of the test split. Applies `best.pt` and writes
`metrics.json` and `predictions.csv`; nothing here feeds back into training or selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import load_checkpoint, model_from_checkpoint
from .config import CLASSES
from .data import Sample, describe, get_test_samples, labels_of, load_images
from .engine import normalize
from .files import write_csv, write_json
from .metrics import classification_metrics


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int,
                  device: torch.device | str) -> np.ndarray:
    """P(PNEUMONIA) for (N, 1, H, W) uint8 images, the model in eval mode."""
    model.to(device).eval()
    probs = [torch.softmax(model(normalize(images[i:i + batch_size], device)), dim=1)[:, 1].float().cpu()
             for i in range(0, len(images), batch_size)]
    return torch.cat(probs).numpy() if probs else np.empty(0)


def evaluate_model(model: nn.Module, checkpoint: dict, samples: list[Sample], images: torch.Tensor,
                   run_dir: Path, device: torch.device | str, batch_size: int = 64) -> dict:
    """Predict the test images, write predictions.csv and metrics.json, return the metrics."""
    prob = predict_proba(model, images, batch_size, device)
    threshold = float(checkpoint.get("threshold", 0.5))
    y = labels_of(samples).numpy()
    metrics = classification_metrics(y, prob, threshold)
    metrics["checkpoint"] = {"file": "best.pt", "epoch": checkpoint["epoch"],
                             "val_loss": checkpoint["metrics"].get("val_loss")}
    pred = (prob >= threshold).astype(int)
    write_csv(Path(run_dir) / "predictions.csv", ["path", "true_label", "predicted_label", "prob_pneumonia"],
              ([str(s.path), CLASSES[t], CLASSES[p], f"{q:.6f}"] for s, t, p, q in zip(samples, y, pred, prob)))
    write_json(Path(run_dir) / "metrics.json", metrics)
    return metrics


def evaluate_run(run_dir: Path, data_root: Path, device: torch.device | str, workers: int,
                 log=print) -> dict:
    """`cxr evaluate`: the run's best.pt on the test split of `data_root`."""
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir / "best.pt")
    model, config = model_from_checkpoint(checkpoint)
    samples = get_test_samples(Path(data_root), config.seed, config.limit)
    log(f"data: {data_root}\n{describe({'test': samples})}")
    images = load_images([s.path for s in samples], config.image_size, workers, desc="decode test")
    return evaluate_model(model, checkpoint, samples, images, run_dir, device)
