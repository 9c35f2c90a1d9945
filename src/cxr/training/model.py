"""torchvision's ResNet-18 with a 2-way head: building it, loading ImageNet weights, freezing.

The model knows nothing of folders or data; it takes normalised (N, 3, H, W) float tensors.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from ..config import CLASSES
from ..errors import WeightsError

IMAGENET_WEIGHTS = ResNet18_Weights.IMAGENET1K_V1


def _cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_WEIGHTS.url).name


def imagenet_state_dict(weights_path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """ResNet-18 ImageNet weights from `weights_path`, else through torchvision's cache/download.

    Raises WeightsError with both ways to fix it when neither works.
    """
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise WeightsError(f"{path}: weights file not found; pass --weights with a torchvision "
                               "resnet18 state dict (torch.save(resnet18(weights=...).state_dict(), PATH))")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure to unpickle means the file is not usable
            raise WeightsError(f"{path}: not a loadable PyTorch state dict ({type(e).__name__}); pass "
                               "a torchvision resnet18 state dict saved with torch.save") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(f"{path}: not a state dict of tensors; pass a torchvision resnet18 "
                               "state dict (model.state_dict()), not a whole model or a checkpoint")
        return state
    said = io.StringIO()
    try:
        # torch.hub prints "Downloading: URL to PATH" before it knows whether it can: offline, that
        # line came before the error. It is shown once the download has succeeded.
        with contextlib.redirect_stdout(said):
            state = IMAGENET_WEIGHTS.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # offline, proxy, corrupted cache: all end the same way for the user
        raise WeightsError(
            f"ImageNet weights for ResNet-18 are not in torchvision's cache ({_cache_path()}) and could "
            f"not be downloaded ({type(e).__name__}); either run once with internet access so "
            "torchvision caches them, or pass --weights PATH with a resnet18 state dict") from None
    print(said.getvalue(), end="")
    return state


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Copy every ResNet-18 weight except `fc` (replaced by our 2-way head) into `model`."""
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(expected) - set(backbone))
    unexpected = sorted(set(backbone) - set(expected))
    wrong = sorted(k for k in set(expected) & set(backbone) if backbone[k].shape != expected[k])
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else f"{wrong[0]} has shape {tuple(backbone[wrong[0]].shape)}, "
                       f"ResNet-18 needs {tuple(expected[wrong[0]])}")
        raise WeightsError(f"{source}: not ResNet-18 weights ({detail}); pass a torchvision resnet18 "
                           "state dict")
    model.load_state_dict(backbone, strict=False)


def build_model(pretrained_state: dict[str, torch.Tensor] | None = None, train_backbone: bool = True,
                source: str = "weights", n_classes: int = len(CLASSES)) -> nn.Module:
    """ResNet-18 with `fc = Linear(512, n_classes)` (2: the study's); ImageNet backbone when `pretrained_state` is given;
    with `train_backbone=False` every parameter but `fc` is frozen (requires_grad False)."""
    model = resnet18(weights=None)
    if pretrained_state is not None:
        load_backbone(model, pretrained_state, source)
    model.fc = nn.Linear(model.fc.in_features, n_classes)
    if not train_backbone:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("fc.")
    return model


def set_train_mode(model: nn.Module, train_backbone: bool) -> None:
    """Train mode for what trains. A frozen backbone stays in eval mode, so its batch-norm running
    statistics remain ImageNet's instead of drifting towards each training batch."""
    model.train(train_backbone)
    model.fc.train()


def backbone(model: nn.Module) -> nn.Module:
    """Everything before `fc`: images -> (N, 512) pooled features (shares `model`'s modules)."""
    children = [m for name, m in model.named_children() if name != "fc"]
    return nn.Sequential(*children, nn.Flatten(1))


def cam_target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional stage, whose activations `fc` weighs after global average pooling."""
    return model.layer4
