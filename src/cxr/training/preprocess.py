"""From stored uint8 grayscale images to the model's input, on the device, in batches.

One function, `normalize`, serves training, evaluation, CAM and prediction, so every path feeds
the model the same way. `intensity` is part of a task's config:
- "none": ImageNet normalisation of the three (equal) channels, as in the study;
- "equalize": histogram equalisation of each image first, so exposure, contrast and gamma
  differences between machines largely cancel before the network sees the image;
- "standardize": each image to zero mean and unit variance (no ImageNet statistics).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from .accel import to_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTENSITY = ("none", "equalize", "standardize")


def memory_format(device: torch.device | str) -> torch.memory_format:
    """channels_last where it was measured to pay: on the CPU (2 cores, 224 px, benchmarks/bench.py)
    training ran 1.14x faster in fp32 and 1.29x in bf16 (bench.py "train" variants: 20.8 against
    18.2, 50.3 against 38.9 images/s). Not measured on CUDA yet (benchmarks/gpu_check.sh
    measures it): left alone there."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def place(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move `model` to `device` in the memory format `normalize` produces there."""
    return model.to(device=device, memory_format=memory_format(device))


def normalize(images: torch.Tensor, device: torch.device | str, intensity: str = "none",
              augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(N, 1, H, W) uint8 grayscale -> (N, 3, H, W) float model input on `device`.

    `augment` (training only) maps uint8 to uint8 and runs after histogram equalisation, so what
    it varies survives to the network (see augment.py), and before the float normalisation."""
    x = to_device(images, device)
    if intensity == "equalize":
        x = TF.equalize(x)
    if augment is not None:
        x = augment(x)
    x = x.float().div_(255)
    if intensity == "standardize":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
        x = ((x - mean) / std).expand(-1, 3, -1, -1)
    elif intensity in ("none", "equalize"):
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std  # broadcasting makes the three (equal) channels ImageNet expects
    else:
        raise ValueError(f"unknown intensity normalisation {intensity!r}; choose from {INTENSITY}")
    return x.contiguous(memory_format=memory_format(x.device))
