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
smoothing of the source recipe), AdamW with a cosine schedule. Three ways to keep the first site
beyond replay, each a field of `FinetuneSpec`: L2-SP (a penalty toward the source weights in place
of weight decay), LP-FT (head-only epochs first) and WiSE-FT (the source and fine-tuned weights
mixed after training, the coefficient chosen on validation, batch norm re-estimated on both sites);
and a uniform model soup (Wortsman et al. 2022: several fine-tunes from the same source, seeds
apart, their weights averaged, batch norm re-estimated on both sites), which WiSE-FT then mixes
with the source like a single fine-tune.

Every choice (the epoch, the mixing coefficient) reads the validation images of every site the model
serves: the site's validation patients, which the caller splits off by patient, and, when given,
the source run's own validation split; the score is the worst of their ROC AUCs, so a gain at the
site cannot hide a loss at the first. Nothing here sees the images that later score the model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from ..config import CLASSES, TRAIN_CHOICES, FinetuneSpec, TaskConfig
from ..errors import DataError
from ..evaluation.evaluate import predict_logits
from ..training.accel import autocast, widen
from ..training.augment import augment
from ..training.engine import class_weights
from ..training.preprocess import normalize, place
from .weights import adabn, l2sp_penalty, wise_mix

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
    shuffled and dealt `batch_size - k` per step; each step draws `k = round(replay * batch_size)`
    replay images at random (with replacement across steps), k at most `batch_size - 1` so that
    every batch holds `batch_size` images, at least one of them the site's."""
    k_replay = min(round(spec.replay * spec.batch_size), spec.batch_size - 1) if n_replay else 0
    k_site = spec.batch_size - k_replay
    order = torch.randperm(n_site, generator=g)
    steps = []
    for site_idx in order.split(k_site):
        rep = torch.randint(n_replay, (k_replay,), generator=g) if k_replay else torch.empty(0, dtype=torch.long)
        steps.append((site_idx, rep))
    return steps


WISE_GRID = tuple(i / 10 for i in range(11))  # mixing coefficients tried (0: the source, 1: fine-tuned)
BN_IMAGES = 256  # images of each site on which batch norm is re-estimated after mixing


def _check_validation(sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for name, (_, y) in sets.items():
        present = set(torch.as_tensor(y).tolist())
        if present != {0, 1}:
            missing = CLASSES[1 - present.pop()] if present else "any"
            raise DataError(f"{name}: the validation images hold no {missing} image, so no ROC AUC can choose the "
                            "epoch; add patients of that class to the site sample or raise --site-val-ratio")


def validation_scores(model: nn.Module, sets: dict[str, tuple[torch.Tensor, torch.Tensor]], device,
                      intensity: str) -> dict[str, float]:
    """ROC AUC of the model on each validation set (name -> (uint8 images, labels))."""
    model.eval()
    out = {}
    for name, (x, y) in sets.items():
        logits = predict_logits(model, x, 64, device, intensity)
        out[name] = float(roc_auc_score(np.asarray(y), logits[:, 1] - logits[:, 0]))
    return out


def batchnorm_images(images: torch.Tensor, replay: tuple[torch.Tensor, torch.Tensor] | None, g: torch.Generator):
    """Up to BN_IMAGES of the site's training images and as many of the source's, at random."""
    pick = lambda x: x[torch.randperm(len(x), generator=g)[:BN_IMAGES]]  # noqa: E731
    return torch.cat([pick(images)] + ([pick(replay[0])] if replay is not None and len(replay[1]) else []))


def choose_mix(model: nn.Module, source: dict, tuned: dict, sets: dict, bn_images: torch.Tensor, device,
               intensity: str, retrain_bn: bool) -> tuple[float, list[dict]]:
    """WiSE-FT: the coefficient of WISE_GRID whose mixed weights (batch norm re-estimated on
    `bn_images`, images of both sites, when `retrain_bn`) score best on the validation sets (the
    smaller coefficient on ties); the model is left holding that mix. Returns (alpha, rows)."""
    rows, best = [], None
    for alpha in WISE_GRID:
        model.load_state_dict(wise_mix(source, tuned, alpha))
        if retrain_bn and 0 < alpha < 1:
            adabn(model, bn_images, intensity, device)
        scores = validation_scores(model, sets, device, intensity)
        rows.append({"alpha": alpha, **{f"val_auc_{k}": v for k, v in scores.items()}, "score": min(scores.values())})
        if best is None or rows[-1]["score"] > best[1]:
            best = (alpha, rows[-1]["score"], copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return best[0], rows


def finetune(model: nn.Module, config: TaskConfig, spec: FinetuneSpec, images: torch.Tensor, labels: torch.Tensor,
             val_images: torch.Tensor, val_labels: torch.Tensor, device: torch.device | str, *, seed: int = 0,
             replay: tuple[torch.Tensor, torch.Tensor] | None = None, precision: str = "fp32",
             log: Callable[[str], None] = lambda _: None,
             source_val: tuple[torch.Tensor, torch.Tensor] | None = None,
             trained: dict | None = None) -> tuple[nn.Module, list[dict], dict | None]:
    """Fine-tune `model` (trained with `config`) on the site's (images, labels), with `replay`
    (source images, labels) mixed into every batch when `spec.replay` > 0. After each epoch the
    model predicts (val_images, val_labels), the site's held-out patients, and `source_val`, the
    source run's validation split, when given; the epoch with the highest worst-site validation ROC
    AUC (the earlier on ties) is returned, in eval mode, with one history row per epoch ("best" on
    the kept one). With `spec.soup` N > 1, N such fine-tunes from the source (seeds apart; history
    rows carry their "member") are averaged into one model. With `spec.wise`, the result is mixed
    with the source weights. The third value holds what was chosen after training ({"soup": ...,
    "wise": {"alpha": the chosen coefficient, "grid": every coefficient's validation scores}}), or
    None for a plain fine-tune.

    `trained`, when given, holds the fine-tunes already made from this model on these very images
    (one fold of a k-fold evaluation), by their spec without WiSE-FT and seed: WiSE-FT only mixes
    weights after training, so a WiSE variant of a spec trained before mixes that fine-tune instead
    of training the same one again (and a plain spec reuses a WiSE variant's); a soup's first member,
    trained with the same seed, is that plain fine-tune too."""
    sets = {"site": (val_images, val_labels), **({"source": source_val} if source_val is not None else {})}
    _check_validation(sets)
    place(model, device)
    source_state = copy.deepcopy(model.state_dict()) if (spec.wise or spec.soup > 1) else None
    rep = replay if (replay is not None and spec.replay > 0) else None
    # batch norm after mixing is re-estimated on both sites, whether or not the batches replay the source
    bn = batchnorm_images(images, replay, torch.Generator().manual_seed(seed + 2)) if (spec.wise or spec.soup > 1) else None
    key = (replace(spec, wise=False, wise_alpha=None), seed)
    if trained is not None and key in trained:
        state, history, chosen = copy.deepcopy(trained[key])
        model.load_state_dict(state)
        log(f"{spec.name}: the fine-tune {key[0].name} of this fold, trained once, is reused")
    else:
        single = (replace(key[0], soup=1), seed)  # a soup's first member is that fine-tune: same spec, same seed
        first = copy.deepcopy(trained[single][:2]) if spec.soup > 1 and trained and single in trained else None
        history, chosen = _tune(model, config, spec, images, labels, sets, device, seed, rep, precision, log,
                                source_state, bn, first)
        if trained is not None:
            trained[key] = copy.deepcopy((model.state_dict(), history, chosen))
    if spec.wise and spec.wise_alpha is not None:  # a coefficient fixed in advance: nothing chosen
        alpha = spec.wise_alpha
        model.load_state_dict(wise_mix(source_state, model.state_dict(), alpha))
        if spec.train != "fc" and 0 < alpha < 1:
            adabn(model, bn, config.intensity, device)
        scores = validation_scores(model, sets, device, config.intensity)
        chosen["wise"] = {"alpha": alpha, "fixed": True, "grid": [{"alpha": alpha, **{
            f"val_auc_{k}": v for k, v in scores.items()}, "score": min(scores.values())}], "chosen_on": None}
        log(f"{spec.name}: WiSE-FT at the fixed coefficient {alpha:g} (worst-site validation AUC {min(scores.values()):.3f})")
    elif spec.wise:
        tuned = copy.deepcopy(model.state_dict())
        alpha, grid = choose_mix(model, source_state, tuned, sets, bn, device, config.intensity,
                                 retrain_bn=spec.train != "fc")
        chosen["wise"] = {"alpha": alpha, "grid": grid, "chosen_on": list(sets)}
        log(f"{spec.name}: WiSE-FT coefficient {alpha:g} (worst-site validation AUC {grid[int(alpha * 10)]['score']:.3f})")
    return model.eval(), history, chosen or None


def _tune(model: nn.Module, config: TaskConfig, spec: FinetuneSpec, images, labels, sets: dict, device, seed: int,
          rep, precision: str, log: Callable[[str], None], source_state: dict | None,
          bn: torch.Tensor | None, first: tuple[dict, list[dict]] | None = None) -> tuple[list[dict], dict]:
    """The training part of `finetune` (one fine-tune, or the soup of `spec.soup`), the model left
    holding its weights; returns (history, what was chosen: {"soup": ...} or {}). `first`, the
    (weights, history) of the plain fine-tune with this seed, stands in for the soup's first member."""
    history, members = [], []
    for member in range(spec.soup):
        if member:
            model.load_state_dict(source_state)
        if member == 0 and first is not None:
            model.load_state_dict(first[0])
            rows = first[1]
            log(f"soup member 1/{spec.soup}: the fold's fine-tune with this seed, trained once, is reused")
        else:
            member_log = log if spec.soup == 1 else (lambda m, k=member: log(f"soup member {k + 1}/{spec.soup}: {m}"))
            rows = _train(model, config, spec, images, labels, sets, device, seed=seed + SOUP_SEED_STEP * member,
                          replay=rep, precision=precision, log=member_log)
        history += [{**row, "member": member + 1} for row in rows] if spec.soup > 1 else rows
        if spec.soup > 1:
            members.append(copy.deepcopy(model.state_dict()))
    chosen = {}
    if spec.soup > 1:
        model.load_state_dict(average_states(members))
        if spec.train != "fc":  # averaged weights need their own batch-norm statistics
            adabn(model, bn, config.intensity, device)
        scores = validation_scores(model, sets, device, config.intensity)
        chosen["soup"] = {"members": spec.soup, "seeds": [seed + SOUP_SEED_STEP * m for m in range(spec.soup)],
                          "kept_epochs": [r["epoch"] for r in history if r["best"]],
                          **{f"val_auc_{k}": v for k, v in scores.items()}}
        log(f"{spec.name}: the soup of {spec.soup} fine-tunes, " + " | ".join(f"{k} val auc {v:.3f}" for k, v in scores.items()))
    return history, chosen


SOUP_SEED_STEP = 1000  # the seed of a soup's member k: seed + 1000 k (batches, replay draws and augmentation)


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform soup: the mean of every floating tensor of the state dicts (weights and batch-norm
    statistics); integer buffers (batch-norm counters) come from the first."""
    if any(set(s) != set(states[0]) for s in states):
        raise ValueError("the state dicts hold other keys: average weights of one architecture")
    return {k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v.clone()
            for k, v in states[0].items()}


def _train(model: nn.Module, config: TaskConfig, spec: FinetuneSpec, images: torch.Tensor, labels: torch.Tensor,
           sets: dict, device, *, seed: int, replay: tuple[torch.Tensor, torch.Tensor] | None, precision: str,
           log: Callable[[str], None]) -> list[dict]:
    """One fine-tune (see `finetune`): leaves `model` holding its kept epoch; returns its history."""
    params = freeze_for(model, spec.train)
    anchor = [p.detach().clone() for p in params] if spec.l2sp else None
    # L2-SP replaces weight decay: decay would pull the weights toward 0, the penalty toward the source
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0 if spec.l2sp else spec.weight_decay)
    g = torch.Generator().manual_seed(seed)
    aug_g = torch.Generator().manual_seed(seed + 1)
    rep_x, rep_y = replay if replay is not None else (images[:0], labels[:0])
    steps_per_epoch = len(replay_batches(len(labels), len(rep_y), spec, torch.Generator().manual_seed(0)))
    total = spec.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    w_site = class_weights(labels, "balanced")
    w_rep = class_weights(rep_y, "balanced") if len(rep_y) else None
    dtype = next(model.parameters()).dtype
    best_score, best_state, best_epoch, history = -math.inf, None, None, []
    for epoch in range(1, spec.epochs + 1):
        stage = "fc" if epoch <= spec.lp_epochs else spec.train  # LP-FT: the head alone first
        freeze_for(model, stage)
        train_mode(model, stage)
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
            if anchor is not None:
                loss = loss + spec.l2sp / 2 * l2sp_penalty(params, anchor)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(y)
            seen += len(y)
        scores = validation_scores(model, sets, device, config.intensity)
        score = min(scores.values())  # the worst site decides
        history.append({"epoch": epoch, "train_loss": total_loss / max(seen, 1), "val_auc": scores["site"],
                        **({"val_auc_source": scores["source"]} if "source" in scores else {}),
                        "score": score, "lr": optimizer.param_groups[0]["lr"]})
        log(f"{spec.name} epoch {epoch}/{spec.epochs}: train loss {total_loss / max(seen, 1):.4f} | "
            + " | ".join(f"{k} val auc {v:.3f}" for k, v in scores.items()))
        if score > best_score:
            best_score, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
    for row in history:
        row["best"] = row["epoch"] == best_epoch
    for p in model.parameters():
        p.requires_grad_(True)
    model.load_state_dict(best_state)
    return history


def kept_epoch(history: list[dict]) -> int | None:
    """The epoch whose weights a fine-tuning returned (its "best" row)."""
    return next((row["epoch"] for row in history if row.get("best")), None)
