"""`cxr adapt`: a trained run fitted to a new site's images, written as a new run folder.

The source run is never changed. The new folder holds best.pt (the adapted checkpoint, with what
was adapted and on which images under "adaptation"), config.json and history.csv of the source,
adaptation.json and, for a labelled sample, site_predictions.csv; with `--finetune`, also
finetune_history.csv (the fine-tune's own epochs) and the source's test split and external sets
evaluated again. The methods themselves are in `methods.py`.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision

from .. import __version__
from ..config import CLASSES, FinetuneSpec, TaskConfig
from ..data.dataset import Sample, describe, labels_of
from ..data.folders import get_external_samples
from ..data.loading import load_images
from ..data.overlap import file_digest
from ..errors import CxrError
from ..evaluation.evaluate import pneumonia_probability
from ..files import atomic_folder, save_torch, write_csv, write_json
from ..training.checkpoint import model_from_checkpoint
from ..training.operating_point import OperatingPoint
from ..trust.fit import Trust
from ..trust.shift import MIN_IMAGES
from .finetune import kept_epoch
from .methods import (
    Adapted,
    Context,
    Plan,
    adapt_model,
    first_site_operating_point,
    site_operating_point,
    site_samples,
    source_operating_point,
)
from .refit import flag_thresholds, refit_trust
from .settings import AdaptSettings, kfold_estimate
from .source import check_out, source_data, source_run, source_training_images, source_validation

# --- cxr adapt RUN --data SITE --out NEW: plan, fit, choose, write ------------------------------

@dataclass(frozen=True)
class AdaptPlan:
    """What `cxr adapt` will do, every input checked before an image is decoded."""

    source: Path              # the source run's folder (only read)
    checkpoint: dict          # its best.pt
    config: TaskConfig
    site: Path
    site_name: str            # the site's key in a fine-tuned model's operating points
    samples: list[Sample]     # the site's images (label -1 without labels)
    unlabeled: bool
    plan: Plan                # the method, and whether the operating point is chosen at the site
    estimate_from: Path | None
    estimate: dict | None     # the k-fold estimate of this plan, for the model card

    @property
    def finetune(self) -> FinetuneSpec | None:
        return self.plan.finetune


@dataclass(frozen=True)
class SiteInputs:
    """The images an adaptation reads: the site's, and for a fine-tune the source run's it replays
    or chooses on (`context`)."""

    images: torch.Tensor
    y: np.ndarray | None                                  # None: the site's images carry no labels
    trained_on: str | None                                # the source run's data folder (a fine-tune's)
    replay: tuple[torch.Tensor, torch.Tensor] | None      # the source images a fine-tune replays
    context: Context


@dataclass(frozen=True)
class OperatingPoints:
    """Where the new run decides, each point with where it was chosen (`chosen_on`)."""

    model: OperatingPoint                       # best.pt's threshold and temperature
    per_site: dict[str, OperatingPoint] | None  # a fine-tuned model's point for each site it serves, chosen
    #                                             on that site's validation


def adapt_run(run_dir: Path, site: Path, out: Path, *, settings: AdaptSettings = AdaptSettings(),
              unlabeled: bool = False, adabn_too: bool = False, use_tent: bool = False,
              finetune: FinetuneSpec | None = None, site_threshold: bool = False,
              site_name: str | None = None, estimate_from: Path | None = None,
              trackers: tuple[str, ...] = (), log_dir: Path | None = None) -> dict:
    """Adapt RUN_DIR/best.pt to the site's images; write the new run folder OUT. Returns the
    provenance written to OUT/adaptation.json. With `finetune`, the model is trained on the site's
    labelled images (finetune.py) and the new run is evaluated on the source run's test split and
    on each of `settings.externals` as well, so what it kept of the first site shows beside what
    it learnt."""
    job = plan_adaptation(run_dir, site, out, settings=settings, unlabeled=unlabeled, adabn_too=adabn_too,
                          use_tent=use_tent, finetune=finetune, site_threshold=site_threshold,
                          site_name=site_name, estimate_from=estimate_from)
    inputs = read_inputs(job, settings)
    source_check = _check_before(job, inputs.images, settings)
    adapted = adapt_model(job.checkpoint, job.plan, inputs.images, inputs.y, device=settings.device,
                          seed=settings.seed, patients=[s.patient for s in job.samples],
                          context=inputs.context)
    points = choose_points(job, inputs, adapted, settings)
    trust, trust_note, parts = refit_trust(job.checkpoint, adapted.fitted.model, config=job.config, bn=job.plan.bn,
                                    images=inputs.images, y=inputs.y, holdout=adapted.fitted.holdout,
                                    replay=inputs.replay, source_val=inputs.context.source_val,
                                    device=settings.device, seed=settings.seed)
    settings.log(f"out-of-distribution statistics: {trust_note}")
    if trust is not None and points.per_site is not None and parts:  # each site's flag on its own images
        points = replace(points, per_site=flag_thresholds(points.per_site, trust, parts, job.site_name))
    provenance = adaptation_record(job, inputs, adapted, points, seed=settings.seed,
                                   source_check=source_check, trust=trust_note)
    with atomic_folder(out) as tmp:
        write_run(tmp, job=job, inputs=inputs, adapted=adapted, provenance=provenance, settings=settings,
                  checkpoint=_adapted_checkpoint(job, adapted, points, provenance, trust))
    if trackers and finetune is not None:
        _track(Path(out), trackers, log_dir=log_dir, log=settings.log, history=adapted.fitted.history,
               config={**job.checkpoint["config"], "adaptation": job.plan.name, **finetune.to_dict()},
               paths=[s.path for s in job.samples])
    return provenance


def plan_adaptation(run_dir: Path, site: Path, out: Path, *, settings: AdaptSettings, unlabeled: bool,
                    adabn_too: bool, use_tent: bool, finetune: FinetuneSpec | None, site_threshold: bool,
                    site_name: str | None, estimate_from: Path | None) -> AdaptPlan:
    """The source run, the site's samples and what to fit, each checked (one CxrError naming the fix)."""
    source, checkpoint = source_run(run_dir)
    check_out(Path(out), source, settings.overwrite)
    if finetune is not None and unlabeled:
        raise CxrError("--finetune learns from labels: pass a labelled site sample (NORMAL/ and PNEUMONIA/) "
                       "without --unlabeled")
    name = site_name or Path(site).name
    if finetune is not None and name == "source":  # the operating points' other key
        raise CxrError(f"{site}: a site named 'source' would take the name of the source run's operating point; "
                       "pass --site-name NAME")
    samples = site_samples(site, unlabeled, settings.patients)
    for folder in settings.externals.values():  # every input checked before any work: a bad set ends it now
        get_external_samples(folder)
    config = model_from_checkpoint(checkpoint)[1]
    bn = "finetune" if finetune else "tent" if use_tent else "adabn" if (unlabeled or adabn_too) else "keep"
    # Fine-tuning keeps the source's operating point unless told (`site_threshold`): measured on
    # nih_half by k folds, a threshold chosen on the few site validation patients did worse (README).
    plan = Plan(operating_point=not unlabeled and (finetune is None or site_threshold), bn=bn,
                tent_steps=settings.tent_steps, target_sensitivity=settings.target_sensitivity,
                finetune=finetune)
    estimate = (kfold_estimate(estimate_from, source, site, plan.name, spec=finetune,
                               settings=settings.measured()) if estimate_from else None)
    return AdaptPlan(source, checkpoint, config, Path(site), name, samples, unlabeled, plan, estimate_from,
                     estimate)


def read_inputs(job: AdaptPlan, settings: AdaptSettings) -> SiteInputs:
    """The site's images decoded (and labels), and what a fine-tune reads of the source run."""
    log, workers, cache_dir, finetune = settings.log, settings.workers, settings.cache_dir, job.finetune
    if job.unlabeled:
        log(f"site: {job.site}: {len(job.samples)} images without labels")
    else:
        log(f"site: {job.site}\n{describe({'site': job.samples})}")
    trained_on = source_data(job.source) if finetune is not None else None
    images = load_images([s.path for s in job.samples], job.config.image_size, workers, desc="decode site",
                         cache_dir=cache_dir)
    y = None if job.unlabeled else labels_of(job.samples).numpy()
    source_train = source_training_images(job.source, trained_on, [finetune] if finetune else [], job.config,
                                          workers=workers, cache_dir=cache_dir, log=log)
    source_val = (source_validation(trained_on, job.config, workers, cache_dir, log) if finetune is not None
                  else None)
    context = Context(replay=source_train, source_val=source_val, precision=settings.precision, log=log)
    return SiteInputs(images, y, trained_on, source_train if finetune and finetune.replay else None, context)


def _check_before(job: AdaptPlan, images: torch.Tensor, settings: AdaptSettings) -> dict | None:
    """Unlabelled images and a model that can say how far they are from its own: that check, before
    adapting (should one?); None otherwise."""
    has_trust = Trust.from_checkpoint(job.checkpoint) is not None
    if not (job.unlabeled and has_trust and len(images) >= MIN_IMAGES):
        return None
    from ..evaluation.check import check_images, format_check

    check = check_images(job.checkpoint, images, None, settings.device, settings.seed)
    settings.log("the source model on the site's images, before adapting:\n" + format_check(check))
    return check


def choose_points(job: AdaptPlan, inputs: SiteInputs, adapted: Adapted,
                  settings: AdaptSettings) -> OperatingPoints:
    """The new run's operating point and, for a fine-tuned model, one per site it serves: the
    source's rule chosen again for the changed model on the source's validation split, the
    site's on the site's validation images only."""
    op, holdout = adapted.operating_point, adapted.fitted.holdout
    at_site = replace(op, chosen_on="site" if holdout is None else "site validation patients",
                      n_val=len(holdout) if holdout is not None else None if inputs.y is None else len(inputs.y))
    if job.finetune is None:
        kept = replace(op, chosen_on="the source run (kept)")
        return OperatingPoints(at_site if job.plan.operating_point else kept, None)
    source_val = inputs.context.source_val
    if source_val is not None:
        first = first_site_operating_point(adapted.fitted.model, job.checkpoint, source_val, settings.device)
        first = replace(first, n_val=len(source_val[1]), chosen_on=(
            f"the source run's rule ({first.rule}) applied again to the fine-tuned model, on the source "
            f"run's validation split ({len(source_val[1])} images)"))
    else:
        first = replace(source_operating_point(job.checkpoint), chosen_on=(
            "the source run (kept: the source run's data is not here to choose it again)"))
    site_op = site_operating_point(adapted.logits[holdout], inputs.y[holdout], settings.target_sensitivity)
    per_site = {job.site_name: replace(site_op, chosen_on=f"{len(holdout)} site validation images",
                                       n_val=len(holdout)),
                "source": first}
    return OperatingPoints(at_site if job.plan.operating_point else
                           replace(op, chosen_on=first.chosen_on, n_val=first.n_val), per_site)


def adaptation_record(job: AdaptPlan, inputs: SiteInputs, adapted: Adapted, points: OperatingPoints, *,
                      seed: int, source_check: dict | None, trust: str) -> dict:
    """adaptation.json (and best.pt's "adaptation"): what was adapted, from which run, on which
    images (by content too), how each choice was made."""
    samples, fitted = job.samples, adapted.fitted
    record = {
        "source_run": str(job.source.resolve()), "source_checkpoint": str((job.source / "best.pt").resolve()),
        "site": str(job.site.resolve()), "labeled": not job.unlabeled,
        "counts": ({"images": len(samples)} if job.unlabeled else
                   {c: int((inputs.y == i).sum()) for i, c in enumerate(CLASSES)}),
        "patients": len({s.patient for s in samples}),
        "adapted": job.plan.name, "batch_norm": job.plan.describe,
        "operating_point": points.model.to_dict(),
        "source_operating_point": source_operating_point(job.checkpoint).to_dict(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seed": seed,
        # by content, so that a copy of the site's images under another folder or name is still
        # recognised as the adaptation's own images when the run is evaluated on it
        "site_digests": sorted({file_digest(s.path) for s in samples}),
    }
    if job.finetune is not None:
        record["finetune"] = _finetune_record(job, inputs, fitted)
    if job.estimate is not None:
        record["kfold_estimate"] = job.estimate
    if source_check is not None:
        record["source_check"] = {k: source_check[k] for k in ("shift", "estimate", "verdict")}
    record["trust"] = trust
    if points.per_site is not None:
        record["operating_points"] = _as_dicts(points.per_site)
    return record


def _as_dicts(per_site: dict[str, OperatingPoint]) -> dict[str, dict]:
    return {name: point.to_dict() for name, point in per_site.items()}


def _finetune_record(job: AdaptPlan, inputs: SiteInputs, fitted) -> dict:
    """How the fine-tune went: its epochs, the images it fitted, held out and replayed, what chose."""
    samples, replay, source_val = job.samples, inputs.replay, inputs.context.source_val
    val = set(fitted.holdout.tolist())
    return {
        **job.finetune.to_dict(), "history": fitted.history,
        "site_train": {"images": len(samples) - len(val),
                       "patients": len({s.patient for i, s in enumerate(samples) if i not in val})},
        "site_validation": {"images": len(val), "patients": len({samples[i].patient for i in val})},
        "replay_images": 0 if replay is None else len(replay[1]),
        "replay_source": inputs.trained_on if replay is not None else None,
        "kept_epoch": kept_epoch(fitted.history),
        "chosen_on": "the worst of the site's validation patients and the source run's validation split "
                     f"({len(source_val[1])} images)" if source_val is not None else
                     "the site's validation patients (the source run's data is not here)",
        **({"soup_fitted": fitted.soup} if fitted.soup else {}),
        **({"wise": fitted.wise} if fitted.wise else {})}


def _adapted_checkpoint(job: AdaptPlan, adapted: Adapted, points: OperatingPoints, provenance: dict,
                        trust: Trust | None) -> dict:
    """The source checkpoint with the adapted weights, operating point(s), statistics and provenance."""
    op = adapted.operating_point
    new = dict(job.checkpoint)
    new.update(model=adapted.fitted.model.state_dict(), threshold=op.threshold,
               temperature=op.temperature, adaptation=provenance, optimizer=None)
    new.pop("trust", None)
    new.pop("operating_points", None)  # a source trained on several sites: its points read its own statistics
    if trust is not None:
        new["trust"] = trust.to_dict()
    if points.per_site is not None:
        new["operating_points"] = _as_dicts(points.per_site)
    if job.plan.operating_point:
        at_site = replace(points.model, site=provenance["site"], n_site=len(job.samples))
        new["operating_point"] = at_site.to_dict()
    elif job.finetune is not None:  # the model changed: say where its operating point comes from
        new["operating_point"] = points.model.to_dict()
    return new


def write_run(tmp: Path, *, job: AdaptPlan, inputs: SiteInputs, adapted: Adapted, checkpoint: dict,
              provenance: dict, settings: AdaptSettings) -> None:
    """The new run folder's files, written into `tmp` (which atomic_folder then puts in place)."""
    source = job.source
    save_torch(tmp / "best.pt", checkpoint)
    cfg = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {
        "config": job.checkpoint["config"]}
    made = {"command": list(settings.command) or sys.argv,  # this run's, the source's kept beside
            "versions": {"cxr": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
                         "torchvision": str(torchvision.__version__)}}
    kept = {f"source_{key}": cfg[key] for key in made if key in cfg}
    write_json(tmp / "config.json",
               {**cfg, **kept, **made, "adapted_from": provenance["source_run"], "adaptation": job.plan.name})
    if (source / "history.csv").is_file():
        shutil.copy2(source / "history.csv", tmp / "history.csv")
    write_json(tmp / "adaptation.json", provenance)
    history = adapted.fitted.history
    if job.finetune is not None:  # the fine-tune's own epochs (history.csv above is the source's)
        cols = list(dict.fromkeys(k for row in history for k in row))
        write_csv(tmp / "finetune_history.csv", cols, ([row.get(k, "") for k in cols] for row in history))
    if not job.unlabeled:
        _write_site_predictions(tmp / "site_predictions.csv", job.samples, inputs.y, adapted)
    if job.estimate_from is not None:  # the k-fold table and curve travel with the model they describe
        for name in ("adapt_evaluation.json", "adapt_evaluation.md", "figures/adapt_curve.png"):
            if (Path(job.estimate_from) / name).is_file():
                (tmp / name).parent.mkdir(exist_ok=True)
                shutil.copy2(Path(job.estimate_from) / name, tmp / name)
    if job.finetune is not None:
        _evaluate_both_sites(tmp, inputs.trained_on, settings)


def _write_site_predictions(path: Path, samples: list[Sample], y: np.ndarray, adapted: Adapted) -> None:
    """Every site image's probability after adaptation, and its role: fitted on, validation, or
    both (site)."""
    holdout = adapted.fitted.holdout
    prob = pneumonia_probability(adapted.logits, adapted.operating_point.temperature)
    role = np.full(len(samples), "fit" if holdout is not None else "site", dtype=object)
    if holdout is not None:
        role[holdout] = "validation"
    write_csv(path, ["path", "true_label", "prob_pneumonia", "role"],
              ([str(s.path), CLASSES[t], f"{q:.9g}", r] for s, t, q, r in zip(samples, y, prob, role)))


def _track(out: Path, kinds: tuple[str, ...], *, log_dir: Path | None, config: dict, history: list[dict],
           paths: list[Path], log: Callable[[str], None]) -> None:
    """The fine-tuning's epochs (adaptation.json's history) and the published run's results to
    TensorBoard / MLflow (tracking.py), once the run folder is complete."""
    from ..reporting.tracking import data_digest, open_trackers

    trackers = open_trackers(list(kinds), out, log_dir, config, data_digest(paths), log)
    epochs = max((row["epoch"] for row in history), default=0)
    for row in history:  # a soup's members one after the other, so that every step is one epoch
        step = row["epoch"] + (row.get("member", 1) - 1) * epochs
        trackers.epoch({**{k: v for k, v in row.items() if k != "best"}, "epoch": step})
    cfg = json.loads((out / "config.json").read_text())
    write_json(out / "config.json", {**cfg, "tracking": trackers.record()})
    trackers.finish(out)


def _evaluate_both_sites(run_dir: Path, data: str | None, settings: AdaptSettings) -> None:
    """The fine-tuned run on the source run's test split (what it kept) and on each external set."""
    from ..evaluation.evaluate import evaluate_run

    quiet, log = (lambda _: None), settings.log
    device, workers, cache_dir = settings.device, settings.workers, settings.cache_dir
    if data and Path(data).exists():
        m = evaluate_run(run_dir, Path(data), device, workers, cache_dir, log=quiet)
        log(f"source test split ({data}): accuracy {m['accuracy']:.3f}, ROC AUC {m['roc_auc']:.3f}")
    else:
        log(f"note: the source run's data ({data}) is not here: its test split is not evaluated")
    for name, folder in settings.externals.items():
        m = evaluate_run(run_dir, Path(folder), device, workers, cache_dir, log=quiet, name=name)
        log(f"{name}: accuracy {m['accuracy']:.3f}, ROC AUC {m['roc_auc']:.3f}")
