"""`cxr adapt --evaluate K`: how well each adaptation method does at a site, measured honestly.

The site sample is split by patient into K folds; each fold is predicted by a model adapted on (a
draw of N images per class from) the other K-1 folds, so no image is predicted by a model that
saw it; metrics pool the held-out predictions of every fold and repeat, with 95% intervals that
resample patients. The steps read as the guide tells them: plan the folds and the variants
(`read_site`, `read_source`, `KFoldPlan`), fit each variant in each fold (`fit_folds`), choose the
variant the training part's own validation patients prefer (`choose`, the nested choice), write the
result (`write_evaluation`). The methods are `methods.py`'s; what the folds gather and its summary
is `heldout.py`; the table, `kfold_table.py`.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from ..config import CLASSES, FinetuneSpec, TaskConfig
from ..data.dataset import Sample, describe, labels_of, without_patient_id
from ..data.loading import get_test_samples, load_images
from ..errors import CxrError, DataError
from ..evaluation.compare import ADAPT_PREDICTIONS as PREDICTIONS
from ..evaluation.evaluate import pneumonia_probability, predict_logits
from ..files import atomic_folder, write_csv, write_json, write_text
from ..training.checkpoint import model_from_checkpoint
from ..training.operating_point import OperatingPoint
from .heldout import (
    NESTED,
    PREDICTION_COLUMNS,
    Decision,
    HeldOut,
    Pooled,
    prediction_rows,
    summary_rows,
)
from .kfold_table import evaluation_table
from .methods import (
    MIN_PER_CLASS,
    Context,
    Plan,
    first_site_operating_point,
    fit_model,
    site_operating_point,
    site_samples,
    site_validation_split,
    source_operating_point,
)
from .settings import AdaptSettings
from .source import check_out, source_data, source_run, source_training_images, source_validation


def patient_folds(samples: list[Sample], k: int, seed: int = 0) -> np.ndarray:
    """Fold (0..k-1) of each sample: whole patients per fold, each class's patients dealt round
    the folds in a seeded random order (so every fold holds both classes)."""
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_patient[s.patient].append(i)
    rng = random.Random(seed)
    fold = np.empty(len(samples), dtype=int)
    for label in range(len(CLASSES)):
        patients = sorted(p for p, idx in by_patient.items()
                          if round(np.mean([samples[i].label for i in idx])) == label)
        if len(patients) < k:
            raise DataError(f"{len(patients)} {CLASSES[label]} patients in the site sample: --evaluate {k} needs at "
                            f"least {k}; pass a smaller K or add images")
        rng.shuffle(patients)
        for j, p in enumerate(patients):
            fold[by_patient[p]] = j % k
    return fold


def _subsample(pool: np.ndarray, y: np.ndarray, per_class: int | None, rng: np.random.Generator) -> np.ndarray:
    if per_class is None:
        return pool
    chosen = [rng.choice(pool[y[pool] == c], min(per_class, int((y[pool] == c).sum())), replace=False)
              for c in range(len(CLASSES))]
    return np.sort(np.concatenate(chosen))


def _source_sets(data: str | None, config, *, externals: dict[str, Path], workers: int,
                 cache_dir: Path | None, log: Callable[[str], None],
                 checkpoint: dict) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """The first site's images on which forgetting is measured: the source run's test split (when
    its data is here) and each external set, as (uint8 images, labels); refused when the run's
    pretrained backbone saw any of them."""
    from ..data.folders import get_external_samples
    from ..data.unlabelled import refuse_seen_by_recorded_backbone
    sets = {}
    named = ([("source_test", get_test_samples(Path(data), config.seed, config.limit, config.val_ratio,
                                               config.classes))] if data and Path(data).exists() else [])
    named += [(name, get_external_samples(folder)) for name, folder in externals.items()]
    for name, samples in named:
        images = load_images([s.path for s in samples], config.image_size, workers, desc=f"decode {name}",
                             cache_dir=cache_dir)
        refuse_seen_by_recorded_backbone(checkpoint, {name: (samples, images)}, workers, log)
        sets[name] = (images, labels_of(samples).numpy())
        log(f"forgetting measured on {name}: {len(samples)} images")
    return sets


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


# --- what the steps pass along -------------------------------------------------------------------

@dataclass(frozen=True)
class SiteSample:
    """The labelled site sample, decoded, and its outer folds (whole patients in each)."""

    samples: list[Sample]
    images: torch.Tensor
    y: np.ndarray
    patients: list[str]    # of each image
    fold: np.ndarray       # the outer fold of each image
    warning: str | None    # images without a patient id: folds and intervals are by image there


@dataclass(frozen=True)
class Source:
    """The source run as every fold starts from it, predicted once: its model on the site's images
    and on the first site's sets, its operating point, and what fine-tunes read of it."""

    checkpoint: dict
    config: TaskConfig
    model: nn.Module
    logits: np.ndarray                                  # of the site's images
    sets: dict[str, tuple[torch.Tensor, np.ndarray]]    # the first site's images forgetting is measured on
    set_logits: dict[str, np.ndarray]
    operating_point: OperatingPoint
    context: Context                                    # replayed images and validation split (fine-tunes)


@dataclass(frozen=True)
class KFoldPlan:
    """What an evaluation measures: K folds by patient, the numbers of adaptation images per class
    (None: all of the other folds) and their draws, and the variants (each without a site threshold;
    each is also measured with one)."""

    k: int
    sizes: list[int | None]
    repeats: int
    variants: list[Plan]
    inner_ratio: float   # the share of a training part's patients the nested choice reads (as
    #                      fine-tunes hold out)

    @property
    def row_names(self) -> list[str]:
        return [p.name for v in self.variants for p in (v, replace(v, operating_point=True))] + list(NESTED)


@dataclass(frozen=True)
class Fold:
    """One outer fold of one draw, as indices into the site sample."""

    draw: int
    index: int
    held: np.ndarray    # the images it predicts
    pool: np.ndarray    # those it adapts on: the other folds, or a draw of N per class from them
    inner: np.ndarray   # the pool's validation patients (as a fine-tune splits them): what the nested
    #                     choice reads


@dataclass(frozen=True)
class Candidate:
    """A variant fitted in one fold, as the nested choice weighs it."""

    plan: Plan                 # the variant, deciding by the source's operating point
    score: float               # ROC AUC on the fold's inner validation patients (nan: one class there)
    source_point: Decision     # by the source's operating point (chosen again for a fine-tuned model)
    site_point: Decision       # by one chosen at the site: the variant's "+threshold" row

    @property
    def site_plan(self) -> Plan:
        return replace(self.plan, operating_point=True)


# --- plan the folds and variants, fit each fold, choose (nested), write the result ----------------

def _variants(use_tent: bool, finetunes: list[FinetuneSpec], settings: AdaptSettings) -> list[Plan]:
    """Every model variant (a METHODS name and its fine-tuning spec), each measured with the
    source's operating point and with one chosen at the site."""
    methods = ([("keep", None), ("adabn", None)] + ([("tent", None)] if use_tent else [])
               + [("finetune", spec) for spec in finetunes])
    return [Plan(False, bn, settings.tent_steps, settings.target_sensitivity, spec) for bn, spec in methods]


def evaluate_adaptation(run_dir: Path, site: Path, out: Path, *, settings: AdaptSettings = AdaptSettings(),
                        k: int = 5, sizes: list[int | None] = (None,), repeats: int = 1,
                        use_tent: bool = False, finetunes: list[FinetuneSpec] = ()) -> dict:
    """K-fold (by patient) evaluation of every adaptation variant on a labelled site sample:
    source (as trained), threshold (operating point chosen on the site), adabn, adabn+threshold,
    with `use_tent` tent and tent+threshold, and each fine-tuning spec in `finetunes` with and
    without a site threshold. For each number of adaptation images per class in `sizes` (None:
    all of the other folds, once), each of `repeats` draws that many of each class from the other
    folds. Every image is predicted once per repeat, by a model that never saw it; a method that
    needs a validation split (fine-tuning) takes it by patient from the other folds, never from
    the held one. Metrics pool the held-out predictions of all folds and repeats, with 95%
    intervals resampling patients; each variant is compared with the source on the same images
    (paired bootstrap); forgetting: every fitted model also predicts the source run's test split
    and each external set. Writes OUT/adapt_evaluation.json and .md, OUT/adapt_predictions.csv (every
    pooled held-out prediction: what `cxr compare` pairs across evaluations) and, with several sizes,
    figures/adapt_curve.png; returns the JSON."""
    source_dir, checkpoint = source_run(run_dir)
    out = Path(out)
    check_out(out, source_dir, settings.overwrite)
    measured = settings.measured()  # what --estimate-from checks
    config = model_from_checkpoint(checkpoint)[1]
    site_sample = read_site(site, config, k=k, sizes=sizes, settings=settings)
    source = read_source(source_dir, checkpoint, config, site_sample.images, finetunes=finetunes,
                         settings=settings)
    plan = KFoldPlan(k, list(sizes), repeats, _variants(use_tent, list(finetunes), settings),
                     finetunes[0].val_ratio if finetunes else FinetuneSpec().val_ratio)
    rows, predictions = [], []  # predictions: every held-out image of every variant (cxr compare reads them)
    for size in sizes:
        pooled = fit_folds(size, plan, site_sample, source, settings)
        rows += summary_rows(pooled, plan.row_names, settings.seed)
        predictions += prediction_rows(pooled, plan.row_names, site_sample.samples, site_sample.y)
    y, sets = site_sample.y, source.sets
    result = {"source_run": str(source_dir.resolve()), "site": str(Path(site).resolve()), "folds": k,
              "repeats": repeats, "seed": settings.seed,
              "images": {c: int((y == i).sum()) for i, c in enumerate(CLASSES)},
              "patients": len(set(site_sample.patients)), "rows": rows,
              "source_sets": {n: len(v[1]) for n, v in sets.items()},
              "finetune": [spec.to_dict() for spec in finetunes], "warning": site_sample.warning,
              "settings": measured,
              "how": "each image predicted by a model adapted on other patients only (K folds by patient); "
                     "a method with a validation split takes it by patient from the other folds; metrics pool "
                     "the held-out predictions of every fold and repeat; intervals resample patients (all "
                     "their images together) within their class; vs_source: the same images, paired "
                     "bootstrap of patients; source_sets: every fitted model on the first site's images "
                     "(mean, min, max over the models)"}
    write_evaluation(out, result, predictions, curve=len(sizes) > 1)
    return result


def read_site(site: Path, config: TaskConfig, *, k: int, sizes: list[int | None],
              settings: AdaptSettings) -> SiteSample:
    """The site sample, checked (at least K patients of each class; sizes a threshold can be chosen
    on), dealt into K folds by patient and decoded."""
    log = settings.log
    samples = site_samples(site, unlabeled=False, patients=settings.patients)
    log(f"site: {site}\n{describe({'site': samples})}")
    unnamed = without_patient_id(samples)
    warning = (f"{unnamed} of {len(samples)} site images carry no patient id in their file name: each counts as its "
               "own patient, so folds and intervals are by image there (optimistic if a person has several)"
               if unnamed else None)
    if warning:
        log(f"warning: {warning}")
    fold = patient_folds(samples, k, settings.seed)
    for size in sizes:
        if size is not None and size < MIN_PER_CLASS:
            raise CxrError(f"--sizes {size}: choosing a threshold needs at least {MIN_PER_CLASS} images per class")
    images = load_images([s.path for s in samples], config.image_size, settings.workers, desc="decode site",
                         cache_dir=settings.cache_dir)
    return SiteSample(samples, images, labels_of(samples).numpy(), [s.patient for s in samples], fold,
                      warning)


def read_source(source_dir: Path, checkpoint: dict, config: TaskConfig, images: torch.Tensor, *,
                finetunes: list[FinetuneSpec], settings: AdaptSettings) -> Source:
    """The source model's predictions of the site's images and of the first site's sets (those
    only where fine-tunes can forget), and the source images fine-tunes replay and choose on."""
    device, workers, cache_dir, log = settings.device, settings.workers, settings.cache_dir, settings.log
    trained_on = source_data(source_dir)
    replay = source_training_images(source_dir, trained_on, list(finetunes), config, workers=workers,
                                    cache_dir=cache_dir, log=log)
    source_val = source_validation(trained_on, config, workers, cache_dir, log) if finetunes else None
    context = Context(replay=replay, source_val=source_val, precision=settings.precision)
    sets = (_source_sets(trained_on, config, externals=settings.externals, workers=workers,
                         cache_dir=cache_dir, log=log, checkpoint=checkpoint) if finetunes else {})
    model, _ = model_from_checkpoint(checkpoint)
    logits = predict_logits(model, images, 64, device, config.intensity)
    set_logits = {n: predict_logits(model, x, 64, device, config.intensity) for n, (x, _) in sets.items()}
    return Source(checkpoint, config, model, logits, sets, set_logits, source_operating_point(checkpoint),
                  context)


def fit_folds(size: int | None, plan: KFoldPlan, site: SiteSample, source: Source,
              settings: AdaptSettings) -> Pooled:
    """Every fold of every draw at `size` adaptation images per class: each variant, fitted on the
    fold's training part, predicts the held images; the nested choice keeps the predictions of the
    variant that part's own validation patients prefer."""
    pooled = Pooled(size, {name: HeldOut() for name in plan.row_names})
    for r in range(plan.repeats if size is not None else 1):  # all of the other folds: nothing to redraw
        rng = np.random.default_rng([settings.seed, r, size or 0])
        for f in range(plan.k):
            fold = make_fold(site, index=f, draw=r, size=size, rng=rng, inner_ratio=plan.inner_ratio,
                             seed=settings.seed)
            pooled.used["NORMAL"].append(int((site.y[fold.pool] == 0).sum()))
            pooled.used["PNEUMONIA"].append(int((site.y[fold.pool] == 1).sum()))
            # a WiSE variant mixes this fold's fine-tune of its spec instead of training one again
            context = replace(source.context, trained={})
            candidates = [fit_variant(v, fold, site=site, source=source, settings=settings, context=context)
                          for v in plan.variants]
            best = choose(candidates)
            pooled.choices.append({"per_class": size, "fold": f, "draw": r, "chosen": best.plan.method,
                                   "inner_auc": best.score, "inner_images": int(len(fold.inner))})
            decided = ([(c.plan.name, c.source_point) for c in candidates]
                       + [(c.site_plan.name, c.site_point) for c in candidates]
                       + [(NESTED[0], best.source_point), (NESTED[1], best.site_point)])
            for name, decision in decided:
                pooled.rows[name].add(decision, draw=r, held=fold.held, y=site.y, patients=site.patients)
        settings.log(f"{'all' if size is None else size} per class, draw {r + 1}: {plan.k} folds done")
    return pooled


def make_fold(site: SiteSample, *, index: int, draw: int, size: int | None, rng: np.random.Generator,
              inner_ratio: float, seed: int) -> Fold:
    """Fold `index` of draw `draw`: its held images, its training part (a draw of `size` per class
    from the other folds, or all of them) and that part's inner validation patients."""
    held = np.flatnonzero(site.fold == index)
    pool = _subsample(np.flatnonzero(site.fold != index), site.y, size, rng)
    # nested selection: the variant cxr picks is chosen inside this training part, on its own
    # validation patients (those the fine-tunes hold out), never on the held fold
    _, inner = site_validation_split(site.y[pool], [site.patients[i] for i in pool], inner_ratio, seed + draw)
    return Fold(draw, index, held, pool, pool[inner])


def fit_variant(variant: Plan, fold: Fold, *, site: SiteSample, source: Source, settings: AdaptSettings,
                context: Context) -> Candidate:
    """The variant fitted on the fold's training part ("keep": the source model as it is), scored on
    its inner validation patients, predicting the held images by the source's operating point and
    by one chosen at the site (on the images the method did not fit on)."""
    device, intensity, images, y = settings.device, source.config.intensity, site.images, site.y
    if variant.bn == "keep":
        model, chosen = source.model, fold.pool
        chosen_logits, held_logits = source.logits[chosen], source.logits[fold.held]
        set_logits = source.set_logits
    else:
        fitted = fit_model(source.checkpoint, variant, images[fold.pool], y[fold.pool],
                           patients=[site.patients[i] for i in fold.pool], device=device,
                           seed=settings.seed + fold.draw, context=context)
        model = fitted.model
        chosen = fold.pool if fitted.holdout is None else fold.pool[fitted.holdout]
        chosen_logits = predict_logits(model, images[chosen], 64, device, intensity)
        held_logits = predict_logits(model, images[fold.held], 64, device, intensity)
        set_logits = {n: predict_logits(model, x, 64, device, intensity) for n, (x, _) in source.sets.items()}
    op = site_operating_point(chosen_logits, y[chosen], settings.target_sensitivity)
    # without a site threshold, a fine-tuned model decides by the source run's rule chosen
    # again on the source's validation split (as the fitted model does: adapt.py)
    source_val = source.context.source_val
    keep = (first_site_operating_point(model, source.checkpoint, source_val, device)
            if variant.bn == "finetune" and source_val is not None else source.operating_point)
    inner_logits = predict_logits(model, images[fold.inner], 64, device, intensity)
    score = _auc(y[fold.inner], pneumonia_probability(inner_logits, 1.0))
    return Candidate(variant, score, _decide(held_logits, keep, set_logits, source.sets),
                     _decide(held_logits, op, set_logits, source.sets))


def _decide(held_logits: np.ndarray, point: OperatingPoint, set_logits: dict[str, np.ndarray],
            sets: dict[str, tuple[torch.Tensor, np.ndarray]]) -> Decision:
    """The held images' probabilities at the point's temperature, and the model at the same point
    on each of the first site's sets."""
    numbers = {}
    for n, (_, set_y) in sets.items():
        prob = pneumonia_probability(set_logits[n], point.temperature)
        numbers[f"{n}_accuracy"] = float(((prob >= point.threshold) == set_y).mean())
        numbers[f"{n}_roc_auc"] = float(roc_auc_score(set_y, prob))
    return Decision(pneumonia_probability(held_logits, point.temperature), point.threshold, numbers)


def choose(candidates: list[Candidate]) -> Candidate:
    """The nested choice: the highest score on the training part's validation patients (the first
    of equals; a score that cannot be computed loses)."""
    return max(candidates, key=lambda c: -np.inf if np.isnan(c.score) else c.score)


def write_evaluation(out: Path, result: dict, predictions: list[tuple], *, curve: bool) -> None:
    """OUT/adapt_evaluation.json and .md, adapt_predictions.csv and (`curve`) figures/adapt_curve.png,
    all or none."""
    with atomic_folder(out) as tmp:
        write_json(tmp / "adapt_evaluation.json", result)
        write_text(tmp / "adapt_evaluation.md", evaluation_table(result) + "\n")
        write_csv(tmp / PREDICTIONS, PREDICTION_COLUMNS, predictions)
        if curve:
            from ..reporting.plots import plot_adapt_curve

            plot_adapt_curve(result, tmp / "figures" / "adapt_curve.png")
