"""Weight-space tools for fitting a model at a site without losing the first: batch-norm
statistics re-estimated on images (AdaBN), weight-space ensembling of the source and the fine-tuned
weights (WiSE-FT, Wortsman et al. 2022; PAINT, Ilharco et al. 2022) and the L2-SP penalty toward
the source weights (Li et al. 2018). Pure functions of models, state dicts and tensors."""

from __future__ import annotations

import torch
from torch import nn

from ..training.preprocess import normalize, place


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adabn(model: nn.Module, images: torch.Tensor, intensity: str, device: torch.device | str,
          batch_size: int = 64) -> nn.Module:
    """AdaBN: every batch-norm layer's running mean and variance re-estimated on `images` (the
    average over near-equal batches, in a fixed order); nothing else changes. Returns the model in
    eval mode."""
    place(model, device)
    layers = batch_norms(model)
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    for chunk in torch.tensor_split(images, max(1, -(-len(images) // batch_size))):
        model(normalize(chunk, device, intensity))
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    return model.eval()


def wise_mix(source: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * source + alpha * tuned for every floating tensor of the two state dicts (weights
    and batch-norm statistics); integer buffers (batch-norm counters) come from `tuned`. alpha 0 is
    the source, 1 the fine-tuned model."""
    if set(source) != set(tuned):
        raise ValueError("the two state dicts hold other keys: mix weights of one architecture")
    return {k: torch.lerp(source[k].to(tuned[k].dtype), tuned[k], alpha) if tuned[k].is_floating_point()
            else tuned[k].clone() for k in tuned}


def l2sp_penalty(params: list[nn.Parameter], anchor: list[torch.Tensor]) -> torch.Tensor:
    """L2-SP: the squared distance of the trained parameters from their starting point (the
    source weights), summed; zero at the source. The loss adds `l2sp / 2` times it."""
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
