"""A checkpoint applied to new images: the Python API (`load_model`), `cxr predict`, and export.

    from cxr import load_model
    model = load_model("runs/study/scratch/best.pt")
    records = model.predict(["a.jpeg", "b.dcm"])     # [{"path", "prob_pneumonia", "label", "probabilities", ...}]
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

from ..data.images import (
    DECODE_ERRORS,
    DICOM_SUFFIXES,
    describe_error,
    load_image,
    resize_square,
    to_gray,
)
from ..data.labels import probability_key
from ..errors import CxrError
from ..reporting.cam import METHODS
from ..reporting.card import describe_adaptation, describe_backbone, few_validation_warning
from ..training.checkpoint import for_site, load_checkpoint, model_from_checkpoint
from ..training.operating_point import OperatingPoint
from ..training.preprocess import normalize, place
from ..trust.features import pooled_features
from ..trust.fit import Trust
from ..trust.ood import FLAG_WARNING
from .overlays import overlay_names, source_aspect, write_overlays

SUPPORTED = (".jpeg", ".jpg", ".png", *DICOM_SUFFIXES)
# the study's; Model.fields in general
RECORD_FIELDS = ["path", "prob_pneumonia", "label", "threshold", "ood_score", "in_distribution", "warning", "error"]
SAMPLE_WARNING = ("this model was trained on cxr's bundled sample (a few hundred images) to show the tool working; "
                  "its probabilities mean little")
NO_SCORE = ("this checkpoint holds no out-of-distribution statistics (written before cxr stored them): nothing "
            "says whether an image is like its training images; retrain to get them")


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


def _as_uint8(array: np.ndarray) -> np.ndarray:
    """An image array as 8-bit: uint8 as it is; floats in [0, 1] scaled by 255 (floats beyond
    that range are refused: say which scale they use by converting to uint8 first); (1, H, W)
    or (C, H, W) channel-first arrays moved to channel-last."""
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if np.nanmin(array) < 0 or np.nanmax(array) > 1:
            raise ValueError(f"a float array with values in [{np.nanmin(array):g}, {np.nanmax(array):g}]: pass "
                             "floats in [0, 1] or a uint8 array in [0, 255]")
        return np.round(np.nan_to_num(array) * 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)
    raise ValueError(f"an array of {array.dtype} in [{array.min()}, {array.max()}]: pass uint8 in [0, 255] or "
                     "floats in [0, 1]")


def _prepare(item, size: int) -> np.ndarray:
    """(size, size) uint8 from a path, a PIL image, or an array or tensor (H, W), (H, W, C) or
    (C, H, W): uint8 in [0, 255] or floats in [0, 1]."""
    if isinstance(item, Image.Image):
        return resize_square(to_gray(item), size)
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        return resize_square(to_gray(Image.fromarray(_as_uint8(item))), size)
    path = Path(item)
    if path.suffix.lower() not in SUPPORTED:
        raise ValueError(f"unsupported format '{path.suffix or '(none)'}'; use JPEG, PNG or DICOM (.dcm)")
    return load_image(path, size)


def no_score_reason(checkpoint: dict) -> str:
    """Why a checkpoint has no out-of-distribution statistics, and what to do, in one sentence."""
    adapted = (checkpoint.get("adaptation") or {}).get("trust")
    if adapted:
        return f"this adapted model has no out-of-distribution statistics ({adapted})"
    if checkpoint.get("optimizer") is not None:
        return "a last.pt holds no out-of-distribution statistics: predict with the run's best.pt to get the score"
    return NO_SCORE


class Model:
    """A trained cxr model with its stored operating point (threshold, temperature)."""

    def __init__(self, checkpoint: dict, device: torch.device | str = "cpu"):
        self.net, self.config = model_from_checkpoint(checkpoint)
        self.device = torch.device(device)
        place(self.net, self.device).eval()
        self.threshold = float(checkpoint.get("threshold", 0.5))
        self.temperature = float(checkpoint.get("temperature", 1.0))
        stored = checkpoint.get("operating_point")  # None: nothing chosen (e.g. a last.pt)
        self.operating_point = None if stored is None else OperatingPoint.from_dict(stored)
        self.adaptation = checkpoint.get("adaptation")  # set by `cxr adapt`: what was adapted, on which images
        self.sites = checkpoint.get("sites")  # trained on several sites: {site: training images}
        self.backbone = checkpoint.get("backbone")  # started from a cxr pretrain backbone: its provenance
        self.image_size = self.config.image_size
        self.intensity = self.config.intensity
        self.task = self.config.task
        self.classes = tuple(checkpoint["classes"])
        # the probabilities a record names: the positive class's (two classes, as the study's
        # prob_pneumonia), or every class's and the pneumonia reading 1 - P(NORMAL) (more)
        many = len(self.classes) > 2
        self.keys = [probability_key(c) for c in self.classes] if many else [probability_key(self.classes[1])]
        if many and "NORMAL" in self.classes:
            self.keys.append("prob_pneumonia")
        self.fields = ["path", *self.keys, "label", "threshold", "ood_score", "in_distribution", "warning", "error"]
        # whether an image is like the training images: None for a checkpoint written before cxr stored it
        self.trust = Trust.from_checkpoint(checkpoint)
        self.bundled_sample = bool(checkpoint.get("bundled_sample"))
        self.no_score = None if self.trust else no_score_reason(checkpoint)

    def describe_operating_point(self) -> str:
        """Where the threshold and temperature come from, in one phrase (predict and serve print it)."""
        text = (f"threshold {self.threshold:.3f}" if len(self.classes) == 2 else
                "the class of highest probability") + f", temperature {self.temperature:.3f}"
        op = self.operating_point
        if self.sites:
            text += "; trained on: " + ", ".join(f"{s} {n:,} images" for s, n in self.sites.items())
        if self.adaptation:
            text += "; " + describe_adaptation(self.adaptation)
        elif op is not None and op != OperatingPoint():
            text += f" ({op.rule or 'stored'}, chosen on {op.chosen_on or 'validation'})"
        if self.backbone:
            text += "; " + describe_backbone(self.backbone)
        return text

    def describe_trust(self) -> dict:
        """The out-of-distribution score as outputs describe it (JSON, the page, the model card)."""
        if self.trust is None:
            return {"available": False, "note": self.no_score}
        d, op = self.trust.detector, self.operating_point
        chosen_on = f"validation: {d.accept:.0%} of its {len(self.trust.reference.labels)} images accepted"
        if op is not None and op.ood_threshold is not None:  # --site: the site's own validation images
            chosen_on = f"{op.site}'s validation: {d.accept:.0%} of its {len(self.trust.reference.labels)} images accepted"
        return {"available": True, "method": "multi-layer Mahalanobis distance to the training images' features "
                "(higher: less like them)", "threshold": d.threshold, "threshold_chosen_on": chosen_on,
                "fitted_on_training_images": self.trust.n_fit}

    def warnings(self) -> list[str]:
        """What every output of this model says, whatever the image."""
        few = few_validation_warning(self.operating_point or OperatingPoint())
        return ([SAMPLE_WARNING] if self.bundled_sample else []) + ([] if self.trust else [self.no_score]) + \
            ([f"this model's {few}"] if few else [])

    def _decode(self, items: list, workers: int = 2) -> list[np.ndarray | str]:
        def one(item):
            try:
                return _prepare(item, self.image_size)
            except DECODE_ERRORS as e:
                return describe_error(e)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(one, items))

    def _prob(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, K) class probabilities: float64, as evaluation computes them, so an image at the
        threshold gets the same label both ways."""
        return torch.softmax(logits.double() / self.temperature, 1)

    def _label(self, logits: torch.Tensor) -> torch.Tensor:
        return self.decide(self._prob(logits))

    def decide(self, probs) -> torch.Tensor | np.ndarray:
        """Class indices of (N, K) probabilities: P(class 1) >= threshold for two classes, the
        highest probability for more."""
        if len(self.classes) == 2:
            return (probs[:, 1] >= self.threshold).long() if isinstance(probs, torch.Tensor) else \
                (probs[:, 1] >= self.threshold).astype(int)
        return probs.argmax(1)

    def fill(self, record: dict, probs: np.ndarray, score: float | None = None) -> dict:
        """A record's probabilities (named), label, out-of-distribution score and flag, and any
        warning, from one image's (K,) probabilities and score (None: no statistics stored)."""
        named = {c: float(q) for c, q in zip(self.classes, probs)}
        label = self.classes[int(self.decide(np.asarray(probs)[None])[0])]
        values = [named[c] for c in self.classes] if len(self.classes) > 2 else [named[self.classes[1]]]
        if len(self.keys) > len(values):
            values.append(1.0 - named["NORMAL"])
        record.update(dict(zip(self.keys, values)), label=label, probabilities=named)
        record.update(self.judge(score))
        return record

    def judge(self, score: float | None) -> dict:
        """ood_score, in_distribution and warning of one image's score."""
        inside = None if score is None else bool(self.trust.detector.in_distribution(score))
        said = ([FLAG_WARNING] if inside is False else []) + ([SAMPLE_WARNING] if self.bundled_sample else [])
        return {"ood_score": None if score is None else round(float(score), 4), "in_distribution": inside,
                "warning": "; ".join(said) or None}

    @torch.no_grad()
    def _forward(self, batch: np.ndarray) -> tuple[torch.Tensor, np.ndarray | None]:
        """Logits and out-of-distribution scores (None without statistics), one forward pass."""
        x = normalize(torch.from_numpy(batch)[:, None], self.device, self.intensity)
        if self.trust is None:
            return self.net(x).cpu(), None
        with pooled_features(self.net, self.trust.detector.layers) as features:
            logits = self.net(x).cpu()
        return logits, self.trust.detector.score(features)

    def class_index(self, name: str) -> int:
        """The index of class `name` (any case), or CxrError naming this model's classes."""
        if str(name).upper() not in self.classes:
            raise CxrError(f"class {name!r}: this model's classes are {', '.join(self.classes)}")
        return self.classes.index(str(name).upper())

    def predict(self, inputs, batch_size: int = 32, cam_dir: Path | str | None = None,
                cam_method: str = "cam", workers: int = 2, cam_class: str | None = None) -> list[dict]:
        """One record per image: path, prob_pneumonia (P of the positive class: prob_bacterial for
        subtype; every class's and the pneumonia reading for three-way), label (at the stored
        threshold, or the class of highest probability), threshold, probabilities ({class: P}),
        error (None when it worked). `inputs`: a path, folder (searched recursively), glob, PIL
        image or array, or a list of them, as `cxr predict` takes. With `cam_dir`, also writes
        an overlay PNG per image there: the map of the predicted class, or of `cam_class`."""
        target = None if cam_class is None else self.class_index(cam_class)
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
        records = [{"path": n, **{k: None for k in self.keys}, "label": None,
                    "threshold": self.threshold if len(self.classes) == 2 else None, "probabilities": None,
                    "ood_score": None, "in_distribution": None, "warning": None,
                    "error": d if isinstance(d, str) else None} for n, d in zip(names, decoded)]
        ok = [k for k, d in enumerate(decoded) if not isinstance(d, str)]
        overlays = dict(zip(ok, overlay_names([names[k] for k in ok])))
        for idx, batch, maps, probs, scores in self._batches(decoded, ok, batch_size,
                                                             cam_method if cam_dir else None, target):
            if cam_dir is not None:
                write_overlays(self, Path(cam_dir), [names[k] for k in idx], [overlays[k] for k in idx],
                               [source_aspect(sources[k]) for k in idx], batch, maps, probs, target)
            for j, (k, p) in enumerate(zip(idx, probs)):
                self.fill(records[k], p, None if scores is None else scores[j])
                if cam_dir is not None:
                    records[k]["cam_file"] = str(Path(cam_dir) / overlays[k])  # the CSV names each overlay
        return records

    def predict_arrays(self, images: list[np.ndarray], cam_method: str | None = None,
                       batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(N, K) class probabilities of decoded (S, S) uint8 images (`decode`), with `cam_method`
        their maps of the predicted class ((N, S, S) in [0, 1]), and their out-of-distribution
        scores (None without statistics), all from the same forward pass."""
        probs, maps, scores = [], [], []
        for _, _, m, p, s in self._batches(images, list(range(len(images))), batch_size, cam_method):
            probs.append(p)
            maps.append(m)
            scores.append(s)
        probs = np.concatenate(probs) if probs else np.empty((0, len(self.classes)))
        scored = None if self.trust is None else (np.concatenate(scores) if scores else np.empty(0))
        return probs, (np.concatenate(maps) if cam_method and maps else None), scored

    def decode(self, item) -> np.ndarray | str:
        """(S, S) uint8 of a path, PIL image or array, as `predict` decodes it, or the reason it
        cannot be read."""
        return self._decode([item], workers=1)[0]

    def _batches(self, decoded: list, idx: list[int], batch_size: int, cam_method: str | None,
                 target: int | None = None):
        for start in range(0, len(idx), batch_size):
            part = idx[start:start + batch_size]
            batch = np.stack([decoded[k] for k in part])
            if cam_method is None:
                logits, scores = self._forward(batch)
                yield part, batch, None, self._prob(logits).numpy(), scores
            else:
                maps, probs, scores = self._cam(batch, cam_method, target)
                yield part, batch, maps, probs, scores

    def _cam(self, batch: np.ndarray, method: str, target: int | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Maps of the predicted class (at the stored threshold, or the argmax), the (N, K)
        probabilities and the out-of-distribution scores, one forward pass."""
        x = normalize(torch.from_numpy(batch)[:, None], self.device, self.intensity)
        layers = self.trust.detector.layers if self.trust else ()
        with pooled_features(self.net, layers) as features, METHODS[method](self.net) as cam:
            maps, _ = cam(x, target=self._label if target is None else target)
            with torch.no_grad():
                logits = cam.last_logits
        scores = self.trust.detector.score(features) if self.trust else None
        return maps, self._prob(logits.cpu()).numpy(), scores

    def explain(self, inputs, method: str = "cam", target: int | str | None = None) -> np.ndarray:
        """(N, S, S) class activation maps in [0, 1] for the predicted class (or `target`: a class
        index or name, e.g. "VIRAL")."""
        if isinstance(target, str):
            target = self.class_index(target)
        items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        decoded = self._decode(items)
        bad = [(i, d) for i, d in zip(items, decoded) if isinstance(d, str)]
        if bad:
            raise CxrError(f"{bad[0][0]}: {bad[0][1]}")
        x = normalize(torch.from_numpy(np.stack(decoded))[:, None], self.device, self.intensity)
        with METHODS[method](self.net) as cam:
            maps, _ = cam(x, target=self._label if target is None else target)
        return maps


def load_model(path: str | Path, device: torch.device | str = "cpu", site: str | None = None) -> Model:
    """A cxr checkpoint (best.pt or last.pt) ready to predict, or CheckpointError. `site`: decide
    with the operating point stored for that site (`cxr adapt --finetune`, or training on several
    sites, stores one per site)."""
    return Model(for_site(load_checkpoint(path), site), device)
