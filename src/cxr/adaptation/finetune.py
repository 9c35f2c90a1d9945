"""Supervised fine-tuning of a trained model on a site's labelled images, keeping the first site.

A model that ranks a new hospital's images at chance cannot be fixed by a threshold or by
batch-norm statistics: the site's labelled images must teach it. Fine-tuning on them alone
forgets the first site (catastrophic forgetting), so `replay` mixes the source run's own
training images into every batch (experience replay, as in rehearsal methods for continual
learning): each batch of `batch_size` holds `round(replay * batch_size)` source images drawn at
random and the rest from the site, so both sites shape every step.

What trains (`train`): `fc` (the head; the backbone frozen, in eval mode), `last` (layer4 and the
head; earlier blocks frozen, in eval mode) or `all`. The source run's intensity handling and
augmentation are kept, the loss is class-balanced within each site's rows (and the label
smoothing of the source recipe), AdamW with a cosine schedule. The epoch is chosen by the ROC AUC
on the site's validation images, which the caller splits off by patient; nothing here sees the
images that later score the model.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from ..config import TRAIN_CHOICES, FinetuneSpec, TaskConfig
from ..evaluation.evaluate import predict_logits
from ..training.accel import autocast, widen
from ..training.augment import augment
from ..training.engine import class_weights
from ..training.preprocess import normalize, place

TRAINABLE = {"fc": ("fc",), "last": ("layer4", "fc"), "all": None}  # None: every module
assert set(TRAINABLE) == set(TRAIN_CHOICES)


def freeze_for(model: nn.Module, train: str) -> list[nn.Parameter]:
    """Only the modules `train` names keep gradients; returns their parameters."""
    names = TRAINABLE[train]
    for name, p in model.named_parameters():
        p.requires_grad_(names is None or name.split(".")[0] in names)
    return [p for p in model.parameters() if p.requires_grad]


def train_mode(model: nn.Module, train: str) -> None:
    """Train mode for what trains only: frozen blocks keep the source's batch-norm statistics."""
    names = TRAINABLE[train]
    if names is None:
        model.train()
        return
    model.eval()
    for name, module in model.named_children():
        if name in names:
            module.train()


def replay_batches(n_site: int, n_replay: int, spec: FinetuneSpec,
                   g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's batches: (site indices, replay indices) for each step. The site images are
    shuffled and dealt `batch_size - round(replay * batch_size)` per step; each step draws
    `round(replay * batch_size)` replay images at random (with replacement across steps)."""
    k_replay = round(spec.replay * spec.batch_size) if n_replay else 0
    k_site = max(1, spec.batch_size - k_replay)
    order = torch.randperm(n_site, generator=g)
    steps = []
    for site_idx in order.split(k_site):
        rep = torch.randint(n_replay, (k_replay,), generator=g) if k_replay else torch.empty(0, dtype=torch.long)
        steps.append((site_idx, rep))
    return steps


def finetune(model: nn.Module, config: TaskConfig, spec: FinetuneSpec, images: torch.Tensor, labels: torch.Tensor,
             val_images: torch.Tensor, val_labels: torch.Tensor, device: torch.device | str, seed: int = 0,
             replay: tuple[torch.Tensor, torch.Tensor] | None = None, precision: str = "fp32",
             log: Callable[[str], None] = lambda _: None) -> tuple[nn.Module, list[dict]]:
    """Fine-tune `model` (trained with `config`) on the site's (images, labels), with `replay`
    (source images, labels) mixed into every batch when `spec.replay` > 0. After each epoch the
    model predicts (val_images, val_labels), the site's held-out patients; the epoch with the
    highest validation ROC AUC (the earlier on ties) is returned, in eval mode, with one history
    row per epoch."""
    place(model, device)
    params = freeze_for(model, spec.train)
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    g = torch.Generator().manual_seed(seed)
    aug_g = torch.Generator().manual_seed(seed + 1)
    rep_x, rep_y = replay if (replay is not None and spec.replay > 0) else (images[:0], labels[:0])
    steps_per_epoch = len(replay_batches(len(labels), len(rep_y), spec, torch.Generator().manual_seed(0)))
    total = spec.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    w_site = class_weights(labels, "balanced")
    w_rep = class_weights(rep_y, "balanced") if len(rep_y) else None
    dtype = next(model.parameters()).dtype
    best_auc, best_state, history = -math.inf, None, []
    for epoch in range(1, spec.epochs + 1):
        train_mode(model, spec.train)
        total_loss, seen = 0.0, 0
        for site_idx, rep_idx in replay_batches(len(labels), len(rep_y), spec, g):
            x = torch.cat([images[site_idx], rep_x[rep_idx]])
            y = torch.cat([labels[site_idx], rep_y[rep_idx]]).to(device)
            w = torch.cat([w_site[labels[site_idx]], w_rep[rep_y[rep_idx]] if len(rep_idx) else w_site[:0]]).to(device)
            jitter = lambda u8: augment(u8, config.augment, aug_g)  # noqa: E731
            with autocast(device, precision):
                logits = model(normalize(x, device, config.intensity, augment=jitter).to(dtype))
            ce = F.cross_entropy(widen(logits), y, reduction="none", label_smoothing=config.label_smoothing)
            loss = (ce * w).sum() / w.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(y)
            seen += len(y)
        model.eval()
        val_logits = predict_logits(model, val_images, 64, device, config.intensity)
        y_val = val_labels.numpy()
        auc = float(roc_auc_score(y_val, val_logits[:, 1] - val_logits[:, 0])) if len(np.unique(y_val)) == 2 \
            else float("nan")
        history.append({"epoch": epoch, "train_loss": total_loss / max(seen, 1), "val_auc": auc,
                        "lr": optimizer.param_groups[0]["lr"]})
        log(f"{spec.name} epoch {epoch}/{spec.epochs}: train loss {total_loss / max(seen, 1):.4f} | "
            f"site val auc {auc:.3f}")
        if best_state is None or auc > best_auc:
            best_auc, best_state = auc, copy.deepcopy(model.state_dict())
            history[-1]["best"] = True
    for p in model.parameters():
        p.requires_grad_(True)
    model.load_state_dict(best_state)
    return model.eval(), history
