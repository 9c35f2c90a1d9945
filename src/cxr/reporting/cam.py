"""Class Activation Maps as arrays (no drawing): classic CAM and Grad-CAM for ResNet-18.

CAM (Zhou et al., 2016): the `fc` weights of the target class applied to the `layer4`
activations. Grad-CAM (Selvaraju et al., 2017): the activations weighted by the spatial mean of
the target logit's gradient. Behind ResNet-18's global average pooling the gradient of the logit
with respect to each activation is `fc.weight[c] / (H * W)`, so the two are the same map up to
that positive scale; a test checks it.

Written here rather than taken from `grad-cam` (pytorch-grad-cam): both methods fit in this
file, while that package would add OpenCV, ttach and more to every install for two of its
many methods. The shape follows it: one base class does the hooks and the post-processing, each
method overrides a single function, and the hooks live only inside a `with` block.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..training.model import cam_target_layer


class ActivationMap:
    """Base: captures the target layer's activations (and gradients when needed) in a `with` block."""

    needs_gradients = False

    def __init__(self, model: nn.Module, target_layer: nn.Module | None = None):
        self.model = model
        self.layer = target_layer if target_layer is not None else cam_target_layer(model)
        self._handles: list = []
        self.activations: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None

    def __enter__(self) -> "ActivationMap":
        self._handles.append(self.layer.register_forward_hook(self._keep))
        return self

    def __exit__(self, *exc) -> None:  # removes the hooks; exceptions propagate
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _keep(self, module, inputs, output) -> None:
        if self.needs_gradients:
            if output.requires_grad:
                output.retain_grad()
            else:  # a frozen backbone: nothing before the layer needs a gradient, so start one here
                output.requires_grad_(True)
        self.activations = output

    def weights(self, target: torch.Tensor) -> torch.Tensor:
        """(N, C) channel weights for the target classes; each method defines this."""
        raise NotImplementedError

    def raw(self, x: torch.Tensor, target=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps at the layer's resolution, before any scaling; softmax probabilities). The target
        class: an index, a tensor of indices, a function of the logits, or None for the argmax."""
        if not self._handles:
            raise RuntimeError("use the CAM object inside a `with` block")
        self.model.eval()
        with torch.set_grad_enabled(self.needs_gradients):
            logits = self.model(x)
            self.last_logits = logits.detach()
            if target is None:
                target = logits.argmax(1)
            elif callable(target):
                target = target(logits.detach())
            target = torch.as_tensor(target, device=logits.device).expand(len(x))
            if self.needs_gradients:
                self.model.zero_grad(set_to_none=True)
                logits.gather(1, target[:, None]).sum().backward()
            w = self.weights(target)
            maps = torch.einsum("nc,nchw->nhw", w, self.activations)
        return maps.detach(), torch.softmax(logits.detach(), 1)

    def __call__(self, x: torch.Tensor, target=None) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W) maps in [0, 1] at the input's size, and P(PNEUMONIA) per image."""
        maps, probs = self.raw(x, target)
        return normalize_maps(maps, x.shape[-2:]), probs[:, 1].cpu().numpy()


class CAM(ActivationMap):
    def weights(self, target: torch.Tensor) -> torch.Tensor:
        return self.model.fc.weight.detach()[target]


class GradCAM(ActivationMap):
    needs_gradients = True

    def weights(self, target: torch.Tensor) -> torch.Tensor:
        return self.activations.grad.mean(dim=(2, 3))


METHODS = {"cam": CAM, "gradcam": GradCAM}


def normalize_maps(maps: torch.Tensor, size) -> np.ndarray:
    """ReLU (keep evidence for the class), bilinear upsampling to `size`, then each map to [0, 1]."""
    up = F.interpolate(F.relu(maps)[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    flat = up.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(up).cpu().numpy()
