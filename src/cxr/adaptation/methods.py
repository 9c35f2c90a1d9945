"""The ways `cxr adapt` fits a trained model to a new site's images, in one `METHODS` table.

A model meets other machines, exposure habits and patients at another hospital. Two ways to fit
it there, both without training the network on labels:

- a **labelled site sample** (NORMAL/ and PNEUMONIA/): the decision threshold (Youden's J, or the
  highest threshold reaching a target sensitivity) and the softmax temperature are chosen on the
  site's images instead of the training split's validation;
- **site images without labels**: the batch-norm running statistics are re-estimated on them
  (AdaBN, Li et al. 2016); with `tent`, the batch-norm affine parameters are first tuned for a few
  steps to minimise the prediction entropy on them (TENT, Wang et al. 2021), then the statistics
  re-estimated, so the deployed model runs in eval mode like any other. A labelled sample can
  take either as well (`adabn=True`, the labels unused for it).

The run folder an adaptation writes is `adapt.py`'s; how well each method does at a site is
measured apart from the methods, in `kfold.py` (`cxr adapt --evaluate K`). A new method that
changes the model is one function of the table's shape (below) plus one line in `METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..config import CLASSES, FinetuneSpec, config_from_dict
from ..data.dataset import (
    EXTENSIONS,
    Sample,
    patient_id,
    split_by_patient,
)
from ..data.folders import get_external_samples
from ..data.manifest import with_patients
from ..errors import CxrError, DataError
from ..evaluation.evaluate import (
    pneumonia_probability,
    predict_logits,
    threshold_by_rule,
)
from ..evaluation.metrics import (
    fit_temperature,
    sensitivity_threshold,
    youden_threshold,
)
from ..training.checkpoint import model_from_checkpoint
from ..training.operating_point import OperatingPoint
from ..training.preprocess import normalize, place
from .finetune import finetune
from .weights import adabn, batch_norms

MIN_PER_CLASS = 10   # fewest site images of each class to choose a threshold on
MIN_UNLABELED = 16   # fewest site images to re-estimate batch-norm statistics on


# --- the site's images -------------------------------------------------------------------------

def site_samples(folder: Path, unlabeled: bool, patients: Path | None = None) -> list[Sample]:
    """A labelled site sample (NORMAL/ and PNEUMONIA/, or test/ with them) or, `unlabeled`, every
    JPEG/PNG under `folder` (label -1), with patient ids from the table `patients` when given
    (manifest.with_patients). One-line DataError naming the folder and the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: site folder not found; pass --data DIR with the new site's images")
    has_classes = any((folder / c).is_dir() for c in CLASSES) or any((folder / "test" / c).is_dir() for c in CLASSES)
    if unlabeled:
        if has_classes:
            raise DataError(f"{folder}: holds class folders ({'/'.join(CLASSES)}); drop --unlabeled to use the "
                            "labels, or point --data at a folder of images without class folders")
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if len(paths) < MIN_UNLABELED:
            raise DataError(f"{folder}: {len(paths)} .jpeg/.jpg/.png images; batch-norm statistics need at least "
                            f"{MIN_UNLABELED}: add images of the site")
        found = [Sample(p, -1, patient_id(p.name)) for p in paths]
        return with_patients(found, patients, folder) if patients is not None else found
    if not has_classes:
        raise DataError(f"{folder}: no NORMAL/ and PNEUMONIA/ folders; sort the site's images into them to choose "
                        "a threshold, or pass --unlabeled to adapt the batch-norm statistics only")
    samples = get_external_samples(folder)
    if patients is not None:
        samples = with_patients(samples, patients, folder)
    counts = {c: sum(s.label == i for s in samples) for i, c in enumerate(CLASSES)}
    short = [f"{n} {c}" for c, n in counts.items() if n < MIN_PER_CLASS]
    if short:
        raise DataError(f"{folder}: {' and '.join(short)} images; choosing a threshold needs at least "
                        f"{MIN_PER_CLASS} of each class: add labelled images, or pass --unlabeled")
    return samples


# --- what adapts ---------------------------------------------------------------------------------

def tent(model: nn.Module, images: torch.Tensor, intensity: str, device: torch.device | str, steps: int = 10,
         lr: float = 1e-3, batch_size: int = 32, seed: int = 0) -> nn.Module:
    """TENT: `steps` Adam steps on the batch-norm weights and biases alone, minimising the mean
    entropy of the predictions on random batches of `images` (batch statistics, as TENT does);
    then AdaBN on all of `images`, so the model deploys in eval mode. Returns it in eval mode."""
    place(model, device)
    layers = batch_norms(model)
    affine = [p for m in layers for p in (m.weight, m.bias) if p is not None]
    was = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in affine:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(affine, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    for m in layers:
        m.train()
    try:
        for _ in range(steps):
            idx = torch.randperm(len(images), generator=generator)[:batch_size]
            logits = model(normalize(images[idx], device, intensity)).float()
            entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            entropy.backward()
            optimizer.step()
    finally:
        for p, flag in was.items():
            p.requires_grad_(flag)
    return adabn(model, images, intensity, device)


def site_operating_point(logits: np.ndarray, y: np.ndarray,
                         target_sensitivity: float | None) -> OperatingPoint:
    """Temperature (NLL) and threshold (Youden's J, or the highest reaching the target
    sensitivity) chosen on the site's labelled predictions."""
    temperature = fit_temperature(logits, y)
    prob = pneumonia_probability(logits, temperature)
    if target_sensitivity is None:
        rule, threshold = "youden", youden_threshold(y, prob)
    else:
        rule, threshold = f"sensitivity>={target_sensitivity}", sensitivity_threshold(y, prob, target_sensitivity)
    return OperatingPoint(rule=rule, threshold=float(threshold), temperature=float(temperature))


# --- the table of methods that change the model -------------------------------------------------
# Each: (model, config, images, labels or None, patients, device, seed, plan, context) -> Fitted.
# A new method is one such function and one line in METHODS.

@dataclass
class Fitted:
    model: nn.Module                  # in eval mode
    holdout: np.ndarray | None = None  # indices of the images the method did not fit on, where an operating
    #                                    point may be chosen (its validation); None: all of them
    history: list[dict] | None = None
    wise: dict | None = None           # WiSE-FT: the mixing coefficient chosen and the grid's scores
    soup: dict | None = None           # a model soup: its members, their seeds and kept epochs, its validation


@dataclass(frozen=True)
class Context:
    """What a method may need beyond the site's images: the source run's training images (uint8
    images, labels: replayed when the spec says so, and half of the batch-norm images after weights are
    mixed), the training arithmetic, a log."""

    replay: tuple[torch.Tensor, torch.Tensor] | None = None
    source_val: tuple[torch.Tensor, torch.Tensor] | None = None  # the source run's validation split: choices
    #                                                               read it beside the site's validation patients
    precision: str = "fp32"
    log: Callable[[str], None] = lambda _: None
    trained: dict | None = None  # fine-tunes already trained on these images (one fold of a k-fold evaluation):
    #                              a WiSE-FT variant mixes one of them instead of training it again (finetune.py)


def _adabn(model, config, images, y, patients, device, seed, plan, context) -> Fitted:
    return Fitted(adabn(model, images, config.intensity, device))


def _tent(model, config, images, y, patients, device, seed, plan, context) -> Fitted:
    return Fitted(tent(model, images, config.intensity, device, steps=plan.tent_steps, seed=seed))


def _finetune(model, config, images, y, patients, device, seed, plan, context) -> Fitted:
    spec = plan.finetune
    fit, val = site_validation_split(y, patients, spec.val_ratio, seed)
    labels = torch.as_tensor(y, dtype=torch.long)
    model, history, chosen = finetune(model, config, spec, images[fit], labels[fit], images[val], labels[val], device,
                                      seed=seed, replay=context.replay, precision=context.precision, log=context.log,
                                      source_val=context.source_val, trained=context.trained)
    return Fitted(model, val, history, (chosen or {}).get("wise"), (chosen or {}).get("soup"))


@dataclass(frozen=True)
class Method:
    fn: Callable | None         # None: the model stays as trained
    labels: bool                # it learns from the labels
    describe: str               # what it did, for adaptation.json and the model card


METHODS: dict[str, Method] = {
    "keep": Method(None, False, "source statistics"),
    "adabn": Method(_adabn, False, "AdaBN: running statistics re-estimated on the site images"),
    "tent": Method(_tent, False, "TENT: {tent_steps} entropy steps on the batch-norm affine parameters, then AdaBN"),
    "finetune": Method(_finetune, True, "fine-tuned on the site's labelled images ({spec}); epoch chosen on the "
                       "worst of the site's validation patients and the source's validation split, where it is here"),
}


def site_validation_split(y: np.ndarray, patients: list[str], ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) indices: about `ratio` of each class's images to validation, whole
    patients at a time (dataset.split_by_patient)."""
    samples = [Sample(Path(f"{i:08d}"), int(label), str(p)) for i, (label, p) in enumerate(zip(y, patients))]
    fit, val = split_by_patient(samples, ratio, seed)
    return np.array([int(s.path.name) for s in fit]), np.array([int(s.path.name) for s in val])


@dataclass(frozen=True)
class Plan:
    """What to adapt: the model (a METHODS name) and, with labels, the operating point."""

    operating_point: bool
    bn: str = "keep"            # a key of METHODS
    tent_steps: int = 10
    target_sensitivity: float | None = None
    finetune: FinetuneSpec | None = None

    @property
    def method(self) -> str:
        return self.finetune.name if self.bn == "finetune" else self.bn

    @property
    def name(self) -> str:
        parts = [] if self.bn == "keep" else [self.method]
        return "+".join(parts + (["threshold"] if self.operating_point else [])) or "source"

    @property
    def describe(self) -> str:
        spec = self.finetune
        text = "" if spec is None else (f"{spec.train} trains, {spec.epochs} epochs, lr {spec.lr:g}, "
                                        f"replay {spec.replay:g} of each batch from the source run's training images")
        return METHODS[self.bn].describe.format(tent_steps=self.tent_steps, spec=text)


def source_operating_point(checkpoint: dict) -> OperatingPoint:
    """The source run's point as it decides: its stored threshold and temperature, under its rule,
    with the number of validation images it was chosen on where the source recorded it."""
    stored = OperatingPoint.from_dict(checkpoint.get("operating_point"))
    return OperatingPoint(rule=stored.rule or "stored", threshold=float(checkpoint.get("threshold", 0.5)),
                          temperature=float(checkpoint.get("temperature", 1.0)), n_val=stored.n_val)


def first_site_operating_point(model: nn.Module, checkpoint: dict, source_val: tuple[torch.Tensor, torch.Tensor],
                               device: torch.device | str) -> OperatingPoint:
    """The source run's way of choosing its operating point (its threshold rule, and a temperature
    where it calibrates) applied again, to a changed (fine-tuned) model, on the source run's
    validation split: the fine-tuned model's scores sit elsewhere, so the source's stored threshold
    and temperature no longer mean what they meant there."""
    config = config_from_dict(checkpoint["config"])
    logits = predict_logits(model, source_val[0], 64, device, config.intensity)
    y = np.asarray(source_val[1])
    temperature = fit_temperature(logits, y) if config.calibrate else 1.0
    rule, threshold = threshold_by_rule(y, pneumonia_probability(logits, temperature), config)
    return OperatingPoint(rule=rule, threshold=threshold, temperature=float(temperature))


def fit_model(checkpoint: dict, plan: Plan, images: torch.Tensor, y: np.ndarray | None, *,
              patients: list[str], device: torch.device | str, seed: int = 0,
              context: Context = Context()) -> Fitted:
    """The checkpoint's model changed by the plan's method on `images` (labels `y` only for methods
    that learn from them), in eval mode."""
    model, config = model_from_checkpoint(checkpoint)
    method = METHODS[plan.bn]
    if method.labels and y is None:
        raise CxrError(f"{plan.method} learns from labels: pass a labelled site sample (NORMAL/ and PNEUMONIA/)")
    return method.fn(model, config, images, y, patients, device, seed, plan, context) if method.fn else \
        Fitted(model.eval())


@dataclass(frozen=True)
class Adapted:
    """A model adapted to a site's images, with the operating point it decides by."""

    fitted: Fitted
    operating_point: OperatingPoint  # rule, threshold, temperature
    logits: np.ndarray     # of the site's images, after adaptation


def adapt_model(checkpoint: dict, plan: Plan, images: torch.Tensor, y: np.ndarray | None, *,
                device: torch.device | str, seed: int = 0, patients: list[str] | None = None,
                context: Context = Context()) -> Adapted:
    """The checkpoint's model adapted to `images`. With `plan.operating_point` the point is chosen on
    the images the method did not fit on (all of them for methods without labels); without, a
    fine-tuned model takes the source run's rule again on the source's validation split (where it is
    here) and any other model keeps the source run's point."""
    patients = patients if patients is not None else [str(i) for i in range(len(images))]
    fitted = fit_model(checkpoint, plan, images, y, patients=patients, device=device, seed=seed,
                       context=context)
    config = config_from_dict(checkpoint["config"])
    logits = predict_logits(fitted.model, images, 64, device, config.intensity)
    if plan.operating_point:
        chosen = np.arange(len(images)) if fitted.holdout is None else fitted.holdout
        op = site_operating_point(logits[chosen], y[chosen], plan.target_sensitivity)
    elif plan.bn == "finetune" and context.source_val is not None:
        op = first_site_operating_point(fitted.model, checkpoint, context.source_val, device)
    else:
        op = source_operating_point(checkpoint)
    return Adapted(fitted, op, logits)
