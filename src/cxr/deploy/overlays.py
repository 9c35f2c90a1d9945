"""The CAM overlay files `cxr predict --cam DIR` writes: one PNG per image, named after its file,
drawn at the input's own width and height."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.images import DICOM_SUFFIXES


def source_aspect(item) -> float:
    """Width over height of an input as its owner sees it, read cheaply (a file's header, a DICOM's
    rows and columns, an array's shape); 1.0 where it cannot be told."""
    try:
        if isinstance(item, Image.Image):
            w, h = item.size
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            shape = tuple(item.shape)
            channels_first = len(shape) == 3 and shape[0] in (1, 3, 4) and shape[2] not in (1, 3, 4)
            h, w = shape[1:3] if channels_first else shape[:2]
        elif Path(item).suffix.lower() in DICOM_SUFFIXES:
            import pydicom

            header = pydicom.dcmread(item, stop_before_pixels=True)
            h, w = int(header.Rows), int(header.Columns)
        else:
            with Image.open(item) as img:
                w, h = img.size
        return w / h if w > 0 and h > 0 else 1.0
    except Exception:  # the overlay is then drawn square, as the model read it
        return 1.0


def unsquash(image: np.ndarray, cam: np.ndarray, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """A square (S, S) image and its map stretched back to width/height `aspect`, the shorter side
    kept at S (bilinear); as they are when the input was square."""
    s = image.shape[0]
    if abs(aspect - 1) < 0.01:
        return image, cam
    size = (round(s * aspect), s) if aspect > 1 else (s, round(s / aspect))  # PIL: (width, height)
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    cam = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    return image, cam


def overlay_names(paths: list[str]) -> list[str]:
    """`<file name>.cam.png` for each path, numbered when two inputs share a file name."""
    used: dict[str, int] = {}
    names = []
    for p in paths:
        stem = Path(p).name
        used[stem] = used.get(stem, 0) + 1
        names.append(f"{stem}.cam.png" if used[stem] == 1 else f"{stem}.{used[stem]}.cam.png")
    return names


def write_overlays(model, cam_dir: Path, names, files, aspects, batch, maps, probs,
                   target: int | None = None) -> None:
    """An overlay PNG per image, drawn at the input's own width/height (the model read it squashed
    into a square; the map is stretched back with it). `model`: the predict.Model that scored them."""
    from ..reporting.plots import plot_cam_pairs  # matplotlib: only when overlays are asked for

    for name, file, aspect, img, m, p in zip(names, files, aspects, batch, maps, probs):
        img, m = unsquash(img, m, aspect)
        path = cam_dir / file
        label = model.classes[int(model.decide(p[None])[0])]
        shown = p[1] if len(model.classes) == 2 else p.max()
        said = model.classes[1] if len(model.classes) == 2 else label
        plot_cam_pairs(img[None], m[None], [f"{Path(name).name[:40]}\n{label}, P({said.lower()}) = {shown:.3f}"],
                       f"{model.task}: CAM of " + ("the predicted class" if target is None else
                                                  model.classes[target]), path, pairs_per_row=1,
                       inches_per_pair=9.0 if aspect > 1.2 else 7.0)
