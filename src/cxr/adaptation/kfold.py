"""`cxr adapt --evaluate K`: how well each adaptation method does at a site, measured honestly.

The site sample is split by patient into K folds; each fold is predicted by a model adapted on (a
draw of N images per class from) the other K-1 folds, so no image is predicted by a model that
saw it; metrics pool the held-out predictions of every fold and repeat, with 95% intervals that
resample patients. The methods themselves are in `adapt.py`; this module only folds, draws,
pools and tabulates.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from ..config import CLASSES, FinetuneSpec
from ..data.dataset import Sample, describe, labels_of, without_patient_id
from ..data.loading import get_test_samples, load_images
from ..errors import CxrError, DataError
from ..evaluation.compare import ADAPT_PREDICTIONS as PREDICTIONS
from ..evaluation.evaluate import pneumonia_probability, predict_logits
from ..evaluation.metrics import bootstrap_metrics, paired_difference
from ..files import write_csv, write_json, write_text
from ..training.checkpoint import model_from_checkpoint
from .adapt import (
    check_out,
    estimate_settings,
    publish,
    source_data,
    source_run,
    source_training_images,
    source_validation,
)
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

N_BOOTSTRAP = 1000
# The recipe cxr picks, estimated without bias: in each outer fold the variant with the highest ROC AUC on
# the training part's own validation patients is chosen, and only its predictions of the held fold count.
NESTED = ("nested choice", "nested choice+threshold")
PREDICTION_COLUMNS = ["per_class", "variant", "draw", "path", "patient", "true_label", "prob_pneumonia", "threshold"]


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


def _source_sets(data: str | None, config, externals: dict[str, Path], workers: int, cache_dir: Path | None,
                 log: Callable[[str], None], checkpoint: dict) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
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


def _variants(use_tent: bool, finetunes: list[FinetuneSpec]) -> list[tuple[str, FinetuneSpec | None]]:
    """(METHODS name, fine-tuning spec) of every model variant, each measured with the source's
    operating point and with one chosen at the site."""
    return ([("keep", None), ("adabn", None)] + ([("tent", None)] if use_tent else [])
            + [("finetune", spec) for spec in finetunes])


def evaluate_adaptation(run_dir: Path, site: Path, out: Path, k: int = 5, sizes: list[int | None] = (None,),
                        repeats: int = 1, use_tent: bool = False, tent_steps: int = 10,
                        target_sensitivity: float | None = None, device: torch.device | str = "cpu",
                        workers: int = 2, cache_dir: Path | None = None, overwrite: bool = False, seed: int = 0,
                        log: Callable[[str], None] = print, finetunes: list[FinetuneSpec] = (),
                        externals: dict[str, Path] | None = None, precision: str = "fp32",
                        patients: Path | None = None) -> dict:
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
    source, checkpoint = source_run(run_dir)
    out = Path(out)
    check_out(out, source, overwrite)
    settings = estimate_settings(target_sensitivity, tent_steps, patients, seed)  # what --estimate-from checks
    samples = site_samples(site, unlabeled=False, patients=patients)
    config = model_from_checkpoint(checkpoint)[1]
    log(f"site: {site}\n{describe({'site': samples})}")
    unnamed = without_patient_id(samples)
    warning = (f"{unnamed} of {len(samples)} site images carry no patient id in their file name: each counts as its "
               "own patient, so folds and intervals are by image there (optimistic if a person has several)"
               if unnamed else None)
    if warning:
        log(f"warning: {warning}")
    fold = patient_folds(samples, k, seed)
    for size in sizes:
        if size is not None and size < MIN_PER_CLASS:
            raise CxrError(f"--sizes {size}: choosing a threshold needs at least {MIN_PER_CLASS} images per class")
    images = load_images([s.path for s in samples], config.image_size, workers, desc="decode site", cache_dir=cache_dir)
    y = labels_of(samples).numpy()
    groups = [s.patient for s in samples]
    trained_on = source_data(source)
    replay = source_training_images(source, trained_on, list(finetunes), config, workers, cache_dir, log)
    source_val = source_validation(trained_on, config, workers, cache_dir, log) if finetunes else None
    context = Context(replay=replay, source_val=source_val, precision=precision)
    sets = _source_sets(trained_on, config, externals or {}, workers, cache_dir, log, checkpoint) if finetunes else {}
    source_model, _ = model_from_checkpoint(checkpoint)
    source_logits = predict_logits(source_model, images, 64, device, config.intensity)
    set_logits_source = {n: predict_logits(source_model, x, 64, device, config.intensity) for n, (x, _) in sets.items()}
    source_op = source_operating_point(checkpoint)
    variants = _variants(use_tent, list(finetunes))
    plans = [Plan(op, bn, tent_steps, target_sensitivity, spec) for bn, spec in variants for op in (False, True)]

    inner_ratio = finetunes[0].val_ratio if finetunes else FinetuneSpec().val_ratio
    rows, predictions = [], []  # predictions: every held-out image of every variant (cxr compare reads them)
    for size in sizes:
        # every held-out image's prob, threshold, label, patient, and (draw, its index in the site sample)
        pooled = {p.name: ([], [], [], [], []) for p in plans}
        pooled.update({name: ([], [], [], [], []) for name in NESTED})
        nested_choices = []  # per fold and draw: the variant the training part chose
        kept = {p.name: defaultdict(list) for p in plans}   # per fitted model: accuracy, AUC on each source set
        kept.update({name: defaultdict(list) for name in NESTED})
        used = defaultdict(list)
        for r in range(repeats if size is not None else 1):  # all images of the other folds: nothing to redraw
            rng = np.random.default_rng([seed, r, size or 0])
            for f in range(k):
                held = np.flatnonzero(fold == f)
                pool = _subsample(np.flatnonzero(fold != f), y, size, rng)
                used["NORMAL"].append(int((y[pool] == 0).sum()))
                used["PNEUMONIA"].append(int((y[pool] == 1).sum()))
                # nested selection: the variant cxr picks is chosen inside this training part, on its own
                # validation patients (those the fine-tunes hold out), never on the held fold
                _, inner = site_validation_split(y[pool], [groups[i] for i in pool], inner_ratio, seed + r)
                inner = pool[inner]
                fold_context = replace(context, trained={})  # a WiSE variant mixes this fold's fine-tune of its spec
                candidates = []
                for bn, spec in variants:  # one fitted model per fold and variant, with and without a site threshold
                    if bn == "keep":
                        chosen, model = pool, source_model
                        chosen_logits, held_logits = source_logits[chosen], source_logits[held]
                        set_logits = set_logits_source
                    else:
                        fitted = fit_model(checkpoint, Plan(False, bn, tent_steps, None, spec), images[pool], y[pool],
                                           [groups[i] for i in pool], device, seed + r, fold_context)
                        model = fitted.model
                        chosen = pool if fitted.holdout is None else pool[fitted.holdout]
                        chosen_logits = predict_logits(model, images[chosen], 64, device, config.intensity)
                        held_logits = predict_logits(model, images[held], 64, device, config.intensity)
                        set_logits = {n: predict_logits(model, x, 64, device, config.intensity)
                                      for n, (x, _) in sets.items()}
                    op = site_operating_point(chosen_logits, y[chosen], target_sensitivity)
                    # without a site threshold, a fine-tuned model decides by the source run's rule chosen
                    # again on the source's validation split (as the fitted model does: adapt.py)
                    keep = (first_site_operating_point(model, checkpoint, source_val, device)
                            if bn == "finetune" and source_val is not None else source_op)
                    inner_logits = predict_logits(model, images[inner], 64, device, config.intensity)
                    score = _auc(y[inner], pneumonia_probability(inner_logits, 1.0))
                    candidates.append((score, Plan(False, bn, tent_steps, target_sensitivity, spec),
                                       [(pneumonia_probability(held_logits, keep["temperature"]), keep["threshold"]),
                                        (pneumonia_probability(held_logits, op["temperature"]), op["threshold"])]))
                    for plan, (temperature, t) in (
                            (Plan(False, bn, tent_steps, target_sensitivity, spec),
                             (keep["temperature"], keep["threshold"])),
                            (Plan(True, bn, tent_steps, target_sensitivity, spec), (op["temperature"], op["threshold"]))):
                        bucket = pooled[plan.name]
                        bucket[0].append(pneumonia_probability(held_logits, temperature))
                        bucket[1].append(np.full(len(held), t))
                        bucket[2].append(y[held])
                        bucket[3].extend(groups[i] for i in held)
                        bucket[4].extend((r, i) for i in held)
                        for n, (_, set_y) in sets.items():
                            prob = pneumonia_probability(set_logits[n], temperature)
                            kept[plan.name][f"{n}_accuracy"].append(float(((prob >= t) == set_y).mean()))
                            kept[plan.name][f"{n}_roc_auc"].append(float(roc_auc_score(set_y, prob)))
                best = max(candidates, key=lambda c: -np.inf if np.isnan(c[0]) else c[0])  # the first of equals
                nested_choices.append({"per_class": size, "fold": f, "draw": r, "chosen": best[1].method,
                                       "inner_auc": best[0], "inner_images": int(len(inner))})
                chosen_plans = (best[1], Plan(True, best[1].bn, tent_steps, target_sensitivity, best[1].finetune))
                for name, (prob, t), plan in zip(NESTED, best[2], chosen_plans):
                    for key, values in kept[plan.name].items():  # the chosen model's numbers on the first site
                        kept[name][key].append(values[-1])
                    bucket = pooled[name]
                    bucket[0].append(prob)
                    bucket[1].append(np.full(len(held), t))
                    bucket[2].append(y[held])
                    bucket[3].extend(groups[i] for i in held)
                    bucket[4].extend((r, i) for i in held)
            log(f"{'all' if size is None else size} per class, draw {r + 1}: {k} folds done")
        base = pooled[plans[0].name]  # the source as trained, on the very same images in the same order
        for name in [p.name for p in plans] + list(NESTED):
            prob, thr, labels, patients = (np.concatenate(pooled[name][i]) if i < 3 else pooled[name][i]
                                           for i in range(4))
            predictions.extend(("all" if size is None else size, name, r, samples[i].path, groups[i], CLASSES[y[i]],
                                f"{pr:.6f}", f"{t:.6f}") for (r, i), pr, t in zip(pooled[name][4], prob, thr))
            m = bootstrap_metrics(labels, prob, {"site": thr}, N_BOOTSTRAP, seed, groups=patients)["site"]
            d = paired_difference(labels, prob, thr, np.concatenate(base[0]), np.concatenate(base[1]), N_BOOTSTRAP,
                                  seed, groups=patients)
            rows.append({"per_class": size, "variant": name,
                         **({"nested": [c for c in nested_choices if c["per_class"] == size]} if name in NESTED else {}),
                         "adaptation_images": {c: [min(v), max(v)] for c, v in used.items()},
                         "thresholds": [float(thr.min()), float(thr.max())],
                         **{key: m[key] for key in ("accuracy", "sensitivity", "specificity", "roc_auc")},
                         "resampled": m["resampled"], "vs_source": d,
                         "source_sets": {key: {"mean": float(np.mean(v)), "min": float(np.min(v)),
                                               "max": float(np.max(v)), "models": len(v)}
                                         for key, v in kept[name].items()}})
    result = {"source_run": str(source.resolve()), "site": str(Path(site).resolve()), "folds": k,
              "repeats": repeats, "seed": seed, "images": {c: int((y == i).sum()) for i, c in enumerate(CLASSES)},
              "patients": len(set(groups)), "rows": rows, "source_sets": {n: len(v[1]) for n, v in sets.items()},
              "finetune": [spec.to_dict() for spec in finetunes], "warning": warning,
              "settings": settings,
              "how": "each image predicted by a model adapted on other patients only (K folds by patient); a method "
                     "with a validation split takes it by patient from the other folds; metrics pool the held-out "
                     "predictions of every fold and repeat; intervals resample patients (all their images together) within their class; "
                     "vs_source: the same images, paired bootstrap of patients; source_sets: every fitted model "
                     "on the first site's images (mean, min, max over the models)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write_json(tmp / "adapt_evaluation.json", result)
        write_text(tmp / "adapt_evaluation.md", evaluation_table(result) + "\n")
        write_csv(tmp / PREDICTIONS, PREDICTION_COLUMNS, predictions)
        if len(sizes) > 1:
            from ..reporting.plots import plot_adapt_curve

            plot_adapt_curve(result, tmp / "figures" / "adapt_curve.png")
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _cell(block: dict) -> str:
    if block["value"] is None:
        return "n/a"
    ci = block.get("ci")
    return f"{100 * block['value']:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _diff(block: dict | None) -> str:
    if not block or block.get("ci") is None:
        return ""
    ci = block["ci"]
    return f"{100 * block['value']:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def evaluation_table(result: dict) -> str:
    sets = list(result.get("source_sets", {}))
    lines = ["| images per class | variant | accuracy | sensitivity | specificity | ROC AUC | threshold range | "
             "accuracy vs source (paired) | " + "".join(f"{n}: accuracy / AUC | " for n in sets),
             "|---|---|---|---|---|---|---|---|" + "---|" * len(sets)]
    for r in result["rows"]:
        n = r["adaptation_images"]
        size = ("all" if r["per_class"] is None else str(r["per_class"])) + \
            f" ({'-'.join(map(str, sorted(set(n['NORMAL']))))}/{'-'.join(map(str, sorted(set(n['PNEUMONIA']))))})"
        auc = r["roc_auc"]
        lines.append(f"| {size} | {r['variant']} | {_cell(r['accuracy'])} | {_cell(r['sensitivity'])} | "
                     f"{_cell(r['specificity'])} | {auc['value']:.3f}"
                     + (f" [{auc['ci'][0]:.3f}, {auc['ci'][1]:.3f}]" if auc.get("ci") else "")
                     + f" | {r['thresholds'][0]:.3f}-{r['thresholds'][1]:.3f} | "
                     + _diff(r.get("vs_source", {}).get("accuracy")) + " |"
                     + "".join(_kept(r, n) for n in sets))
    return "\n".join(lines) + _legend(result)


def _kept(row: dict, name: str) -> str:
    acc, auc = row["source_sets"].get(f"{name}_accuracy"), row["source_sets"].get(f"{name}_roc_auc")
    return f" {100 * acc['mean']:.1f} / {auc['mean']:.3f} |" if acc and auc else " |"


def _legend(result: dict) -> str:
    unit = {r.get("resampled", "patients") for r in result["rows"]}
    return ("\n\nAccuracy etc. in %, pooled over the held-out folds, 95% intervals resampling "
            + " and ".join(sorted(unit)) + "; accuracy vs source: this variant minus the source model on the "
            "same images (paired bootstrap); first-site columns: mean over the fitted models."
            + _nested_legend(result)
            + (f" Warning: {result['warning']}." if result.get("warning") else ""))


def _nested_legend(result: dict) -> str:
    """What the nested rows are, and which variant each training part chose."""
    chosen = [c["chosen"] for r in result["rows"] if r["variant"] == NESTED[0] for c in r.get("nested", [])]
    if not chosen:
        return ""
    counts = ", ".join(f"{name} {chosen.count(name)}x" for name in dict.fromkeys(chosen))
    return (f" Nested choice: in each outer fold, the variant with the highest ROC AUC on the training part's own "
            f"validation patients (never the held fold), so its row estimates what picking a setting this way does, "
            f"without the optimism of reading the best of the other rows (chosen: {counts}).")
