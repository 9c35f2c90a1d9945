"""Training augmentation, done on the device in batches, seeded by a `torch.Generator`.

Augmentation runs on the image the network would otherwise see: after the per-image intensity
normalisation (see `preprocess.normalize`, which calls it). Histogram equalisation undoes any
monotone change of grey levels, so exposure, contrast or gamma jitter applied before it would
be erased (measured: gamma 0.6 left 0.28 grey levels of change after equalisation, against 33.5
before); after it, the jitter keeps the network from keying on exact grey levels, such as the
black level that separates the classes in the training images but not in the official test
split (the generalisation study in the README).

The presets vary what differs between X-ray machines and sites: exposure, contrast, gamma,
detector blur and noise, framing and tilt. Each image gets its own random parameters. Framing
is either a zoom about the centre (zoom out pads with black) or, in "crop", a random resized
crop (a random part of the image, area and aspect ratio drawn per image, stretched back to full
size, as torchvision's RandomResizedCrop) that never adds black borders. Left out on purpose, so
the shift benchmark keeps families the training never saw: JPEG re-compression, down-then-up
sampling and histogram stretching (see `shifts.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import AUGMENT_PRESETS
from .shifts import _affine, _clip, blur


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _log_uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.exp(_uniform(n, math.log(lo), math.log(hi), g))


def crop_rotate(x: torch.Tensor, angle_deg: torch.Tensor, width: torch.Tensor, height: torch.Tensor,
                cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Per image: the window of `width` x `height` (fractions of the image) centred at (cx, cy)
    (in [-1, 1] image coordinates), rotated by `angle_deg`, resampled to the full size."""
    if len(x) == 0:  # a process's empty share of a batch (torchrun): the draws are made, nothing to warp
        return x
    a = angle_deg.float() * math.pi / 180
    cos, sin = torch.cos(a), torch.sin(a)
    w, h = width.float(), height.float()
    theta = torch.stack([torch.stack([cos * w, -sin * h, cx.float()], 1),
                         torch.stack([sin * w, cos * h, cy.float()], 1)], 1).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return _clip(F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False))


def _crop_geometry(x: torch.Tensor, spec: dict, g: torch.Generator, n: int, mine: slice) -> torch.Tensor:
    area = _uniform(n, *spec["crop_area"], g)
    aspect = _log_uniform(n, *spec["crop_aspect"], g)
    w = (area * aspect).sqrt().clamp(max=1.0)
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(n, generator=g) - 1)
    cy = (1 - h) * (2 * torch.rand(n, generator=g) - 1)
    angle = _uniform(n, -spec["rotate"], spec["rotate"], g)
    return crop_rotate(x, angle[mine], w[mine], h[mine], cx[mine], cy[mine])


def augment(x: torch.Tensor, preset: str, g: torch.Generator,
            rows: tuple[int, int, int] | None = None) -> torch.Tensor:
    """A randomly changed copy of the uint8 batch `x` (N, 1, H, W); `x` itself for "none".

    `rows` = (start, stop, total): `x` is rows start:stop of a batch of `total` images (one
    training process's share, see distributed.py): the random parameters are drawn for all
    `total` images, in the same order as for the whole batch, and this share's are applied."""
    spec = AUGMENT_PRESETS[preset]
    if spec is None:
        return x
    dev = x.device
    start, stop, n = rows if rows is not None else (0, len(x), len(x))
    if stop - start != len(x):
        raise ValueError(f"rows {rows} do not match a batch of {len(x)} images")
    mine = slice(start, stop)

    def chosen() -> torch.Tensor:
        return (torch.rand(n, generator=g) < spec["p"])[mine].view(-1, 1, 1, 1).to(dev)

    def per_image(lo: float, hi: float, log: bool = False) -> torch.Tensor:
        return ((_log_uniform if log else _uniform)(n, lo, hi, g))[mine].view(-1, 1, 1, 1).to(dev)

    f = x.float()
    # intensity: exposure (a gain) or brightness (an offset), contrast about the image mean, gamma
    if "exposure" in spec:
        f = torch.where(chosen(), f * per_image(*spec["exposure"]), f).clamp(0, 255)
    if "brightness" in spec:
        f = torch.where(chosen(), f + per_image(-spec["brightness"], spec["brightness"]) * 255, f).clamp(0, 255)
    factor = per_image(*spec["contrast"])
    mean = f.mean(dim=(1, 2, 3), keepdim=True)
    f = torch.where(chosen(), (f - mean) * factor + mean, f).clamp(0, 255)
    if "gamma" in spec:
        f = torch.where(chosen(), 255 * (f / 255) ** per_image(*spec["gamma"], log=True), f)
    out = _clip(f)
    # geometry: one affine warp per image
    if "crop_area" in spec:
        out = _crop_geometry(out, spec, g, n, mine)
    else:
        angle = _uniform(n, -spec["rotate"], spec["rotate"], g) * (torch.rand(n, generator=g) < spec["p"])
        zoom_in = torch.rand(n, generator=g) < spec["p"]
        scale = torch.where(zoom_in, _uniform(n, *spec["zoom"], g), torch.ones(n))
        out = _affine(out, angle[mine], scale[mine])
    # detector: blur (one sigma per batch) and Gaussian noise (per-image strength)
    if spec["blur"] > 0:
        sigma = float(_uniform(1, 0.1, spec["blur"], g))
        out = torch.where(chosen(), blur(out, sigma), out)
    if spec["noise"] > 0:
        std = _uniform(n, 0, spec["noise"], g)[mine].view(-1, 1, 1, 1).to(dev)
        noise = torch.randn((n, *out.shape[1:]), generator=g)[mine]
        noisy = _clip(out.float() + std * noise.to(dev))
        out = torch.where(chosen(), noisy, out)
    return out
