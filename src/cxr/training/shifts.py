"""Acquisition shifts on batches of uint8 images, for the robustness benchmark and augmentation.

Every function maps (N, 1, H, W) uint8 to the same shape and dtype, runs on whatever device the
tensor is on, and is deterministic for a given `torch.Generator` (only `noise` draws random
numbers). `SHIFTS` fixes the benchmark: each shift at three severities, mildest first. The
values imitate what differs between X-ray machines and sites: exposure (brightness, gamma),
contrast and windowing, detector blur and noise, compression, resampling, framing and tilt.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF


def _clip(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


def brightness(x: torch.Tensor, delta: float, g=None) -> torch.Tensor:
    """Add `delta` (a fraction of full scale) to every pixel: over- or under-exposure."""
    return _clip(x.float() + 255 * delta)


def contrast(x: torch.Tensor, factor: float, g=None) -> torch.Tensor:
    """Scale each image's deviations from its mean by `factor` (< 1: flatter)."""
    f = x.float()
    mean = f.mean(dim=(1, 2, 3), keepdim=True)
    return _clip((f - mean) * factor + mean)


def gamma(x: torch.Tensor, value: float, g=None) -> torch.Tensor:
    """255 * (x / 255) ** value: a different detector response curve."""
    return _clip(255 * (x.float() / 255) ** value)


def stretch(x: torch.Tensor, percent: float, g=None) -> torch.Tensor:
    """Map each image's [percent, 100 - percent] percentiles to [0, 255]: another windowing."""
    f = x.float().flatten(1)
    lo = torch.quantile(f, percent / 100, dim=1, keepdim=True)
    hi = torch.quantile(f, 1 - percent / 100, dim=1, keepdim=True)
    return _clip(((f - lo) / (hi - lo).clamp_min(1) * 255).view_as(x))


def blur(x: torch.Tensor, sigma: float, g=None) -> torch.Tensor:
    """Gaussian blur, `sigma` in pixels at 224 px (scaled with the image size)."""
    s = sigma * x.shape[-1] / 224
    k = 2 * math.ceil(3 * s) + 1
    return TF.gaussian_blur(x, [k, k], [s, s])


def noise(x: torch.Tensor, std: float, g: torch.Generator | None = None) -> torch.Tensor:
    """Additive Gaussian noise of `std` grey levels (quantum noise of a low dose)."""
    n = torch.randn(x.shape, generator=g, device="cpu").to(x.device)
    return _clip(x.float() + std * n)


def jpeg(x: torch.Tensor, quality: int, g=None) -> torch.Tensor:
    """Re-compress each image as JPEG at `quality` (Pillow, as most export tools do)."""
    out = []
    for img in x.cpu().numpy()[:, 0]:
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("L")))
    return torch.from_numpy(np.stack(out))[:, None].to(x.device)


def downup(x: torch.Tensor, scale: float, g=None) -> torch.Tensor:
    """Down-sample by `scale` and back: a lower-resolution detector or an upscaled export."""
    h, w = x.shape[-2:]
    small = F.interpolate(x.float(), size=(max(1, round(h * scale)), max(1, round(w * scale))),
                          mode="bilinear", antialias=True, align_corners=False)
    return _clip(F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False))


def _affine(x: torch.Tensor, angle_deg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rotate by `angle_deg` and zoom by `scale` (> 1: in) about the centre, per image; black fill."""
    if len(x) == 0:  # a process's empty share of a batch (torchrun): nothing to warp
        return x
    a = angle_deg.float().to(x.device) * math.pi / 180
    s = scale.float().to(x.device)
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return _clip(F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False))


def zoom(x: torch.Tensor, factor: float, g=None) -> torch.Tensor:
    """factor > 1: crop the centre and enlarge (tighter framing); < 1: shrink with black padding."""
    n = len(x)
    return _affine(x, torch.zeros(n), torch.full((n,), float(factor)))


def rotate(x: torch.Tensor, degrees: float, g=None) -> torch.Tensor:
    """Rotate by `degrees` about the centre (a tilted patient or detector)."""
    n = len(x)
    return _affine(x, torch.full((n,), float(degrees)), torch.ones(n))


SHIFTS: dict[str, tuple] = {  # name: (function, three severities, mildest first)
    "brightness+": (brightness, (0.08, 0.16, 0.25)),
    "brightness-": (brightness, (-0.08, -0.16, -0.25)),
    "contrast": (contrast, (0.8, 0.6, 0.4)),
    "gamma<1": (gamma, (0.8, 0.6, 0.45)),
    "gamma>1": (gamma, (1.25, 1.6, 2.2)),
    "stretch": (stretch, (1.0, 3.0, 8.0)),
    "blur": (blur, (0.75, 1.5, 3.0)),
    "noise": (noise, (4.0, 8.0, 16.0)),
    "jpeg": (jpeg, (50, 25, 10)),
    "downup": (downup, (0.5, 0.35, 0.25)),
    "zoom-in": (zoom, (1.1, 1.2, 1.35)),
    "zoom-out": (zoom, (0.9, 0.8, 0.7)),
    "rotate": (rotate, (5.0, 10.0, 15.0)),
}


def apply_shift(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """`x` under shift `name` at severity 1, 2 or 3, seeded."""
    fn, values = SHIFTS[name]
    g = torch.Generator().manual_seed(seed * 1000 + severity)
    return fn(x, values[severity - 1], g)

# Families the augmentation presets never apply: robustness to these is measured, not trained for.
NOT_AUGMENTED = ("stretch", "jpeg", "downup")
