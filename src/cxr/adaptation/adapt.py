"""`cxr adapt`: a trained run fitted to a new site's images, written as a new run folder.

The source run is never changed. The new folder holds best.pt (the adapted checkpoint, with what
was adapted and on which images under "adaptation"), config.json and history.csv of the source,
adaptation.json and, for a labelled sample, site_predictions.csv; with `--finetune`, also
finetune_history.csv (the fine-tune's own epochs) and the source's test split and external sets
evaluated again. The methods themselves are in `methods.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import CLASSES, FinetuneSpec
from ..data.dataset import (
    describe,
    labels_of,
)
from ..data.folders import get_external_samples
from ..data.loading import load_images, prepare_splits
from ..data.overlap import file_digest
from ..errors import CxrError
from ..evaluation.evaluate import pneumonia_probability
from ..files import _umask, save_torch, write_csv, write_json
from ..training.checkpoint import load_checkpoint, model_from_checkpoint
from ..trust.fit import MIN_VALIDATION, Trust, fit_trust
from ..trust.shift import MIN_IMAGES
from .finetune import kept_epoch
from .methods import (
    Context,
    Plan,
    adapt_model,
    first_site_operating_point,
    site_operating_point,
    site_samples,
    source_operating_point,
)

# --- cxr adapt RUN --data SITE --out NEW ---------------------------------------------------------

def source_run(run_dir: Path) -> tuple[Path, dict]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not (run_dir / "best.pt").is_file():
        raise CxrError(f"{run_dir}: not a cxr run folder (no best.pt); pass a task folder such as OUT/scratch")
    checkpoint = load_checkpoint(run_dir / "best.pt")
    if tuple(checkpoint["classes"]) != CLASSES:
        raise CxrError(f"{run_dir}: a {'/'.join(checkpoint['classes'])} model (--labels "
                       f"{checkpoint['config'].get('labels')}); cxr adapt fits pneumonia-vs-normal models to a site "
                       "(its operating point, k-fold evaluation and site folders are NORMAL/PNEUMONIA): adapt a run "
                       "trained with --labels pneumonia")
    return run_dir, checkpoint


def check_out(out: Path, source: Path, overwrite: bool) -> None:
    out, here, src = Path(out), Path(out).resolve(), Path(source).resolve()
    if here == src or src in here.parents or here in src.parents:
        what = "is" if here == src else "is inside" if src in here.parents else "contains"
        raise CxrError(f"{out}: {what} the source run {source}; adaptation writes a folder of its own "
                       "(replacing it with --overwrite): pass an --out outside the source run")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CxrError(f"{out}: exists and is not empty; pass another --out, or --overwrite to replace it")


def publish(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out` (replacing it), so a failure leaves no half folder."""
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; results should read like any other
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def source_data(source: Path) -> str | None:
    """The data folder the source run was trained on (its config.json), or None."""
    from ..files import read_run_config

    return read_run_config(source).get("data") if (Path(source) / "config.json").is_file() else None


def replay_images(source: Path, data: str | None, config, workers: int, cache_dir: Path | None,
                  log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor]:
    """The source run's own training images (its train split, as it was split: same folder `data`,
    seed and validation ratio), decoded at its image size, for replay."""
    if not data or not Path(data).exists():
        raise CxrError(f"{source / 'config.json'}: the source run's data ({data}) is not here; replay needs the "
                       "images it was trained on: restore that folder, or drop --replay")
    train = prepare_splits(Path(data), config.val_ratio, config.seed, config.limit, config.classes).train
    log(f"replay: {len(train)} training images of the source run ({data})")
    images = load_images([s.path for s in train], config.image_size, workers, desc="decode replay", cache_dir=cache_dir)
    return images, labels_of(train)


def source_training_images(source: Path, data: str | None, specs: list[FinetuneSpec], config, workers: int,
                           cache_dir: Path | None, log: Callable[[str], None] = print):
    """The source run's training images when a fine-tune needs them: to replay (a spec with replay),
    or, where its data is here, for batch norm re-estimated on both sites after weights are mixed
    (WiSE-FT, a soup), with or without replay; None otherwise."""
    mixing = any(s.wise or s.soup > 1 for s in specs) and data and Path(data).exists()
    if any(s.replay for s in specs) or mixing:
        return replay_images(source, data, config, workers, cache_dir, log)
    return None


def source_validation(data: str | None, config, workers: int, cache_dir: Path | None,
                      log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The source run's validation split (as it was split: same folder, seed and ratio), decoded at
    its image size: the first site's voice in every choice a fine-tuning makes. None (with a note)
    where the source's data is not here."""
    if not data or not Path(data).exists():
        log(f"note: the source run's data ({data}) is not here: choices read the site's validation patients alone")
        return None
    val = prepare_splits(Path(data), config.val_ratio, config.seed, config.limit, config.classes).val
    log(f"source validation: {len(val)} images of the source run's validation split ({data}) join every choice")
    return load_images([s.path for s in val], config.image_size, workers, desc="decode source val",
                       cache_dir=cache_dir), labels_of(val)


def estimate_settings(target_sensitivity: float | None, tent_steps: int, patients: Path | None, seed: int) -> dict:
    """The settings beyond the fine-tuning spec that change what a k-fold estimate measures; a
    model fitted with --estimate-from must match them (adapt.kfold_estimate checks)."""
    import hashlib

    table = (hashlib.sha256(Path(patients).read_bytes()).hexdigest()[:16]
             if patients is not None and Path(patients).is_file() else None)
    return {"target_sensitivity": target_sensitivity, "tent_steps": tent_steps, "patients_sha256": table,
            "seed": seed}


def _specs(measured: list[dict]) -> list[dict]:
    """The fine-tuning settings an evaluation measured, with the defaults of fields added since it was
    written (an older evaluation is still the estimate of the same settings)."""
    out = []
    for d in measured:
        try:
            out.append(FinetuneSpec(**d).to_dict())
        except (TypeError, ValueError):
            out.append(d)
    return out


def kfold_estimate(eval_dir: Path, source: Path, site: Path, variant: str, spec: FinetuneSpec | None = None,
                   settings: dict | None = None) -> dict:
    """The k-fold estimate of `variant` (all images per class) from `cxr adapt --evaluate`'s folder,
    checked to be of the same source run and site, fine-tuning spec and `settings` (kfold.
    estimate_settings: target sensitivity, TENT steps, patient table, seed): what the model card
    shows beside the model fitted on all of the site's images."""
    path = Path(eval_dir) / "adapt_evaluation.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        raise CxrError(f"{path}: missing or unreadable; pass the --out folder of cxr adapt --evaluate K") from None
    if result.get("source_run") != str(Path(source).resolve()) or result.get("site") != str(Path(site).resolve()):
        raise CxrError(f"{path}: measured {result.get('source_run')} on {result.get('site')}, not this run on this site; "
                       "pass the evaluation of the same source run and site")
    if spec is not None and spec.to_dict() not in _specs(result.get("finetune", [])):
        raise CxrError(f"{path}: measured fine-tuning with other settings ({result.get('finetune')}) than these "
                       f"({spec.to_dict()}); pass the evaluation of the same --train, --replay, --epochs, --lr")
    if settings is not None:
        theirs = result.get("settings")
        if theirs is None:
            raise CxrError(f"{path}: records no target sensitivity, TENT steps, patient table or seed (made by an "
                           "older cxr): run cxr adapt --evaluate again with these settings")
        differ = [f"{key} {theirs.get(key)!r} there, {value!r} here" for key, value in settings.items()
                  if theirs.get(key) != value]
        if differ:
            raise CxrError(f"{path}: measured with other settings ({'; '.join(differ)}); pass the evaluation made "
                           "with the same --target-sensitivity, --tent-steps, --patients and --seed")
    row = next((r for r in result["rows"] if r["variant"] == variant and r["per_class"] is None), None)
    if row is None:
        found = sorted({r["variant"] for r in result["rows"] if r["per_class"] is None})
        raise CxrError(f"{path}: holds no '{variant}' row on all images (found: {', '.join(found)}); evaluate this "
                       "variant (the same --train, --replay, --epochs, --lr) with --sizes including all")
    return {"from": str(path.resolve()), "folds": result["folds"], "variant": variant,
            **{k: row[k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc")},
            "resampled": row.get("resampled", "patients")}


def adapt_run(run_dir: Path, site: Path, out: Path, unlabeled: bool = False, adabn_too: bool = False,
              use_tent: bool = False, tent_steps: int = 10, target_sensitivity: float | None = None,
              device: torch.device | str = "cpu", workers: int = 2, cache_dir: Path | None = None,
              overwrite: bool = False, seed: int = 0, log: Callable[[str], None] = print,
              finetune: FinetuneSpec | None = None, externals: dict[str, Path] | None = None,
              precision: str = "fp32", estimate_from: Path | None = None, site_threshold: bool = False,
              patients: Path | None = None, trackers: tuple[str, ...] = (), log_dir: Path | None = None,
              site_name: str | None = None) -> dict:
    """Adapt RUN_DIR/best.pt to the site's images; write the new run folder OUT. Returns the
    provenance written to OUT/adaptation.json. With `finetune`, the model is trained on the site's
    labelled images (finetune.py) and the new run is evaluated on the source run's test split and
    on each of `externals` as well, so what it kept of the first site shows beside what it learnt."""
    source, checkpoint = source_run(run_dir)
    out = Path(out)
    check_out(out, source, overwrite)
    if finetune is not None and unlabeled:
        raise CxrError("--finetune learns from labels: pass a labelled site sample (NORMAL/ and PNEUMONIA/) "
                       "without --unlabeled")
    if finetune is not None and (site_name or Path(site).name) == "source":  # the operating points' other key
        raise CxrError(f"{site}: a site named 'source' would take the name of the source run's operating point; "
                       "pass --site-name NAME")
    samples = site_samples(site, unlabeled, patients)
    for folder in (externals or {}).values():  # every input checked before any work: a bad set ends it now
        get_external_samples(folder)
    config = model_from_checkpoint(checkpoint)[1]
    bn = "finetune" if finetune else "tent" if use_tent else "adabn" if (unlabeled or adabn_too) else "keep"
    # Fine-tuning keeps the source's operating point unless told (`site_threshold`): measured on
    # nih_half by k folds, a threshold chosen on the few site validation patients did worse (README).
    plan = Plan(operating_point=not unlabeled and (finetune is None or site_threshold), bn=bn, tent_steps=tent_steps,
                target_sensitivity=target_sensitivity, finetune=finetune)
    estimate = kfold_estimate(estimate_from, source, site, plan.name, finetune,
                              estimate_settings(target_sensitivity, tent_steps, patients, seed)) if estimate_from else None
    if unlabeled:
        log(f"site: {site}: {len(samples)} images without labels")
    else:
        log(f"site: {site}\n{describe({'site': samples})}")
    trained_on = source_data(source) if finetune is not None else None
    images = load_images([s.path for s in samples], config.image_size, workers, desc="decode site", cache_dir=cache_dir)
    y = None if unlabeled else labels_of(samples).numpy()
    source_train = source_training_images(source, trained_on, [finetune] if finetune else [], config, workers,
                                          cache_dir, log)
    replay = source_train if finetune and finetune.replay else None
    source_val = source_validation(trained_on, config, workers, cache_dir, log) if finetune is not None else None
    context = Context(replay=source_train, source_val=source_val, precision=precision, log=log)
    source_check = None
    if unlabeled and Trust.from_checkpoint(checkpoint) is not None and len(images) >= MIN_IMAGES:
        from ..evaluation.check import check_images, format_check

        source_check = check_images(checkpoint, images, None, device, seed)  # before adapting: should one?
        log("the source model on the site's images, before adapting:\n" + format_check(source_check))
    fitted, op, logits = adapt_model(checkpoint, plan, images, y, device, seed, [s.patient for s in samples], context)

    if finetune is not None:  # the first site's point for the changed model: the source's rule, again
        first = (first_site_operating_point(fitted.model, checkpoint, source_val, device) if source_val is not None
                 else source_operating_point(checkpoint))
        first_on = (f"the source run's rule ({first['rule']}) applied again to the fine-tuned model, on the source "
                    f"run's validation split ({len(source_val[1])} images)" if source_val is not None else
                    "the source run (kept: the source run's data is not here to choose it again)")
    counts = ({"images": len(samples)} if unlabeled else
              {c: int((y == i).sum()) for i, c in enumerate(CLASSES)})
    chosen_on = "site" if fitted.holdout is None else "site validation patients"
    provenance = {
        "source_run": str(source.resolve()), "source_checkpoint": str((source / "best.pt").resolve()),
        "site": str(Path(site).resolve()), "labeled": not unlabeled, "counts": counts,
        "patients": len({s.patient for s in samples}),
        "adapted": plan.name, "batch_norm": plan.describe,
        "operating_point": ({**op, "chosen_on": chosen_on} if plan.operating_point else
                            {**op, "chosen_on": first_on} if finetune is not None else
                            {**op, "chosen_on": "the source run (kept)"}),
        "source_operating_point": source_operating_point(checkpoint),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seed": seed,
        # by content, so that a copy of the site's images under another folder or name is still
        # recognised as the adaptation's own images when the run is evaluated on it
        "site_digests": sorted({file_digest(s.path) for s in samples}),
    }
    if finetune is not None:
        val = set(fitted.holdout.tolist())
        provenance["finetune"] = {
            **finetune.to_dict(), "history": fitted.history,
            "site_train": {"images": len(samples) - len(val),
                           "patients": len({s.patient for i, s in enumerate(samples) if i not in val})},
            "site_validation": {"images": len(val), "patients": len({samples[i].patient for i in val})},
            "replay_images": 0 if replay is None else len(replay[1]),
            "replay_source": trained_on if replay is not None else None,
            "kept_epoch": kept_epoch(fitted.history),
            "chosen_on": "the worst of the site's validation patients and the source run's validation split "
                         f"({len(source_val[1])} images)" if source_val is not None else
                         "the site's validation patients (the source run's data is not here)",
            **({"soup_fitted": fitted.soup} if fitted.soup else {}), **({"wise": fitted.wise} if fitted.wise else {})}
    if estimate is not None:
        provenance["kfold_estimate"] = estimate
    if source_check is not None:
        provenance["source_check"] = {k: source_check[k] for k in ("shift", "estimate", "verdict")}
    new = dict(checkpoint)
    new.update(model=fitted.model.state_dict(), threshold=op["threshold"], temperature=op["temperature"],
               adaptation=provenance, optimizer=None)
    new.pop("trust", None)
    trust, provenance["trust"] = refit_trust(checkpoint, fitted.model, config, bn, images, y, fitted.holdout, replay,
                                             source_val, device, seed)
    if trust is not None:
        new["trust"] = trust.to_dict()
    log(f"out-of-distribution statistics: {provenance['trust']}")
    if finetune is not None:  # one operating point per site, each chosen on that site's validation images only
        held = fitted.holdout
        site_op = site_operating_point(logits[held], y[held], target_sensitivity)
        new["operating_points"] = {
            site_name or Path(site).name: {**site_op, "chosen_on": f"{len(held)} site validation images"},
            "source": {**first, "chosen_on": first_on}}
        provenance["operating_points"] = new["operating_points"]
    if plan.operating_point:
        new["operating_point"] = {**op, "chosen_on": chosen_on, "site": provenance["site"], "n_site": len(samples)}
    elif finetune is not None:  # the model changed: say where its operating point comes from
        new["operating_point"] = {**op, "chosen_on": first_on}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_torch(tmp / "best.pt", new)
        cfg = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {
            "config": checkpoint["config"]}
        write_json(tmp / "config.json", {**cfg, "adapted_from": provenance["source_run"], "adaptation": plan.name})
        if (source / "history.csv").is_file():
            shutil.copy2(source / "history.csv", tmp / "history.csv")
        write_json(tmp / "adaptation.json", provenance)
        if finetune is not None:  # the fine-tune's own epochs (history.csv above is the source's)
            cols = list(dict.fromkeys(k for row in fitted.history for k in row))
            write_csv(tmp / "finetune_history.csv", cols, ([row.get(k, "") for k in cols] for row in fitted.history))
        if not unlabeled:
            prob = pneumonia_probability(logits, op["temperature"])
            role = np.full(len(samples), "fit" if fitted.holdout is not None else "site", dtype=object)
            if fitted.holdout is not None:
                role[fitted.holdout] = "validation"
            write_csv(tmp / "site_predictions.csv", ["path", "true_label", "prob_pneumonia", "role"],
                      ([str(s.path), CLASSES[t], f"{q:.9g}", r] for s, t, q, r in zip(samples, y, prob, role)))
        if estimate_from is not None:  # the k-fold table and curve travel with the model they describe
            for name in ("adapt_evaluation.json", "adapt_evaluation.md", "figures/adapt_curve.png"):
                if (Path(estimate_from) / name).is_file():
                    (tmp / name).parent.mkdir(exist_ok=True)
                    shutil.copy2(Path(estimate_from) / name, tmp / name)
        if finetune is not None:
            _evaluate_both_sites(tmp, trained_on, externals or {}, device, workers, cache_dir, log)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if trackers and finetune is not None:
        _track(out, trackers, log_dir, {**checkpoint["config"], "adaptation": plan.name, **finetune.to_dict()},
               fitted.history, [s.path for s in samples], log)
    return provenance


def refit_trust(checkpoint: dict, model, config, bn: str, images: torch.Tensor, y: np.ndarray | None,
                holdout, replay, source_val, device, seed: int) -> tuple[Trust | None, str]:
    """The adapted model's out-of-distribution statistics and a sentence saying where they come from.
    Unchanged weights keep the source's; a fine-tune is fitted again on what it now serves (the
    site's fitting images and the replayed source images; its validation: the site's validation
    patients and the source's validation split); batch norm changed without labels (AdaBN, TENT)
    leaves none, since no labelled validation images can set the threshold and estimates."""
    if bn == "keep":
        kept = Trust.from_checkpoint(checkpoint)
        return kept, ("the source run's (the features did not change)" if kept else "none (the source run has none)")
    if bn != "finetune" or y is None or holdout is None:
        return None, ("none: the batch-norm statistics changed without labelled validation images to fit them on; "
                      "predictions say the score is unavailable")
    held = torch.as_tensor(holdout, dtype=torch.long)
    fit = torch.ones(len(images), dtype=torch.bool)
    fit[held] = False
    labels = torch.as_tensor(y, dtype=torch.long)
    train_x, train_y = [images[fit], *([replay[0]] if replay else [])], [labels[fit], *([replay[1]] if replay else [])]
    val_x = [images[held], *([source_val[0]] if source_val else [])]
    val_y = [labels[held], *([source_val[1]] if source_val else [])]
    if sum(len(v) for v in val_y) < MIN_VALIDATION:
        return None, f"none: fewer than {MIN_VALIDATION} validation images to set the score's threshold on"
    trust = fit_trust(model, config.intensity, torch.cat(train_x), torch.cat(train_y), torch.cat(val_x),
                      torch.cat(val_y), device, seed=seed)
    return trust, (f"fitted again on the fine-tuned model: {trust.n_fit} images (the site's fitting images"
                   + (" and the replayed source images" if replay is not None else "") + "), threshold on "
                   f"{len(trust.reference.labels)} validation images (the site's"
                   + (" and the source run's" if source_val is not None else "") + ")")


def _track(out: Path, kinds: tuple[str, ...], log_dir: Path | None, config: dict, history: list[dict],
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


def _evaluate_both_sites(run_dir: Path, data: str | None, externals: dict[str, Path],
                         device, workers: int, cache_dir: Path | None, log: Callable[[str], None]) -> None:
    """The fine-tuned run on the source run's test split (what it kept) and on each external set."""
    from ..evaluation.evaluate import evaluate_run

    quiet = lambda _: None  # noqa: E731
    if data and Path(data).exists():
        m = evaluate_run(run_dir, Path(data), device, workers, cache_dir, log=quiet)
        log(f"source test split ({data}): accuracy {m['accuracy']:.3f}, ROC AUC {m['roc_auc']:.3f}")
    else:
        log(f"note: the source run's data ({data}) is not here: its test split is not evaluated")
    for name, folder in externals.items():
        m = evaluate_run(run_dir, Path(folder), device, workers, cache_dir, log=quiet, name=name)
        log(f"{name}: accuracy {m['accuracy']:.3f}, ROC AUC {m['roc_auc']:.3f}")
