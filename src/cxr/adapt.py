"""`cxr adapt`: a trained run fitted to a new site's images, written as a new run folder.

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

The source run is never changed. The new folder holds best.pt (the adapted checkpoint, with what
was adapted and on which images under "adaptation"), config.json and history.csv of the source,
adaptation.json and, for a labelled sample, site_predictions.csv.

`evaluate_adaptation` measures the adaptation itself: the site sample split by patient into K
folds, each fold predicted by a model adapted on (a sample of) the other K-1, before and after.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .checkpoint import load_checkpoint, model_from_checkpoint
from .config import CLASSES
from .data import load_images
from .dataset import EXTENSIONS, Sample, describe, labels_of, patient_id
from .folders import get_external_samples
from .errors import CxrError, DataError
from .evaluate import pneumonia_probability, predict_logits
from .files import _umask, save_torch, write_csv, write_json, write_text
from .metrics import bootstrap_metrics, fit_temperature, sensitivity_threshold, youden_threshold
from .preprocess import normalize, place

MIN_PER_CLASS = 10   # fewest site images of each class to choose a threshold on
MIN_UNLABELED = 16   # fewest site images to re-estimate batch-norm statistics on
N_BOOTSTRAP = 1000


# --- the site's images -------------------------------------------------------------------------

def site_samples(folder: Path, unlabeled: bool) -> list[Sample]:
    """A labelled site sample (NORMAL/ and PNEUMONIA/, or test/ with them) or, `unlabeled`, every
    JPEG/PNG under `folder` (label -1). One-line DataError naming the folder and the fix."""
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
        return [Sample(p, -1, patient_id(p.name)) for p in paths]
    if not has_classes:
        raise DataError(f"{folder}: no NORMAL/ and PNEUMONIA/ folders; sort the site's images into them to choose "
                        "a threshold, or pass --unlabeled to adapt the batch-norm statistics only")
    samples = get_external_samples(folder)
    counts = {c: sum(s.label == i for s in samples) for i, c in enumerate(CLASSES)}
    short = [f"{n} {c}" for c, n in counts.items() if n < MIN_PER_CLASS]
    if short:
        raise DataError(f"{folder}: {' and '.join(short)} images; choosing a threshold needs at least "
                        f"{MIN_PER_CLASS} of each class: add labelled images, or pass --unlabeled")
    return samples


# --- what adapts ---------------------------------------------------------------------------------

def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adabn(model: nn.Module, images: torch.Tensor, intensity: str, device: torch.device | str,
          batch_size: int = 64) -> nn.Module:
    """AdaBN: every batch-norm layer's running mean and variance re-estimated on `images` (the
    average over near-equal batches, in a fixed order); nothing else changes. Returns the model in
    eval mode."""
    place(model, device)
    layers = batch_norms(model)
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    for chunk in torch.tensor_split(images, max(1, -(-len(images) // batch_size))):
        model(normalize(chunk, device, intensity))
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    return model.eval()


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


def site_operating_point(logits: np.ndarray, y: np.ndarray, target_sensitivity: float | None) -> dict:
    """Temperature (NLL) and threshold (Youden's J, or the highest reaching the target
    sensitivity) chosen on the site's labelled predictions."""
    temperature = fit_temperature(logits, y)
    prob = pneumonia_probability(logits, temperature)
    if target_sensitivity is None:
        rule, threshold = "youden", youden_threshold(y, prob)
    else:
        rule, threshold = f"sensitivity>={target_sensitivity}", sensitivity_threshold(y, prob, target_sensitivity)
    return {"rule": rule, "threshold": float(threshold), "temperature": float(temperature)}


@dataclass(frozen=True)
class Plan:
    """What to adapt: the operating point (needs labels), the batch-norm statistics, TENT."""

    operating_point: bool
    bn: str = "keep"            # "keep" | "adabn" | "tent"
    tent_steps: int = 10
    target_sensitivity: float | None = None

    @property
    def name(self) -> str:
        parts = [] if self.bn == "keep" else [self.bn]
        return "+".join(parts + (["threshold"] if self.operating_point else [])) or "source"


def adapt_model(checkpoint: dict, plan: Plan, images: torch.Tensor, y: np.ndarray | None,
                device: torch.device | str, seed: int = 0) -> tuple[nn.Module, dict, np.ndarray]:
    """The checkpoint's model adapted to `images` (labels `y` used only for the operating point):
    (model, operating point {rule, threshold, temperature}, the images' logits after adaptation)."""
    model, config = model_from_checkpoint(checkpoint)
    if plan.bn == "adabn":
        adabn(model, images, config.intensity, device)
    elif plan.bn == "tent":
        tent(model, images, config.intensity, device, steps=plan.tent_steps, seed=seed)
    logits = predict_logits(model, images, 64, device, config.intensity)
    if plan.operating_point:
        op = site_operating_point(logits, y, plan.target_sensitivity)
    else:
        op = {"rule": checkpoint.get("operating_point", {}).get("rule", "stored"),
              "threshold": float(checkpoint.get("threshold", 0.5)),
              "temperature": float(checkpoint.get("temperature", 1.0))}
    return model, op, logits


# --- cxr adapt RUN --data SITE --out NEW ---------------------------------------------------------

def _source(run_dir: Path) -> tuple[Path, dict]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not (run_dir / "best.pt").is_file():
        raise CxrError(f"{run_dir}: not a cxr run folder (no best.pt); pass a task folder such as OUT/scratch")
    return run_dir, load_checkpoint(run_dir / "best.pt")


def _check_out(out: Path, source: Path, overwrite: bool) -> None:
    out = Path(out)
    if out.resolve() == source.resolve():
        raise CxrError(f"{out}: is the source run; adaptation writes a new folder: pass another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CxrError(f"{out}: exists and is not empty; pass another --out, or --overwrite to replace it")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out` (replacing it), so a failure leaves no half folder."""
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; results should read like any other
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def adapt_run(run_dir: Path, site: Path, out: Path, unlabeled: bool = False, adabn_too: bool = False,
              use_tent: bool = False, tent_steps: int = 10, target_sensitivity: float | None = None,
              device: torch.device | str = "cpu", workers: int = 2, cache_dir: Path | None = None,
              overwrite: bool = False, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Adapt RUN_DIR/best.pt to the site's images; write the new run folder OUT. Returns the
    provenance written to OUT/adaptation.json."""
    source, checkpoint = _source(run_dir)
    out = Path(out)
    _check_out(out, source, overwrite)
    samples = site_samples(site, unlabeled)
    config = model_from_checkpoint(checkpoint)[1]
    if unlabeled:
        log(f"site: {site}: {len(samples)} images without labels")
    else:
        log(f"site: {site}\n{describe({'site': samples})}")
    images = load_images([s.path for s in samples], config.image_size, workers, desc="decode site", cache_dir=cache_dir)
    bn = "tent" if use_tent else "adabn" if (unlabeled or adabn_too) else "keep"
    plan = Plan(operating_point=not unlabeled, bn=bn, tent_steps=tent_steps, target_sensitivity=target_sensitivity)
    y = None if unlabeled else labels_of(samples).numpy()
    model, op, logits = adapt_model(checkpoint, plan, images, y, device, seed)

    counts = ({"images": len(samples)} if unlabeled else
              {c: int((y == i).sum()) for i, c in enumerate(CLASSES)})
    provenance = {
        "source_run": str(source.resolve()), "source_checkpoint": str((source / "best.pt").resolve()),
        "site": str(Path(site).resolve()), "labeled": not unlabeled, "counts": counts,
        "patients": len({s.patient for s in samples}),
        "adapted": plan.name, "batch_norm": {"keep": "source statistics", "adabn": "AdaBN: running statistics "
                                             "re-estimated on the site images", "tent": f"TENT: {tent_steps} entropy "
                                             "steps on the batch-norm affine parameters, then AdaBN"}[bn],
        "operating_point": ({**op, "chosen_on": "site"} if plan.operating_point else
                            {**op, "chosen_on": "source validation (kept)"}),
        "source_operating_point": {"threshold": float(checkpoint.get("threshold", 0.5)),
                                   "temperature": float(checkpoint.get("temperature", 1.0)),
                                   "rule": checkpoint.get("operating_point", {}).get("rule", "stored")},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seed": seed,
    }
    new = dict(checkpoint)
    new.update(model=model.state_dict(), threshold=op["threshold"], temperature=op["temperature"],
               adaptation=provenance, optimizer=None)
    if plan.operating_point:
        new["operating_point"] = {**op, "chosen_on": "site", "site": provenance["site"], "n_site": len(samples)}

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
        if plan.operating_point:
            prob = pneumonia_probability(logits, op["temperature"])
            write_csv(tmp / "site_predictions.csv", ["path", "true_label", "prob_pneumonia"],
                      ([str(s.path), CLASSES[t], f"{q:.9g}"] for s, t, q in zip(samples, y, prob)))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return provenance


# --- cxr adapt --evaluate K: the adaptation measured on held-out patients -----------------------

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


def evaluate_adaptation(run_dir: Path, site: Path, out: Path, k: int = 5, sizes: list[int | None] = (None,),
                        repeats: int = 1, use_tent: bool = False, tent_steps: int = 10,
                        target_sensitivity: float | None = None, device: torch.device | str = "cpu",
                        workers: int = 2, cache_dir: Path | None = None, overwrite: bool = False, seed: int = 0,
                        log: Callable[[str], None] = print) -> dict:
    """K-fold (by patient) evaluation of every adaptation variant on a labelled site sample:
    source (as trained), threshold (operating point chosen on the site), adabn, adabn+threshold,
    and with `use_tent` tent and tent+threshold. For each number of adaptation images per class in
    `sizes` (None: all of the other folds, once), each of `repeats` draws that many of each class
    from the other folds. Every image is predicted once per repeat, by a model that never saw it; metrics pool
    the held-out predictions of all folds and repeats, with 95% intervals resampling patients.
    Writes OUT/adapt_evaluation.json and .md; returns the JSON."""
    source, checkpoint = _source(run_dir)
    out = Path(out)
    _check_out(out, source, overwrite)
    samples = site_samples(site, unlabeled=False)
    config = model_from_checkpoint(checkpoint)[1]
    log(f"site: {site}\n{describe({'site': samples})}")
    fold = patient_folds(samples, k, seed)
    for size in sizes:
        if size is not None and size < MIN_PER_CLASS:
            raise CxrError(f"--sizes {size}: choosing a threshold needs at least {MIN_PER_CLASS} images per class")
    images = load_images([s.path for s in samples], config.image_size, workers, desc="decode site", cache_dir=cache_dir)
    y = labels_of(samples).numpy()
    groups = [s.patient for s in samples]
    source_model, _ = model_from_checkpoint(checkpoint)
    source_logits = predict_logits(source_model, images, 64, device, config.intensity)
    source_temperature = float(checkpoint.get("temperature", 1.0))
    source_threshold = float(checkpoint.get("threshold", 0.5))
    bns = ["keep", "adabn"] + (["tent"] if use_tent else [])
    plans = [Plan(op, bn, tent_steps, target_sensitivity) for bn in bns for op in (False, True)]

    rows = []
    for size in sizes:
        pooled = {p.name: ([], [], [], []) for p in plans}  # every held-out image's prob, threshold, label, patient
        used = defaultdict(list)
        for r in range(repeats if size is not None else 1):  # all images of the other folds: nothing to redraw
            rng = np.random.default_rng([seed, r, size or 0])
            for f in range(k):
                held = np.flatnonzero(fold == f)
                pool = _subsample(np.flatnonzero(fold != f), y, size, rng)
                used["NORMAL"].append(int((y[pool] == 0).sum()))
                used["PNEUMONIA"].append(int((y[pool] == 1).sum()))
                for bn in bns:  # one adapted model per fold and batch-norm variant, with and without a site threshold
                    if bn == "keep":
                        pool_logits, held_logits = source_logits[pool], source_logits[held]
                    else:
                        model, _, pool_logits = adapt_model(checkpoint, Plan(False, bn, tent_steps), images[pool],
                                                            None, device, seed + r)
                        held_logits = predict_logits(model, images[held], 64, device, config.intensity)
                    op = site_operating_point(pool_logits, y[pool], target_sensitivity)
                    for plan, (temperature, t) in (
                            (Plan(False, bn, tent_steps, target_sensitivity), (source_temperature, source_threshold)),
                            (Plan(True, bn, tent_steps, target_sensitivity), (op["temperature"], op["threshold"]))):
                        bucket = pooled[plan.name]
                        bucket[0].append(pneumonia_probability(held_logits, temperature))
                        bucket[1].append(np.full(len(held), t))
                        bucket[2].append(y[held])
                        bucket[3].extend(groups[i] for i in held)
        for plan in plans:
            prob, thr, labels, patients = pooled[plan.name]
            m = bootstrap_metrics(np.concatenate(labels), np.concatenate(prob), {"site": np.concatenate(thr)},
                                  N_BOOTSTRAP, seed, groups=patients)["site"]
            rows.append({"per_class": size, "variant": plan.name,
                         "adaptation_images": {c: [min(v), max(v)] for c, v in used.items()},
                         "thresholds": [float(min(np.concatenate(thr))), float(max(np.concatenate(thr)))],
                         **{key: m[key] for key in ("accuracy", "sensitivity", "specificity", "roc_auc")}})
        log(f"{'all' if size is None else size} per class: done")
    result = {"source_run": str(source.resolve()), "site": str(Path(site).resolve()), "folds": k,
              "repeats": repeats, "seed": seed, "images": {c: int((y == i).sum()) for i, c in enumerate(CLASSES)},
              "patients": len(set(groups)), "rows": rows,
              "how": "each image predicted by a model adapted on other patients only (K folds by patient); metrics "
                     "pool the held-out predictions of every fold and repeat; intervals resample patients within "
                     "each class"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write_json(tmp / "adapt_evaluation.json", result)
        write_text(tmp / "adapt_evaluation.md", evaluation_table(result) + "\n")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _cell(block: dict) -> str:
    if block["value"] is None:
        return "n/a"
    ci = block.get("ci")
    return f"{100 * block['value']:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def evaluation_table(result: dict) -> str:
    lines = ["| images per class | variant | accuracy | sensitivity | specificity | ROC AUC | threshold range |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        n = r["adaptation_images"]
        size = ("all" if r["per_class"] is None else str(r["per_class"])) + \
            f" ({'-'.join(map(str, sorted(set(n['NORMAL']))))}/{'-'.join(map(str, sorted(set(n['PNEUMONIA']))))})"
        auc = r["roc_auc"]
        lines.append(f"| {size} | {r['variant']} | {_cell(r['accuracy'])} | {_cell(r['sensitivity'])} | "
                     f"{_cell(r['specificity'])} | {auc['value']:.3f}"
                     + (f" [{auc['ci'][0]:.3f}, {auc['ci'][1]:.3f}]" if auc.get("ci") else "")
                     + f" | {r['thresholds'][0]:.3f}-{r['thresholds'][1]:.3f} |")
    return "\n".join(lines)
