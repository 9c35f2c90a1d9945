"""Training augmentation, done on the device in batches, seeded by a `torch.Generator`.

The presets vary what differs between X-ray machines and sites: exposure (brightness, gamma),
contrast, detector blur and noise, framing (zoom) and tilt (rotation). Each image gets its own
random parameters; each change is applied to an image with probability `p`. Left out on
purpose, so the shift benchmark keeps families the training never saw: JPEG re-compression,
down-then-up sampling and histogram stretching (see `shifts.py`).
"""

from __future__ import annotations

import torch

from .shifts import _affine, _clip, blur

AUGMENT_PRESETS: dict[str, dict | None] = {
    "none": None,
    "light": dict(p=0.5, brightness=0.08, contrast=(0.8, 1.2), gamma=(0.8, 1.25), rotate=5.0,
                  zoom=(0.9, 1.1), noise=0.0, blur=0.0),
    "strong": dict(p=0.8, brightness=0.2, contrast=(0.6, 1.4), gamma=(0.6, 1.6), rotate=10.0,
                   zoom=(0.8, 1.2), noise=8.0, blur=1.5),
}


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment(x: torch.Tensor, preset: str, g: torch.Generator) -> torch.Tensor:
    """A randomly changed copy of the uint8 batch `x` (N, 1, H, W); `x` itself for "none"."""
    spec = AUGMENT_PRESETS[preset]
    if spec is None:
        return x
    n, dev = len(x), x.device

    def chosen() -> torch.Tensor:
        return (torch.rand(n, generator=g) < spec["p"]).view(n, 1, 1, 1).to(dev)

    f = x.float()
    # intensity: brightness, contrast about the image mean, gamma (log-uniform)
    delta = _uniform(n, -spec["brightness"], spec["brightness"], g).view(n, 1, 1, 1).to(dev) * 255
    f = torch.where(chosen(), f + delta, f).clamp(0, 255)
    factor = _uniform(n, *spec["contrast"], g).view(n, 1, 1, 1).to(dev)
    mean = f.mean(dim=(1, 2, 3), keepdim=True)
    f = torch.where(chosen(), (f - mean) * factor + mean, f).clamp(0, 255)
    lo, hi = spec["gamma"]
    gam = torch.exp(_uniform(n, float(torch.log(torch.tensor(lo))), float(torch.log(torch.tensor(hi))), g))
    f = torch.where(chosen(), 255 * (f / 255) ** gam.view(n, 1, 1, 1).to(dev), f)
    out = _clip(f)
    # geometry: one affine warp with a random angle and zoom per image
    angle = _uniform(n, -spec["rotate"], spec["rotate"], g) * (torch.rand(n, generator=g) < spec["p"])
    zoom_in = torch.rand(n, generator=g) < spec["p"]
    scale = torch.where(zoom_in, _uniform(n, *spec["zoom"], g), torch.ones(n))
    out = _affine(out, angle, scale)
    # detector: blur (one sigma per batch) and Gaussian noise (per-image strength)
    if spec["blur"] > 0:
        sigma = float(_uniform(1, 0.1, spec["blur"], g))
        out = torch.where(chosen(), blur(out, sigma), out)
    if spec["noise"] > 0:
        std = _uniform(n, 0, spec["noise"], g).view(n, 1, 1, 1).to(dev)
        noisy = _clip(out.float() + std * torch.randn(out.shape, generator=g).to(dev))
        out = torch.where(chosen(), noisy, out)
    return out
