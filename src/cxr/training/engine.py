"""Training: seeding, input normalisation, one epoch as a metrics dict, and `fit` writing the run.

`fit` appends one row per epoch to `history.csv` and keeps `best.pt` (lowest validation loss,
or highest validation AUC) and `last.pt`. When only `fc` trains, the frozen backbone's features are computed once and `fc`
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
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from ..config import TaskConfig
from ..files import write_csv
from .accel import autocast, compiled, stage, to_device, widen
from .augment import augment
from .checkpoint import make_checkpoint, save_checkpoint
from .distributed import (
    SINGLE,
    Group,
    gather_rows,
    plain_batchnorm,
    quiet,
    share,
    sum_all,
    sync_batchnorm,
    wrap,
)
from .model import backbone, set_train_mode
from .preprocess import normalize, place

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr", "seconds"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def class_weights(labels: torch.Tensor, mode: str, n_classes: int = 2) -> torch.Tensor | None:
    """None for "none"; for "balanced", n / (classes x n_class), so each class weighs the same."""
    if mode == "none":
        return None
    counts = torch.bincount(labels, minlength=n_classes).clamp_min(1).float()
    return counts.sum() / (len(counts) * counts)


def run_epoch(forward: Callable[..., torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor,
              batch_size: int, device: torch.device | str, optimizer: torch.optim.Optimizer | None = None,
              generator: torch.Generator | None = None, desc: str = "",
              weight: torch.Tensor | None = None, label_smoothing: float = 0.0,
              scheduler=None, precision: str = "fp32", group: Group = SINGLE,
              sample_weight: torch.Tensor | None = None) -> dict[str, float]:
    """One pass over (inputs, labels), `forward(x)` giving the logits: training when `optimizer`
    is given (shuffled by `generator`, stepping `scheduler` per batch), evaluation otherwise.
    Returns the mean loss (class-weighted by `weight` when given: the sum of weighted losses over
    the sum of weights, per batch when training, over the whole set when evaluating), the
    accuracy and, when evaluating, ROC AUC and every image's class probabilities ("prob", N x K). `sample_weight`
    (one per image, e.g. each training site's share: sites.py) multiplies the class weight.

    With several processes (`group`, see distributed.py) each takes its share of every global
    batch of `batch_size` when training, and of the whole set when evaluating; the returned
    numbers are those of all of them together, the same on every rank. There `forward(x, rows)`
    is told which rows of the global batch `x` is, rows = (start, stop, batch size), so that
    augmentation draws for the whole batch (augment.py).

    Losses and counts add up on the device and are read once at the end, so a CUDA step never
    waits for the host; the batch order comes from the CPU `generator` on every device."""
    n = len(labels)
    training = optimizer is not None
    y_all = to_device(labels, device)
    w_all = weight[y_all] if weight is not None else torch.ones(n, device=y_all.device)
    if sample_weight is not None:
        sample_weight = to_device(sample_weight, device).to(w_all.dtype)
        w_all = w_all * sample_weight
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    probs = []
    if training:
        batches = torch.randperm(n, generator=generator).to(inputs.device).split(batch_size)
        if len(batches) > 1 and len(batches[-1]) == 1:  # batch norm cannot train on one image at 1x1 (32 px):
            batches = batches[:-1]                       # that image waits for the next epoch's order
        n = sum(len(b) for b in batches)  # what the epoch's loss and accuracy average over
    else:  # this rank's part of the set, in batches
        start, stop = share(n, group)
        batches = torch.arange(start, stop, device=inputs.device).split(batch_size)
    with torch.set_grad_enabled(training):
        for idx in tqdm(batches, desc=desc, unit="batch", leave=False, disable=quiet()):
            rows = share(len(idx), group) if training else (0, len(idx))
            mine = idx[rows[0]:rows[1]]
            y = y_all[mine.to(y_all.device)]
            with autocast(device, precision):
                if training and group.active:
                    logits = forward(inputs[mine], (*rows, len(idx)))
                else:
                    logits = forward(inputs[mine])
            logits = widen(logits)
            if sample_weight is None:
                loss_sum = F.cross_entropy(logits, y, weight=weight, reduction="sum",
                                           label_smoothing=label_smoothing if training else 0.0)
            else:  # each image's loss times its own weight (and its class's)
                loss_sum = (F.cross_entropy(logits, y, weight=weight, reduction="none",
                                            label_smoothing=label_smoothing if training else 0.0)
                            * sample_weight[mine.to(sample_weight.device)]).sum()
            if training:
                loss = loss_sum / w_all[idx.to(w_all.device)].sum()  # the global batch's mean loss
                optimizer.zero_grad(set_to_none=True)
                (loss * group.world).backward()  # DDP averages gradients over the ranks
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                total_loss += loss.detach().double() * len(idx)
            else:
                probs.append(torch.softmax(logits.detach(), 1))
                total_loss += loss_sum.detach().double()
            correct += (logits.detach().argmax(1) == y).sum()
    total_loss, correct = sum_all(total_loss, group), sum_all(correct, group)
    if training:
        out = {"loss": total_loss.item() / n, "acc": correct.item() / n}
    else:
        out = {"loss": total_loss.item() / w_all.double().sum().item(), "acc": correct.item() / n}
        mine_p = torch.cat(probs) if probs else torch.empty(0, device=device)
        p = gather_rows(mine_p.float(), n, group).cpu().numpy()
        out["auc"] = ranking_auc(labels.cpu().numpy(), p)
        out["prob"] = p
    return out


def ranking_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC of (N, K) probabilities: of class 1 for two classes; the macro average of the
    one-vs-rest AUCs for more; NaN when a class is missing."""
    if p.ndim != 2 or len(y) == 0 or len(np.unique(y)) != p.shape[1]:
        return float("nan")
    if p.shape[1] == 2:
        return float(roc_auc_score(y, p[:, 1]))
    p = p.astype(np.float64)
    return float(roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr", average="macro"))


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, batch_size: int,
                     device: torch.device | str, desc: str = "features", intensity: str = "none",
                     precision: str = "fp32", group: Group = SINGLE) -> torch.Tensor:
    """(N, 512) float32 pooled backbone features of uint8 images, the backbone in eval mode
    (with several processes, each computes its share and all receive the whole)."""
    net = backbone(place(model, device)).eval()
    dtype = next(model.parameters()).dtype
    start, stop = share(len(images), group)
    chunks = []
    for i in tqdm(range(start, stop, batch_size), desc=desc, unit="batch", leave=False, disable=quiet()):
        with autocast(device, precision):
            chunks.append(widen(net(normalize(images[i:min(i + batch_size, stop)], device, intensity).to(dtype))))
    mine = torch.cat(chunks) if chunks else torch.empty(0, model.fc.in_features, device=device, dtype=dtype)
    return gather_rows(mine, len(images), group)


def make_optimizer(params, config: TaskConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TaskConfig, steps_per_epoch: int):
    """None for a constant rate; for "cosine", a per-step linear warm-up then cosine decay to 0."""
    if config.schedule != "cosine":
        return None
    warmup = config.warmup_epochs * steps_per_epoch
    total = max(config.epochs * steps_per_epoch, warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _write_history(run_dir: Path, history: list[dict]) -> None:
    """history.csv: HISTORY_COLUMNS, then any per-site columns (val_auc_<site>, val_auc_worst_site)."""
    extra = [k for k in dict.fromkeys(k for r in history for k in r) if k not in HISTORY_COLUMNS]
    columns = HISTORY_COLUMNS + extra
    write_csv(run_dir / "history.csv", columns, ([r.get(c, "") for c in columns] for r in history))


def _score(row: dict, select_by: str) -> float:
    """Higher is better: minus the validation loss, the validation ROC AUC, or for "last" the
    epoch itself (the last epoch is kept: what a schedule that anneals to zero is made for)."""
    if select_by == "last":
        return float(row["epoch"])
    if select_by == "worst_site_auc":  # several training sites: the site the model serves worst decides
        return row["val_auc_worst_site"]
    return row["val_auc"] if select_by == "val_auc" else -row["val_loss"]


def fit(model: nn.Module, config: TaskConfig, train_images: torch.Tensor, train_labels: torch.Tensor,
        val_images: torch.Tensor, val_labels: torch.Tensor, run_dir: Path, device: torch.device | str, *,
        precompute_features: bool = True, resume: dict | None = None,
        log: Callable[[str], None] = print, precision: str = "fp32", compile_model: bool = False,
        group: Group = SINGLE, on_epoch: Callable[[dict], None] | None = None,
        features: Callable | None = None, train_sites: list[str] | None = None,
        val_sites: list[str] | None = None, card: dict | None = None) -> list[dict]:
    """Train `model` as `config` says, writing history.csv, best.pt and last.pt into `run_dir`.

    Each epoch ends by writing best.pt (when the selection metric improved: validation loss, or
    validation AUC), then last.pt, which holds everything needed to continue (optimiser,
    schedule, RNG states, history); `resume` is such a last.pt. A kill at any moment therefore
    loses at most the epoch in progress.

    `precision` ("fp32" or "bf16") and `compile_model` change how fast the passes run, not what they
    compute (see accel.py); bf16 rounds, so its history differs from fp32's in the low digits.

    With several processes (`group`), each calls `fit` with the same arguments; they train one
    model together (distributed.py) and rank 0 alone writes files and logs. `on_epoch` gets each
    epoch's history row once it is on disk (tracking.py: TensorBoard, MLflow). `features`, when
    given, is called as features(compute, images, "train" or "val") in place of computing a frozen
    backbone's features directly (feature_memo.feature_memo: seeds share them). `train_sites` /
    `val_sites`: each image's training source when there are several (sites.py): the loss weighs
    the sites as `config.site_weights` says (equal shares by default), and every epoch's row holds
    each site's validation ROC AUC and the worst of them. `card`: more entries for the model card
    kept in every checkpoint (e.g. "backbone": where a pretrained backbone came from).
    """
    run_dir = Path(run_dir)
    place(model, device)
    if not group.main:
        log = lambda _: None  # noqa: E731
    if group.active and config.train_backbone:
        sync_batchnorm(model, device)  # before the optimiser: it replaces the BatchNorm parameters
    try:
        return _fit(model=model, config=config, train_images=train_images, train_labels=train_labels,
                    val_images=val_images, val_labels=val_labels, run_dir=run_dir, device=device,
                    precompute_features=precompute_features, resume=resume, log=log, precision=precision,
                    compile_model=compile_model, group=group, on_epoch=on_epoch, features=features,
                    train_sites=train_sites, val_sites=val_sites, card_extra=card)
    finally:
        if group.active:
            plain_batchnorm(model)


def site_weights(sites: list[str], shares: dict[str, float] | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
    """One weight per image: each site's images together weigh the same (times `shares`[site],
    default 1), and the weights average 1 over all images. With `labels` (class-balanced training),
    each class within a site weighs the same too, as fine-tuning balances each site's rows: class
    weights of the pooled labels times site shares would leave the classes unbalanced wherever
    the sites' class mixes differ."""
    shares = shares or {}
    groups = list(zip(sites, labels.tolist())) if labels is not None else list(sites)
    counts = {g: groups.count(g) for g in dict.fromkeys(groups)}
    per_site = {s: len({g for g in counts if g[0] == s}) for s in sites} if labels is not None else {}
    w = torch.tensor([shares.get(s, 1.0) / counts[g] / per_site.get(s, 1) for s, g in zip(sites, groups)],
                     dtype=torch.float64)
    return (w * len(sites) / w.sum()).float()


def per_site_auc(y: np.ndarray, p: np.ndarray, sites: list[str]) -> dict[str, float]:
    """val_auc_<site> for each site, and val_auc_worst_site, their lowest."""
    sites_arr = np.asarray(sites)
    out = {f"val_auc_{s}": ranking_auc(y[sites_arr == s], p[sites_arr == s]) for s in dict.fromkeys(sites)}
    out["val_auc_worst_site"] = float(min(out.values()))
    return out


def _fit(*, model, config, train_images, train_labels, val_images, val_labels, run_dir, device,
         precompute_features, resume, log, precision, compile_model, group, on_epoch,
         features, train_sites, val_sites, card_extra) -> list[dict]:
    """fit's loop (see fit), every argument by name: 19 of them, where a reordering by position
    would silently swap two."""
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
    scheduler = make_scheduler(optimizer, config, math.ceil(len(train_labels) / config.batch_size))
    generator = torch.Generator().manual_seed(config.seed)  # batch order, apart from init RNG
    aug_generator = torch.Generator().manual_seed(config.seed + 1)
    history: list[dict] = []
    best, first_epoch = -math.inf, 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["rng"]["batch_order"])
        aug_generator.set_state(resume["rng"]["augment"])
        torch.set_rng_state(resume["rng"]["torch"])
        history = [dict(r) for r in resume["history"]]
        best, first_epoch = resume["best_score"], resume["epoch"] + 1
        best_row = next((r for r in history if _score(r, config.select_by) == best), history[-1])
        if group.main:
            _write_history(run_dir, history)  # drop a row written after the last checkpoint
        log(f"{config.task}: resuming after epoch {resume['epoch']} (best {config.select_by} "
            f"{abs(best):.4f})")
    intensity = config.intensity
    start = time.perf_counter()
    if not config.train_backbone and precompute_features and config.augment == "none":
        def compute(which: str) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda x: extract_features(model, x, config.batch_size, device, f"{which} features", intensity,
                                              precision, group)

        train_x, val_x = ((features(compute(w), x, w) if features else compute(w)(x))
                          for w, x in (("train", train_images), ("val", val_images)))
        train_forward, val_forward = wrap(model.fc, group, device), model.fc
        if group.active:
            train_forward = lambda x, rows, fc=train_forward: fc(x)  # noqa: E731
        step_precision = "fp32"  # a 512 x 2 product: nothing to gain, only precision to lose
    else:
        train_x, val_x = stage(train_images, device), stage(val_images, device)
        net = compiled(wrap(model, group, device), compile_model)
        val_net = compiled(model, compile_model) if group.active else net
        dtype = next(model.parameters()).dtype  # float32; float64 where a test asks for exactness
        val_forward = lambda x: val_net(normalize(x, device, intensity).to(dtype))  # noqa: E731

        def train_forward(x: torch.Tensor, rows: tuple[int, int, int] | None = None) -> torch.Tensor:
            jitter = lambda u8: augment(u8, config.augment, aug_generator, rows)  # noqa: E731
            return net(normalize(x, device, intensity, augment=jitter).to(dtype))
        step_precision = precision
    # The same class weights for the validation loss, so it measures what training optimises.
    weight = class_weights(train_labels, config.class_weights, model.fc.out_features)
    weight = weight.to(device, next(model.parameters()).dtype) if weight is not None else None
    several = train_sites is not None and len(set(train_sites)) > 1
    balanced = config.class_weights == "balanced"
    sample_weight = site_weights(train_sites, dict(config.site_weights or ()),
                                 train_labels if balanced else None) if several else None
    train_weight = None if several and balanced else weight  # the classes balanced within each site instead
    # the model card's "trained on": each site's training images, in every checkpoint
    card = {"sites": {s: train_sites.count(s) for s in dict.fromkeys(train_sites)}} if several else {}
    card.update(card_extra or {})
    y_val = val_labels.numpy() if several else None
    train_labels, val_labels = stage(train_labels, device), stage(val_labels, device)
    for epoch in range(first_epoch, config.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        set_train_mode(model, config.train_backbone)
        tr = run_epoch(train_forward, train_x, train_labels, config.batch_size, device, optimizer, generator,
                       desc=f"{config.task} epoch {epoch}/{config.epochs} train", weight=train_weight,
                       label_smoothing=config.label_smoothing, scheduler=scheduler, precision=step_precision,
                       group=group, sample_weight=sample_weight)
        model.eval()
        va = run_epoch(val_forward, val_x, val_labels, config.batch_size, device,
                       desc=f"{config.task} epoch {epoch}/{config.epochs} val", weight=weight,
                       precision=step_precision, group=group)
        now = time.perf_counter()
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
               "val_acc": va["acc"], "val_auc": va["auc"], "lr": lr, "seconds": round(now - start, 3),
               **(per_site_auc(y_val, va["prob"], val_sites) if several else {})}
        start = now
        history.append(row)
        score = _score(row, config.select_by)
        is_best = epoch == 1 or score > best or math.isnan(best)
        if is_best:
            best, best_row = score, row
            if group.main:
                save_checkpoint(run_dir / "best.pt", make_checkpoint(model, config, epoch, row, row["val_loss"],
                                                                     extra={"best_score": best, **card}))
        if group.main:
            state = {"history": history, "best_score": best, **card,
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "rng": {"batch_order": generator.get_state(), "augment": aug_generator.get_state(),
                             "torch": torch.get_rng_state()}}
            save_checkpoint(run_dir / "last.pt", make_checkpoint(model, config, epoch, row, best_row["val_loss"],
                                                                 optimizer, state))
            _write_history(run_dir, history)
            if on_epoch is not None:
                on_epoch(row)
        log(f"{config.task} epoch {epoch}/{config.epochs}: train loss {tr['loss']:.4f} acc {tr['acc']:.3f}"
            f" | val loss {va['loss']:.4f} acc {va['acc']:.3f} auc {va['auc']:.3f} | {row['seconds']:.1f}s"
            + (" *best" if is_best else ""))
        since_best = epoch - int(best_row["epoch"])  # a later epoch that only ties is not better
        if config.patience is not None and since_best >= config.patience:
            log(f"{config.task}: early stop, no better {config.select_by} for {since_best} epochs")
            break
    return history
