"""`cxr check`: is a folder of images like the ones a model was validated on, and how well would
the model do there? Reads the images (labelled or not), never chooses anything, and answers with
the shift tests (trust/shift.py), the share of images the out-of-distribution flag refuses, and
the label-free accuracy estimate (trust/estimate.py); with labels, the true accuracy beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import config_from_dict
from ..data.cache import cached_decode
from ..data.dataset import EXTENSIONS, labels_of
from ..data.folders import get_external_samples
from ..errors import CxrError, DataError
from ..training.checkpoint import for_site, load_checkpoint, model_from_checkpoint
from ..trust.estimate import estimate_accuracy
from ..trust.features import LAYERS, forward_with_features
from ..trust.fit import Trust
from ..trust.shift import FEW_IMAGES, MIN_IMAGES, compare


def folder_images(folder: Path, labels: str | None = None, log=print) -> tuple[list[Path], np.ndarray | None]:
    """The images of `folder` and their labels under the model's label set (`labels`) when it
    holds NORMAL/ and PNEUMONIA/ (or test/ with them); otherwise every JPEG, PNG or DICOM file
    below it, unlabelled (None)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CxrError(f"{folder}: folder not found; pass a folder of images (JPEG, PNG or DICOM)")
    if any((folder / c).is_dir() for c in ("NORMAL", "PNEUMONIA", "test")):
        try:
            samples = get_external_samples(folder, labels)
            return [s.path for s in samples], labels_of(samples).numpy()
        except DataError as e:
            log(f"note: {folder}'s class folders cannot be read as labels ({e}); checking its images unlabelled")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return files, None


def check_folder(checkpoint_path: Path, folder: Path, device: torch.device | str = "cpu", workers: int = 2,
                 cache_dir: Path | None = None, site: str | None = None, seed: int = 0,
                 log=print) -> dict:
    """The shift check of `folder` against the checkpoint's validation images, as a dict (the
    JSON `cxr check --output` writes); CxrError for a checkpoint without statistics or a folder
    with fewer than MIN_IMAGES readable images."""
    stored = load_checkpoint(checkpoint_path)
    checkpoint = for_site(stored, site)
    trust = Trust.from_checkpoint(checkpoint)
    if trust is None:
        raise CxrError(f"{checkpoint_path}: holds no out-of-distribution statistics (written before cxr stored "
                       "them); retrain the model to check folders against it")
    config = config_from_dict(checkpoint["config"])
    paths, labels = folder_images(folder, config.labels, log)
    if len(paths) < MIN_IMAGES:
        raise CxrError(f"{folder}: {len(paths)} image(s); the shift check needs at least {MIN_IMAGES} "
                       f"(and {FEW_IMAGES} or more to see a shift reliably)")
    images, bad = cached_decode(paths, config.image_size, workers, cache_dir, desc="decode")
    if bad:
        keep = sorted(set(range(len(paths))) - {i for i, _, _ in bad})
        log(f"note: {len(bad)} unreadable file(s) left out (e.g. {bad[0][1]})")
        images, paths = images[keep], [paths[i] for i in keep]
        labels = None if labels is None else labels[keep]
        if len(paths) < MIN_IMAGES:
            raise CxrError(f"{folder}: {len(paths)} readable image(s); the shift check needs at least {MIN_IMAGES}")
    result = check_images(checkpoint, images, labels, device, seed)
    own = [name for name, p in (stored.get("operating_points") or {}).items() if p.get("reference_rows")]
    note = {"note": f"this model keeps each site's own flag threshold and validation images ({', '.join(own)}): "
                    "pass --site NAME to check these images against one site's; this check used them pooled"} \
        if own and site is None else {}
    return {"checkpoint": str(checkpoint_path), "folder": str(Path(folder).resolve()), **result, **note}


def check_images(checkpoint: dict, images: torch.Tensor, labels: np.ndarray | None = None,
                 device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """The shift check of decoded (N, 1, S, S) uint8 images against a checkpoint (with statistics)."""
    trust = Trust.from_checkpoint(checkpoint)
    net, config = model_from_checkpoint(checkpoint)
    logits, features = forward_with_features(net, images, device, config.intensity, 64, trust.detector.layers)
    threshold, temperature = float(checkpoint.get("threshold", 0.5)), float(checkpoint.get("temperature", 1.0))
    probs = torch.softmax(logits.double() / temperature, 1).numpy()
    scores = trust.detector.score(features)
    accepted = trust.detector.in_distribution(scores)
    ref = trust.reference
    shift = compare(probs, ref.probabilities(temperature), scores, ref.scores.numpy(),
                    features[LAYERS[-1]].numpy(), ref.features.numpy(), float((~accepted).mean()), seed=seed)
    estimate = estimate_accuracy(probs, threshold, ref.calibration(threshold, temperature, trust.detector.threshold), accepted, seed=seed)
    result = {"n": len(images), "labelled": labels is not None, "shift": shift.to_dict(),
              "estimate": estimate.to_dict()}
    if labels is not None:
        decided = (probs[:, 1] >= threshold).astype(int) if probs.shape[1] == 2 else probs.argmax(1)
        correct = decided == labels
        result["truth"] = {"accuracy": float(correct.mean()),
                           "accuracy_accepted": float(correct[accepted].mean()) if accepted.any() else None}
    result["verdict"] = verdict(shift.shifted, estimate, result.get("truth"), len(images))
    return result


def verdict(shifted: bool, estimate, truth: dict | None, n: int | None = None) -> str:
    """What the user should take from the check, in words."""
    if not estimate.trusted:
        said = "Do not use this model on these images without measuring it: " + estimate.verdict
    elif shifted:
        said = ("These images differ from the validation images, but the model accepts most of them and its "
                f"confidence suggests accuracy near {estimate.atc:.0%} [{estimate.atc_ci[0]:.0%}, "
                f"{estimate.atc_ci[1]:.0%}]: check a labelled sample before relying on it")
    else:
        said = (f"No shift detected against the validation images; estimated accuracy {estimate.atc:.0%} "
                f"[{estimate.atc_ci[0]:.0%}, {estimate.atc_ci[1]:.0%}]")
        if n is not None and n < FEW_IMAGES:
            said += f" (only {n} images: a real shift can go unseen; check {FEW_IMAGES} or more)"
    if truth is not None:
        said += f" (labels present: true accuracy {truth['accuracy']:.1%})"
    return said


def format_check(result: dict) -> str:
    """The check as the terminal shows it."""
    s, e = result["shift"], result["estimate"]
    lines = [f"{result['n']} images" + (f" in {result['folder']}" if "folder" in result else "")
             + f" against the model's {s['n_reference']} validation images",
             f"flagged as unlike the training images: {s['flagged_share']:.0%} (validation: 5% by the threshold's choice)"]
    for t in s["tests"]:
        lines.append(f"  {t['name']:<10} p = {t['p_value']:<8.3g} {t['what']} (statistic {t['statistic']:.3g})")
    lines.append(f"shift: {s['verdict']}")
    if e["trusted"]:
        lines.append(f"estimated accuracy: ATC {e['atc']:.1%} [{e['atc_ci'][0]:.1%}, {e['atc_ci'][1]:.1%}], "
                     f"DoC {e['doc']:.1%} [{e['doc_ci'][0]:.1%}, {e['doc_ci'][1]:.1%}] on {e['n_accepted']} "
                     f"accepted images")
    else:
        lines.append(f"estimated accuracy: none ({e['verdict']})")
    if result.get("truth"):
        t = result["truth"]
        lines.append(f"true accuracy (labels present): {t['accuracy']:.1%}"
                     + (f", {t['accuracy_accepted']:.1%} on the accepted images" if t["accuracy_accepted"] is not None
                        else ""))
    lines.append(result["verdict"])
    if result.get("note"):
        lines.append(f"note: {result['note']}")
    return "\n".join(lines)
