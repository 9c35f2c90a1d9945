"""Self-supervised pretraining of torchvision's ResNet-18 on unlabelled radiographs (`cxr pretrain`).

Each step takes a batch of decoded uint8 images, draws two views of every image on the device
(`views`: augment.py's "views" preset, after the same intensity normalisation the classifier will
see) and trains the backbone so that the two views of one image agree:

- "simclr" (Chen et al. 2020): a projection head and the NT-Xent loss, every other view in the
  batch a negative;
- "byol" (Grill et al. 2020): an online network with a predictor chases a momentum copy of itself
  (no negatives, so small batches hurt less).

The losses, heads and momentum utilities are `lightly`'s (an optional dependency: `cxr[pretrain]`);
the loop is this project's, so it has the fast path of `cxr train` (decoded-once images, bf16 where
native, channels_last on the CPU), a progress bar with the loss and images/s, a resume state
written atomically after every epoch (a kill loses at most the epoch in progress, and `--resume`
continues the same loss curve), and torchrun (each process takes its share of every batch;
SimCLR's negatives are gathered from all of them). What it writes: `backbone.pt` (a torchvision
resnet18 state dict without `fc`, after every epoch), `history.csv`, `pretrain_last.pt`.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet18
from tqdm import tqdm

from ..config import PretrainSpec
from ..errors import CxrError
from ..files import save_torch, write_csv
from .accel import autocast, stage, widen
from .augment import augment
from .distributed import (
    SINGLE,
    Group,
    plain_batchnorm,
    quiet,
    share,
    sum_all,
    sync_batchnorm,
    wrap,
)
from .preprocess import normalize, place

STATE_FORMAT = "cxr-pretrain-v1"
HISTORY = ["epoch", "loss", "lr", "images_per_s", "seconds"]


def _lightly():
    try:
        from lightly.loss import NegativeCosineSimilarity, NTXentLoss
        from lightly.models.modules.heads import (
            BYOLPredictionHead,
            BYOLProjectionHead,
            SimCLRProjectionHead,
        )
        from lightly.models.utils import deactivate_requires_grad, update_momentum
        from lightly.utils.scheduler import cosine_schedule
    except ImportError:
        raise CxrError("cxr pretrain needs the lightly package: pip install 'cxr[pretrain]' (or pip install lightly)") from None
    return dict(NTXentLoss=NTXentLoss, NegativeCosineSimilarity=NegativeCosineSimilarity,
                SimCLRProjectionHead=SimCLRProjectionHead, BYOLProjectionHead=BYOLProjectionHead,
                BYOLPredictionHead=BYOLPredictionHead, deactivate_requires_grad=deactivate_requires_grad,
                update_momentum=update_momentum, cosine_schedule=cosine_schedule)


def resnet_backbone() -> nn.Module:
    """torchvision's ResNet-18 with `fc` replaced by the identity: images -> (N, 512) features."""
    net = resnet18(weights=None)
    net.fc = nn.Identity()
    return net


def backbone_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone as a torchvision resnet18 state dict without `fc` (what `--weights` loads)."""
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if not k.startswith("fc.")}


class SelfSupervised(nn.Module):
    """The trained part (backbone and heads) and, for BYOL, the momentum target beside it."""

    def __init__(self, spec: PretrainSpec, group: Group = SINGLE):
        super().__init__()
        if not (math.isfinite(spec.temperature) and spec.temperature > 0):
            raise CxrError(f"temperature {spec.temperature}: NT-Xent's temperature must be a finite number above 0 "
                           "(0 divides by zero, below 0 inverts the objective)")
        lib = _lightly()
        self.spec, self.lib = spec, lib
        self.backbone = resnet_backbone()
        if spec.method == "simclr":
            self.projection = lib["SimCLRProjectionHead"](512, 512, 128)
            self.prediction = nn.Identity()
            self.criterion = lib["NTXentLoss"](temperature=spec.temperature, gather_distributed=group.active)
            self.target = None
        else:
            self.projection = lib["BYOLProjectionHead"](512, 1024, 256)
            self.prediction = lib["BYOLPredictionHead"](256, 1024, 256)
            self.criterion = lib["NegativeCosineSimilarity"]()
            target = nn.ModuleDict({"backbone": copy.deepcopy(self.backbone), "projection": copy.deepcopy(self.projection)})
            lib["deactivate_requires_grad"](target)
            self.__dict__["target"] = target  # not a submodule: no optimiser, no DDP, its own state entry

    def online(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction(self.projection(self.backbone(x)))

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        """Both views through the trained network in one batch (batch norm sees both)."""
        z = self.online(torch.cat([v1, v2]))
        return z

    @torch.no_grad()
    def targets(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        t = self.target
        return t["projection"](t["backbone"](torch.cat([v1, v2])))

    def loss(self, z: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        a, b = z.float().chunk(2)
        if self.spec.method == "simclr":
            return self.criterion(a, b)
        ta, tb = targets.float().chunk(2)
        return 0.5 * (self.criterion(a, tb) + self.criterion(b, ta))  # symmetric: each view predicts the other

    def step_target(self, step: int, total: int) -> None:
        if self.target is None:
            return
        m = self.lib["cosine_schedule"](step, max(total, 1), self.spec.momentum, 1.0)
        self.lib["update_momentum"](self.backbone, self.target["backbone"], m)
        self.lib["update_momentum"](self.projection, self.target["projection"], m)


def views(images: torch.Tensor, device: torch.device | str, intensity: str, g: torch.Generator,
          rows: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently drawn views of every uint8 image, normalised as the classifier's input."""
    def draw(u8):
        return augment(u8, "views", g, rows)

    return normalize(images, device, intensity, augment=draw), normalize(images, device, intensity, augment=draw)


def _schedule(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
    warmup, total = steps_per_epoch, max(epochs * steps_per_epoch, steps_per_epoch + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pretrain(images: torch.Tensor, spec: PretrainSpec, out: Path, device: torch.device | str,
             precision: str = "fp32", resume: dict | None = None, group: Group = SINGLE,
             log: Callable[[str], None] = print, on_epoch: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
             extra_state: dict | None = None) -> list[dict]:
    """Pretrain on `images` ((N, 1, S, S) uint8) as `spec` says, writing into `out` after every
    epoch: backbone.pt, history.csv and pretrain_last.pt (everything `resume` needs; `extra_state`
    is stored in it as it is). `on_epoch(epoch, backbone_state)` runs after each epoch's files."""
    out = Path(out)
    torch.manual_seed(spec.seed)  # the initial weights
    model = SelfSupervised(spec, group)
    place(model, device)
    if model.target is not None:
        place(model.target, device)
    if not group.main:
        log = lambda _: None  # noqa: E731
    if group.active:
        sync_batchnorm(model.backbone, device)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=spec.lr, weight_decay=spec.weight_decay)
    batches_per_epoch = len(images) // spec.batch_size if len(images) >= spec.batch_size else 1
    scheduler = _schedule(optimizer, batches_per_epoch, spec.epochs)
    order, draws = torch.Generator().manual_seed(spec.seed), torch.Generator().manual_seed(spec.seed + 1)
    history: list[dict] = []
    first = 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        if model.target is not None:
            model.target.load_state_dict(resume["target"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        order.set_state(resume["rng"]["order"])
        draws.set_state(resume["rng"]["views"])
        history, first = [dict(r) for r in resume["history"]], resume["epoch"] + 1
        log(f"pretrain: resuming after epoch {resume['epoch']}")
    net = wrap(model, group, device)
    x_all = stage(images, device)
    step = (first - 1) * batches_per_epoch
    total_steps = spec.epochs * batches_per_epoch
    try:
        for epoch in range(first, spec.epochs + 1):
            model.train()
            if model.target is not None:
                model.target.train()
            lr = optimizer.param_groups[0]["lr"]
            start, seen = time.perf_counter(), 0
            total = torch.zeros((), dtype=torch.float64, device=device)
            perm = torch.randperm(len(images), generator=order)
            # whole batches only: a contrastive loss over a handful of leftover images is noise
            idx_batches = list(perm.split(spec.batch_size))
            if len(idx_batches) > 1 and len(idx_batches[-1]) < spec.batch_size:
                idx_batches = idx_batches[:-1]
            bar = tqdm(idx_batches, desc=f"pretrain epoch {epoch}/{spec.epochs}", unit="batch", leave=False,
                       disable=quiet())
            for i, idx in enumerate(bar):
                rows = (*share(len(idx), group), len(idx))
                mine = idx[rows[0]:rows[1]].to(x_all.device)
                v1, v2 = views(x_all[mine], device, spec.intensity, draws, rows if group.active else None)
                with autocast(device, precision):
                    z = widen(net(v1, v2))
                    t = widen(model.targets(v1, v2)) if model.target is not None else None
                loss = model.loss(z, t)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                model.step_target(step, total_steps)
                total += loss.detach().double()
                seen += len(idx)
                if i % 5 == 0 or i == len(idx_batches) - 1:
                    rate = seen / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.1f}")
            seconds = time.perf_counter() - start
            mean = (sum_all(total, group) / group.world).item() / max(len(idx_batches), 1)
            row = {"epoch": epoch, "loss": mean, "lr": lr, "images_per_s": round(seen / max(seconds, 1e-9), 2),
                   "seconds": round(seconds, 3)}
            history.append(row)
            if group.main:
                weights = backbone_state(model.backbone)
                save_torch(out / "pretrain_last.pt", {
                    **(extra_state or {}), "format": STATE_FORMAT, "epoch": epoch, "spec": spec.to_dict(),
                    "model": model.state_dict(),
                    "target": model.target.state_dict() if model.target is not None else None,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": {"order": order.get_state(), "views": draws.get_state()}, "history": history})
                save_torch(out / "backbone.pt", weights)
                write_csv(out / "history.csv", HISTORY, ([r[c] for c in HISTORY] for r in history))  # last: it tells
                if on_epoch is not None:
                    on_epoch(epoch, weights)
            log(f"pretrain epoch {epoch}/{spec.epochs} ({spec.method}): loss {mean:.4f} | "
                f"{row['images_per_s']:.1f} images/s | {seconds:.1f}s")
    finally:
        if group.active:
            plain_batchnorm(model.backbone)
    return history
