"""A checkpoint applied to new images: the Python API (`load_model`), `cxr predict`, and export.

    from cxr import load_model
    model = load_model("runs/study/scratch/best.pt")
    records = model.predict(["a.jpeg", "b.dcm"])     # [{"path", "prob_pneumonia", "label", ...}]
    maps = model.explain(["a.jpeg"])                  # (N, S, S) CAM arrays in [0, 1]

Checkpoints load with `weights_only=True` (a file whose unpickling would run code is refused).
Each input that cannot be read becomes a record with an `error`; the others are still predicted.
"""

from __future__ import annotations

import glob
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from .cam import METHODS
from .card import describe_adaptation
from .checkpoint import load_checkpoint, model_from_checkpoint
from .config import CLASSES
from .errors import CxrError
from .files import atomic_write, write_csv, write_json
from .images import (
    DECODE_ERRORS,
    DICOM_SUFFIXES,
    describe_error,
    load_image,
    resize_square,
    to_gray,
)
from .preprocess import normalize, place

SUPPORTED = (".jpeg", ".jpg", ".png", *DICOM_SUFFIXES)
RECORD_FIELDS = ["path", "prob_pneumonia", "label", "threshold", "error"]


@dataclass(frozen=True)
class Input:
    name: str               # as the user gave it, or the file found under a folder or glob
    path: Path | None       # None when nothing readable was found for `name`
    error: str | None = None


def expand_inputs(items: Iterable[str | Path]) -> list[Input]:
    """Files as given, folders searched recursively for supported files, globs expanded."""
    found: list[Input] = []
    for item in map(str, items):
        path = Path(item)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED
                           and not any(part.startswith(".") for part in f.relative_to(path).parts))
            found += [Input(str(f), f) for f in files] or [Input(item, None, "folder holds no JPEG, PNG or DICOM files")]
        elif path.is_file():
            found.append(Input(item, path))
        elif glob.has_magic(item):
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True)) if Path(m).is_file()]
            found += [Input(str(m), m) for m in matches] or [Input(item, None, "no file matches this pattern")]
        else:
            found.append(Input(item, None, "no such file or folder"))
    seen, unique = set(), []
    for i in found:
        if i.name not in seen:
            seen.add(i.name)
            unique.append(i)
    return unique


def _prepare(item, size: int) -> np.ndarray:
    """(size, size) uint8 from a path, a PIL image or an array (H, W) or (H, W, C)."""
    if isinstance(item, Image.Image):
        return resize_square(to_gray(item), size)
    if isinstance(item, np.ndarray):
        return resize_square(to_gray(Image.fromarray(item)), size)
    path = Path(item)
    if path.suffix.lower() not in SUPPORTED:
        raise ValueError(f"unsupported format '{path.suffix or '(none)'}'; use JPEG, PNG or DICOM (.dcm)")
    return load_image(path, size)


class Model:
    """A trained cxr model with its stored operating point (threshold, temperature)."""

    def __init__(self, checkpoint: dict, device: torch.device | str = "cpu"):
        self.net, self.config = model_from_checkpoint(checkpoint)
        self.device = torch.device(device)
        place(self.net, self.device).eval()
        self.threshold = float(checkpoint.get("threshold", 0.5))
        self.temperature = float(checkpoint.get("temperature", 1.0))
        self.operating_point = checkpoint.get("operating_point")  # None: nothing chosen (e.g. a last.pt)
        self.adaptation = checkpoint.get("adaptation")  # set by `cxr adapt`: what was adapted, on which images
        self.image_size = self.config.image_size
        self.intensity = self.config.intensity
        self.task = self.config.task

    def describe_operating_point(self) -> str:
        """Where the threshold and temperature come from, in one phrase (predict and serve print it)."""
        text = f"threshold {self.threshold:.3f}, temperature {self.temperature:.3f}"
        op = self.operating_point or {}
        if self.adaptation:
            text += "; " + describe_adaptation(self.adaptation)
        elif op:
            text += f" ({op.get('rule', 'stored')}, chosen on {op.get('chosen_on', 'validation')})"
        return text

    def _decode(self, items: list, workers: int = 2) -> list[np.ndarray | str]:
        def one(item):
            try:
                return _prepare(item, self.image_size)
            except DECODE_ERRORS as e:
                return describe_error(e)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(one, items))

    def _prob(self, logits: torch.Tensor) -> torch.Tensor:
        # float64, as evaluation computes it, so an image at the threshold gets the same label both ways
        return torch.softmax(logits.double() / self.temperature, 1)[:, 1]

    def _label(self, logits: torch.Tensor) -> torch.Tensor:
        return (self._prob(logits) >= self.threshold).long()

    @torch.no_grad()
    def _forward(self, batch: np.ndarray) -> torch.Tensor:
        return self.net(normalize(torch.from_numpy(batch)[:, None], self.device, self.intensity)).cpu()

    def predict(self, inputs, batch_size: int = 32, cam_dir: Path | str | None = None,
                cam_method: str = "cam", workers: int = 2) -> list[dict]:
        """One record per image: path, prob_pneumonia, label at the stored threshold, threshold,
        error (None when it worked). `inputs`: a path, folder (searched recursively), glob, PIL
        image or array, or a list of them, as `cxr predict` takes. With `cam_dir`, also writes
        an overlay PNG per image there."""
        items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        names, sources, errors = [], [], []
        for k, item in enumerate(items):
            if isinstance(item, (str, Path)):
                for found in expand_inputs([item]):
                    names.append(found.name)
                    sources.append(found.path)
                    errors.append(found.error)
            else:
                names.append(f"<image {k}>")
                sources.append(item)
                errors.append(None)
        decoded = self._decode([s for s, e in zip(sources, errors) if e is None], workers)
        decoded_iter = iter(decoded)
        decoded = [next(decoded_iter) if e is None else e for e in errors]
        records = [{"path": n, "prob_pneumonia": None, "label": None, "threshold": self.threshold,
                    "error": d if isinstance(d, str) else None} for n, d in zip(names, decoded)]
        ok = [k for k, d in enumerate(decoded) if not isinstance(d, str)]
        overlays = dict(zip(ok, overlay_names([names[k] for k in ok])))
        for idx, batch, maps, probs in self._batches(decoded, ok, batch_size, cam_method if cam_dir else None):
            if cam_dir is not None:
                self._write_overlays(Path(cam_dir), [names[k] for k in idx], [overlays[k] for k in idx],
                                     batch, maps, probs)
            for k, p in zip(idx, probs):
                records[k].update(prob_pneumonia=float(p), label=CLASSES[int(p >= self.threshold)])
        return records

    def predict_arrays(self, images: list[np.ndarray], cam_method: str | None = None,
                       batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """P(PNEUMONIA) of decoded (S, S) uint8 images (`decode`), and with `cam_method` their maps
        of the predicted class ((N, S, S) in [0, 1]) from the same forward pass."""
        probs, maps = [], []
        for _, _, m, p in self._batches(images, list(range(len(images))), batch_size, cam_method):
            probs.append(p)
            maps.append(m)
        probs = np.concatenate(probs) if probs else np.empty(0)
        return probs, (np.concatenate(maps) if cam_method and maps else None)

    def decode(self, item) -> np.ndarray | str:
        """(S, S) uint8 of a path, PIL image or array, as `predict` decodes it, or the reason it
        cannot be read."""
        return self._decode([item], workers=1)[0]

    def _batches(self, decoded: list, idx: list[int], batch_size: int, cam_method: str | None):
        for start in range(0, len(idx), batch_size):
            part = idx[start:start + batch_size]
            batch = np.stack([decoded[k] for k in part])
            if cam_method is None:
                yield part, batch, None, self._prob(self._forward(batch)).numpy()
            else:
                maps, probs = self._cam(batch, cam_method)
                yield part, batch, maps, probs

    def _cam(self, batch: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
        """Maps of the predicted class (at the stored threshold) and P(PNEUMONIA), one forward pass."""
        x = normalize(torch.from_numpy(batch)[:, None], self.device, self.intensity)
        with METHODS[method](self.net) as cam:
            maps, _ = cam(x, target=self._label)
            with torch.no_grad():
                logits = cam.last_logits
        return maps, self._prob(logits.cpu()).numpy()

    def explain(self, inputs, method: str = "cam", target: int | None = None) -> np.ndarray:
        """(N, S, S) class activation maps in [0, 1] for the predicted class (or `target`)."""
        items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        decoded = self._decode(items)
        bad = [(i, d) for i, d in zip(items, decoded) if isinstance(d, str)]
        if bad:
            raise CxrError(f"{bad[0][0]}: {bad[0][1]}")
        x = normalize(torch.from_numpy(np.stack(decoded))[:, None], self.device, self.intensity)
        with METHODS[method](self.net) as cam:
            maps, _ = cam(x, target=self._label if target is None else target)
        return maps

    def _write_overlays(self, cam_dir: Path, names, files, batch, maps, probs) -> None:
        from .plots import plot_cam_pairs

        for name, file, img, m, p in zip(names, files, batch, maps, probs):
            target = cam_dir / file
            label = CLASSES[int(p >= self.threshold)]
            plot_cam_pairs(img[None], m[None], [f"{Path(name).name[:40]}\n{label}, P(pneumonia) = {p:.3f}"],
                           f"{self.task}: CAM of the predicted class", target, pairs_per_row=1)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> Model:
    """A cxr checkpoint (best.pt or last.pt) ready to predict, or CheckpointError."""
    return Model(load_checkpoint(path), device)


def write_records(path: Path, records: list[dict], model: Model) -> None:
    path = Path(path)
    if path.suffix.lower() == ".json":
        write_json(path, {"checkpoint_task": model.task, "threshold": model.threshold,
                          "temperature": model.temperature, "operating_point": model.describe_operating_point(),
                          "adaptation": model.adaptation, "predictions": records})
    else:
        write_csv(path, RECORD_FIELDS, ([("" if r[f] is None else r[f]) for f in RECORD_FIELDS] for r in records))


def format_table(records: list[dict]) -> str:
    width = min(70, max([len(r["path"]) for r in records] + [4]))
    lines = [f"{'file':<{width}}  {'P(pneumonia)':>12}  label"]
    for r in records:
        name = r["path"] if len(r["path"]) <= width else "..." + r["path"][-(width - 3):]
        if r["error"]:
            lines.append(f"{name:<{width}}  {'-':>12}  ERROR: {r['error']}")
        else:
            lines.append(f"{name:<{width}}  {r['prob_pneumonia']:>12.4f}  {r['label']}")
    return "\n".join(lines)


class Deployable(torch.nn.Module):
    """The whole path from a decoded image to P(PNEUMONIA), as one graph to export: uint8
    grayscale (N, 1, S, S) in; the task's intensity normalisation (histogram equalisation, or
    per-image standardisation), the ImageNet scaling, the network and softmax(logits / T) inside;
    (N,) P(PNEUMONIA) out. What cxr predict computes, so an exported model cannot be fed wrongly."""

    def __init__(self, net: torch.nn.Module, intensity: str, temperature: float):
        super().__init__()
        self.net, self.intensity, self.temperature = net, intensity, float(temperature)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.net(normalize(image, image.device, self.intensity))
        return torch.softmax(logits.float() / self.temperature, 1)[:, 1]


def export_model(checkpoint_path: Path, fmt: str, out: Path) -> tuple[Path, Path]:
    """Write the model as ONNX or TorchScript (input: (N, 1, S, S) uint8 grayscale, decoded and
    resized as cxr does; output: (N,) P(PNEUMONIA), temperature applied) and OUT.json beside it
    with the input contract and the operating point."""
    model = load_model(checkpoint_path)
    net = model.net.to(memory_format=torch.contiguous_format).eval()
    graph = Deployable(net, model.intensity, model.temperature).eval()
    example = torch.zeros(2, 1, model.image_size, model.image_size, dtype=torch.uint8)  # batch 2: dynamic
    out = Path(out)
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(graph, example)
        atomic_write(out, lambda p: torch.jit.save(traced, str(p)))
    elif fmt == "onnx":
        def write(p: Path) -> None:
            torch.onnx.export(graph, (example,), str(p), dynamo=True, verbose=False, input_names=["image"],
                              output_names=["prob_pneumonia"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                              external_data=False)

        atomic_write(out, write)
    else:
        raise CxrError(f"--format {fmt}: choose onnx or torchscript")
    sidecar = out.with_name(out.name + ".json")
    write_json(sidecar, {
        "format": fmt, "input": "uint8 (N, 1, S, S) grayscale", "input_size": model.image_size,
        "preprocessing": "outside the model: decode to 8-bit grayscale (16-bit / 257; colour via ITU-R 601 luma; "
                         "DICOM: modality LUT, VOI LUT or window, MONOCHROME1 inverted), resize to (S, S) bilinear "
                         "(cxr.images.load_image). Inside the model: the intensity normalisation, scaling and "
                         "the temperature",
        "intensity": model.intensity, "class_names": list(CLASSES),
        "output": "prob_pneumonia (N,): P(PNEUMONIA), temperature already applied",
        "temperature": model.temperature, "threshold": model.threshold,
        "label": "PNEUMONIA when prob_pneumonia >= threshold", "task": model.task,
    })
    return out, sidecar


def summary_line(records: list[dict]) -> str:
    failed = sum(1 for r in records if r["error"])
    called = sum(1 for r in records if r["label"] == "PNEUMONIA")
    return f"{len(records) - failed} predicted ({called} PNEUMONIA), {failed} failed"


def overlay_names(paths: list[str]) -> list[str]:
    """`<file name>.cam.png` for each path, numbered when two inputs share a file name."""
    used: dict[str, int] = {}
    names = []
    for p in paths:
        stem = Path(p).name
        used[stem] = used.get(stem, 0) + 1
        names.append(f"{stem}.cam.png" if used[stem] == 1 else f"{stem}.{used[stem]}.cam.png")
    return names
