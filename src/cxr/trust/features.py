"""What the detectors read: the spatial mean of each ResNet-18 stage's output.

Recorded by forward hooks during the pass that computes the logits, so `cxr predict` scores an
image from the same forward pass that predicts it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

LAYERS = ("layer1", "layer2", "layer3", "layer4")  # 64, 128, 256 and 512 channels; layer4's mean is the
#                                                    penultimate feature that fc reads


@contextlib.contextmanager
def pooled_features(net: nn.Module, layers: tuple[str, ...] = LAYERS) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, each forward pass of `net` leaves {layer: (N, C) float32 spatial means} in the
    dict it yields (the last pass's); the hooks are removed on leaving."""
    store: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, _inputs, output: torch.Tensor) -> None:
            store[name] = output.detach().float().mean((2, 3)).cpu()
        return record

    handles = [getattr(net, name).register_forward_hook(hook(name)) for name in layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def forward_with_features(net: nn.Module, images: torch.Tensor, device: torch.device | str, intensity: str = "none",
                          batch_size: int = 64, layers: tuple[str, ...] = LAYERS
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(N, K) float32 logits of (N, 1, S, S) uint8 images, the network in eval mode, and the pooled
    features of each stage {layer: (N, C)} from the same passes."""
    from ..training.preprocess import normalize, place

    place(net, device).eval()
    logits, feats = [], {name: [] for name in layers}
    with pooled_features(net, layers) as store:
        for i in range(0, len(images), batch_size):
            logits.append(net(normalize(images[i:i + batch_size], device, intensity)).float().cpu())
            for name in layers:
                feats[name].append(store[name])
    k = net.fc.out_features
    return (torch.cat(logits) if logits else torch.empty(0, k),
            {name: torch.cat(v) if v else torch.empty(0, getattr(net, name)[-1].bn2.num_features)
             for name, v in feats.items()})
