"""Predictions on a split, the operating point, and evaluation.

The operating point (decision threshold, optional temperature) is chosen here from VALIDATION
predictions only and stored in best.pt. The test split is read by `evaluate_model` alone, which
applies what the checkpoint stores and writes `metrics.json` and `predictions.csv`; nothing it
computes feeds back into training or any choice.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import TaskConfig, config_from_dict
from ..data.dataset import Sample, describe, labels_of
from ..data.folders import get_external_samples
from ..data.labels import class_names, probability_key
from ..data.loading import get_test_samples, load_images
from ..data.unlabelled import refuse_seen_by_recorded_backbone
from ..errors import CxrError
from ..files import write_csv, write_json
from ..training.checkpoint import (
    for_site,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from ..training.operating_point import OperatingPoint
from ..training.preprocess import normalize, place
from ..trust.estimate import confidence, estimate_accuracy
from ..trust.features import forward_with_features
from ..trust.fit import Trust
from .metrics import (
    bootstrap_metrics,
    classification_metrics,
    ece_interval,
    expected_calibration_error,
    fit_temperature,
    sensitivity_threshold,
    youden_threshold,
)

N_BOOTSTRAP = 1000  # resamples for every 95% interval


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device | str,
                   intensity: str = "none") -> np.ndarray:
    """(N, 2) logits for (N, 1, H, W) uint8 images, the model in eval mode."""
    place(model, device).eval()
    out = [model(normalize(images[i:i + batch_size], device, intensity)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.empty((0, model.fc.out_features), np.float32)


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, K) softmax(logits / T), in float64."""
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, 1).numpy()


def pneumonia_probability(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The positive class's probability softmax(logits / T)[:, 1] of a binary model: P(PNEUMONIA)
    for the study's label set (P(BACTERIAL) for subtype, labels.py)."""
    return probabilities(logits, temperature)[:, 1]


def pneumonia_reading(prob: np.ndarray, classes) -> np.ndarray:
    """P(PNEUMONIA) of a model with a NORMAL class: 1 - P(NORMAL), the sum of every pneumonia
    subtype's probability (the hierarchical reading of a three-way model)."""
    return 1.0 - prob[:, list(classes).index("NORMAL")]


def threshold_by_rule(y: np.ndarray, prob: np.ndarray, config: TaskConfig) -> tuple[str, float]:
    """(rule, threshold) on P(PNEUMONIA) as the task's config says: the highest threshold reaching
    config.target_sensitivity, else Youden's J or the model's own decision at 0.5 (threshold_rule)."""
    if config.target_sensitivity is None and config.threshold_rule == "0.5":
        return "0.5", 0.5
    if config.target_sensitivity is None:
        return "youden", float(youden_threshold(y, prob))
    return f"sensitivity>={config.target_sensitivity}", float(sensitivity_threshold(y, prob, config.target_sensitivity))


def choose_operating_point(run_dir: Path, config: TaskConfig, val_samples: list[Sample], val_images: torch.Tensor,
                           device: torch.device | str, batch_size: int = 64) -> OperatingPoint:
    """Fit the temperature (with config.calibrate) and the threshold (Youden's J or 0.5, as
    config.threshold_rule says, or the highest reaching config.target_sensitivity) on the
    validation predictions of best.pt; store both in best.pt and write val_predictions.csv.
    Returns what was chosen."""
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir / "best.pt")
    model, _ = model_from_checkpoint(checkpoint)
    logits = predict_logits(model, val_images, batch_size, device, config.intensity)
    y = labels_of(val_samples).numpy()
    classes = class_names(config.labels)
    temperature = fit_temperature(logits, y) if config.calibrate else 1.0
    if len(classes) > 2:
        return _multiclass_operating_point(run_dir, checkpoint, classes, val_samples, logits, y, temperature)
    prob = pneumonia_probability(logits, temperature)
    rule, threshold = threshold_by_rule(y, prob, config)
    ece_before, _ = expected_calibration_error(y, pneumonia_probability(logits))
    ece_after, _ = expected_calibration_error(y, prob)
    nll = {t: float(torch.nn.functional.cross_entropy(torch.as_tensor(logits, dtype=torch.float64) / t,
                                                      torch.as_tensor(y))) for t in {1.0, temperature}}
    chosen = OperatingPoint(rule=rule, threshold=float(threshold), temperature=float(temperature),
                            chosen_on="validation", n_val=int(len(y)), val_ece=ece_before,
                            val_ece_calibrated=ece_after, val_nll=nll[1.0],
                            val_nll_calibrated=nll[temperature])
    checkpoint.update(threshold=chosen.threshold, temperature=chosen.temperature,
                      operating_point=chosen.to_dict())
    save_checkpoint(run_dir / "best.pt", checkpoint)
    write_csv(run_dir / "val_predictions.csv",
              ["path", "true_label", *(f"logit_{c.lower()}" for c in classes), probability_key(classes[1])],
              ([str(s.path), classes[t], f"{z[0]:.9g}", f"{z[1]:.9g}", f"{q:.17g}"]  # exact: the threshold's record
               for s, t, z, q in zip(val_samples, y, logits, prob)))
    return chosen


def _multiclass_operating_point(run_dir: Path, checkpoint: dict, classes, val_samples: list[Sample],
                                logits: np.ndarray, y: np.ndarray, temperature: float) -> OperatingPoint:
    """More than two classes: the decision is the argmax (nothing to choose but the temperature);
    "threshold" is that of the pneumonia reading, P(PNEUMONIA) = 1 - P(NORMAL) >= 0.5."""
    from .multiclass import top_label_ece

    prob = probabilities(logits, temperature)
    z = torch.as_tensor(logits, dtype=torch.float64)
    nll = {t: float(torch.nn.functional.cross_entropy(z / t, torch.as_tensor(y))) for t in {1.0, temperature}}
    chosen = OperatingPoint(rule="argmax", threshold=0.5, temperature=float(temperature),
                            chosen_on="validation", n_val=int(len(y)),
                            decision="the class of highest probability; the pneumonia reading "
                                     "P(PNEUMONIA) = 1 - P(NORMAL) at 0.5",
                            val_ece=top_label_ece(y, probabilities(logits))[0],
                            val_ece_calibrated=top_label_ece(y, prob)[0],
                            val_nll=nll[1.0], val_nll_calibrated=nll[temperature])
    checkpoint.update(threshold=0.5, temperature=chosen.temperature, operating_point=chosen.to_dict())
    save_checkpoint(run_dir / "best.pt", checkpoint)
    write_csv(run_dir / "val_predictions.csv",
              ["path", "true_label", *(f"logit_{c.lower()}" for c in classes), *(probability_key(c) for c in classes)],
              ([str(s.path), classes[t], *(f"{v:.9g}" for v in zr), *(f"{q:.17g}" for q in pr)]
               for s, t, zr, pr in zip(val_samples, y, logits, prob)))
    return chosen


def result_files(name: str | None = None) -> tuple[str, str]:
    """(metrics, predictions) file names of an evaluation set: the run's own test split (None) or
    an external set NAME (metrics_NAME.json, predictions_NAME.csv)."""
    suffix = f"_{name}" if name else ""
    return f"metrics{suffix}.json", f"predictions{suffix}.csv"


def external_sets(run_dir: Path) -> list[str]:
    """Names of the external sets evaluated in `run_dir` (from its metrics_NAME.json files)."""
    return sorted(p.stem.removeprefix("metrics_") for p in Path(run_dir).glob("metrics_*.json"))


def check_set_name(name: str) -> str:
    """An external set's NAME: letters, digits, '-' and '_' (it becomes part of file names)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name or "") or name.lower() == "test":
        raise CxrError(f"external set name {name!r}: use letters, digits, '-' and '_' (and not 'test', "
                       "the run's own split), e.g. --name official_half")
    return name


def evaluate_model(model: nn.Module, checkpoint: dict, samples: list[Sample], images: torch.Tensor,
                   run_dir: Path, device: torch.device | str, batch_size: int = 64, seed: int = 0,
                   name: str | None = None, folder: Path | None = None, checks: list[str] | None = None) -> dict:
    """Predict an evaluation set (the test split, or the external set `name` read from `folder`)
    with the checkpoint's temperature and threshold; write predictions[_NAME].csv and
    metrics[_NAME].json (every metric at 0.5 and at the stored threshold, with 95% bootstrap
    intervals resampling patients within each class, and calibration); return the metrics.
    Nothing is chosen on the set. `checks`: what the overlap check found (`data_checks` in the
    file; None when no check ran)."""
    config = config_from_dict(checkpoint["config"])
    classes = class_names(config.labels)
    trust = Trust.from_checkpoint(checkpoint)
    if trust is None:
        logits, scores = predict_logits(model, images, batch_size, device, config.intensity), None
    else:
        z, features = forward_with_features(model, images, device, config.intensity, batch_size,
                                            trust.detector.layers)
        logits, scores = z.numpy(), trust.detector.score(features)
    y = labels_of(samples).numpy()
    if len(classes) > 2:
        metrics, columns, rows = _multiclass_evaluation(logits, y, samples, checkpoint, classes, seed)
    else:
        metrics, columns, rows = _binary_evaluation(logits, y, samples, checkpoint, classes, seed)
    metrics["trust"] = trust_metrics(trust, checkpoint, logits, y, scores, seed)
    if scores is not None:  # each row gets its out-of-distribution score and flag
        flags = trust.detector.in_distribution(scores)
        columns = [*columns, "ood_score", "in_distribution"]
        rows = ([*row, f"{sc:.4f}", str(bool(f))] for row, sc, f in zip(rows, scores, flags))
    if config.labels != "pneumonia":  # the study's files keep the keys they always had
        metrics["labels"] = {"set": config.labels, "classes": list(classes)}
    metrics["checkpoint"] = {"file": "best.pt", "epoch": checkpoint["epoch"],
                             "val_loss": checkpoint["metrics"].get("val_loss"),
                             # trained on several sites: each site's validation ROC AUC at the kept epoch
                             **{k: v for k, v in checkpoint["metrics"].items() if k.startswith("val_auc_")}}
    metrics["set"] = {"name": name or "test", "folder": str(folder) if folder else None,
                      "external": name is not None, "n_patients": len({s.patient for s in samples})}
    metrics["data_checks"] = {"ran": checks is not None, "notes": list(checks or [])}
    own = adaptation_images(Path(run_dir), samples)
    if own is not None:  # an adapted run: how many of these images it was fitted on (by content)
        metrics["set"]["adaptation_images"] = own
    metrics_file, predictions_file = result_files(name)
    write_csv(Path(run_dir) / predictions_file, columns, rows)
    write_json(Path(run_dir) / metrics_file, metrics)
    return metrics


def trust_metrics(trust: Trust | None, checkpoint: dict, logits: np.ndarray, y: np.ndarray,
                  scores: np.ndarray | None, seed: int = 0) -> dict:
    """How far the set is from the training images (the share flagged), and the label-free
    accuracy estimates beside the true accuracy, so every evaluation shows how far off they were."""
    if trust is None:
        return {"available": False}
    threshold, temperature = float(checkpoint.get("threshold", 0.5)), float(checkpoint.get("temperature", 1.0))
    prob = probabilities(logits, temperature)
    cal = trust.reference.calibration(threshold, temperature, trust.detector.threshold)
    accepted = trust.detector.in_distribution(scores)
    decided = (prob[:, 1] >= threshold).astype(int) if prob.shape[1] == 2 else prob.argmax(1)
    correct = decided == y
    est = estimate_accuracy(prob, threshold, cal, accepted, seed=seed)
    everything = estimate_accuracy(prob, threshold, cal, None, seed=seed)
    return {"available": True, "threshold": trust.detector.threshold, "n": int(len(y)),
            "flagged": int((~accepted).sum()), "flagged_share": float((~accepted).mean()) if len(y) else 0.0,
            "accuracy": float(correct.mean()) if len(y) else None,
            "accuracy_accepted": float(correct[accepted].mean()) if accepted.any() else None,
            "accuracy_flagged": float(correct[~accepted].mean()) if (~accepted).any() else None,
            "mean_confidence": float(confidence(prob, threshold).mean()) if len(y) else None,
            "estimate": est.to_dict(), "estimate_all_images": everything.to_dict(),
            "validation": {"accuracy": cal.accuracy, "mean_confidence": cal.mean_confidence, "n": cal.n}}


def _binary_evaluation(logits: np.ndarray, y: np.ndarray, samples: list[Sample], checkpoint: dict, classes,
                       seed: int) -> tuple[dict, list[str], list]:
    """Metrics, prediction columns and rows of a two-class model at its stored threshold."""
    temperature = float(checkpoint.get("temperature", 1.0))
    threshold = float(checkpoint.get("threshold", 0.5))
    prob = pneumonia_probability(logits, temperature)
    metrics = classification_metrics(y, prob, threshold, classes)
    fixed = OperatingPoint(rule="fixed", threshold=threshold, temperature=temperature)  # none chosen: last.pt
    metrics["operating_point"] = checkpoint.get("operating_point", fixed.to_dict())
    metrics["at_threshold"] = bootstrap_metrics(y, prob, {"0.5": 0.5, "operating": threshold}, N_BOOTSTRAP, seed,
                                                groups=[s.patient for s in samples])
    ece_raw, bins_raw = expected_calibration_error(y, pneumonia_probability(logits))
    ece, bins = expected_calibration_error(y, prob)
    metrics["calibration"] = {"temperature": temperature, "ece_uncalibrated": ece_raw, "ece": ece,
                              "ece_ci": ece_interval(y, prob, [s.patient for s in samples], seed=seed),
                              "bins_uncalibrated": bins_raw, "bins": bins}
    pred = (prob >= threshold).astype(int)
    rows = ([str(s.path), classes[t], classes[p], f"{q:.6f}", s.patient] for s, t, p, q in zip(samples, y, pred, prob))
    return metrics, ["path", "true_label", "predicted_label", probability_key(classes[1]), "patient"], rows


def _multiclass_evaluation(logits: np.ndarray, y: np.ndarray, samples: list[Sample], checkpoint: dict, classes,
                           seed: int) -> tuple[dict, list[str], list]:
    """Metrics, prediction columns and rows of a K-class model: decided by argmax, every class
    one-vs-rest, the top-label calibration and, where a NORMAL class exists, the pneumonia
    reading P(PNEUMONIA) = 1 - P(NORMAL) at the stored threshold (0.5) with the binary metrics."""
    from .multiclass import (
        multiclass_bootstrap,
        multiclass_metrics,
        top_label_calibration,
        top_label_ece,
    )

    temperature = float(checkpoint.get("temperature", 1.0))
    prob = probabilities(logits, temperature)
    groups = [s.patient for s in samples]
    metrics = multiclass_metrics(y, prob, classes)
    metrics["threshold"] = None
    argmax = OperatingPoint(rule="argmax", temperature=temperature)
    metrics["operating_point"] = checkpoint.get("operating_point", argmax.to_dict())
    metrics["multiclass"] = multiclass_bootstrap(y, prob, classes, N_BOOTSTRAP, seed, groups=groups)
    calibration = top_label_calibration(y, prob, groups, seed=seed)
    metrics["calibration"] = {"temperature": temperature, "ece": calibration["ece"], "ece_ci": calibration["ece_ci"],
                              "ece_uncalibrated": top_label_ece(y, probabilities(logits))[0],
                              "bins": calibration["bins"], "definition": calibration["definition"]}
    columns = ["path", "true_label", "predicted_label", *(probability_key(c) for c in classes)]
    reading = None
    if "NORMAL" in classes:
        threshold = float(checkpoint.get("threshold", 0.5))
        reading = pneumonia_reading(prob, classes)
        yb = (y != list(classes).index("NORMAL")).astype(int)
        binary = classification_metrics(yb, reading, threshold)
        binary["at_threshold"] = bootstrap_metrics(yb, reading, {"0.5": 0.5, "operating": threshold}, N_BOOTSTRAP,
                                                   seed, groups=groups)
        metrics["pneumonia_reading"] = {"how": "P(PNEUMONIA) = 1 - P(NORMAL), PNEUMONIA when >= the threshold",
                                        **binary}
        columns.append("prob_pneumonia")
    columns.append("patient")  # as evaluation grouped it: file name, manifest or --patients table
    pred = prob.argmax(1)
    rows = ([str(s.path), classes[t], classes[p], *(f"{q:.6f}" for q in pr),
             *([f"{reading[i]:.6f}"] if reading is not None else []), s.patient]
            for i, (s, t, p, pr) in enumerate(zip(samples, y, pred, prob)))
    return metrics, columns, rows


def adaptation_images(run_dir: Path, samples: list[Sample]) -> int | None:
    """How many of `samples` are, byte for byte, among the images `cxr adapt` fitted the run on
    (adaptation.json's digests); None for a run that was not adapted."""
    from ..data.overlap import file_digest

    path = run_dir / "adaptation.json"
    if not path.is_file():
        return None
    own = set(json.loads(path.read_text()).get("site_digests", []))
    return sum(file_digest(s.path) in own for s in samples)


def evaluate_run(run_dir: Path, data_root: Path, device: torch.device | str, workers: int,
                 cache_dir: Path | None = None, log=print, name: str | None = None,
                 patients: Path | None = None, site: str | None = None) -> dict:
    """`cxr evaluate`: the run's best.pt on the test split of `data_root`, or, with `name`, on the
    external set in `data_root` (NORMAL/ and PNEUMONIA/, or test/ holding them); either is checked
    for copies of the run's training images first, as `cxr run` checks its sets. `site`: at the
    operating point stored for that site (metrics.json's operating_point names it)."""
    run_dir = Path(run_dir)
    checkpoint = for_site(load_checkpoint(run_dir / "best.pt"), site)
    model, config = model_from_checkpoint(checkpoint)
    if name is None:
        samples = get_test_samples(Path(data_root), config.seed, config.limit, config.val_ratio, config.classes, config.labels)
    else:
        samples = get_external_samples(Path(data_root), config.labels)
        if patients is not None:  # a site whose file names carry no patient id
            from ..data.manifest import with_patients

            samples = with_patients(samples, patients, Path(data_root))
    log(f"data: {data_root}\n{describe({name or 'test': samples}, class_names(config.labels))}")
    images = load_images([s.path for s in samples], config.image_size, workers, desc=f"decode {name or 'test'}",
                         cache_dir=cache_dir)
    checks = training_overlap(run_dir, config, {name or "test": (samples, images)}, workers, cache_dir, log)
    for note in checks or []:
        log(note)
    refuse_seen_by_recorded_backbone(checkpoint, {f"external set {name}" if name else "the test split": (samples, images)},
                                     workers, log)
    metrics = evaluate_model(model, checkpoint, samples, images, run_dir, device, seed=config.seed, name=name,
                             folder=Path(data_root).resolve() if name else None, checks=checks)
    if name is None:  # beside the test split, images it has no business reading (ood_probes.csv)
        from .probes import write_probes

        write_probes(model, checkpoint, images, run_dir, device, seed=config.seed)
    return metrics


def training_overlap(run_dir: Path, config: TaskConfig, sets: dict[str, tuple[list[Sample], torch.Tensor]],
                     workers: int, cache_dir: Path | None, log=print) -> list[str] | None:
    """The overlap notes of an external set against the run's own train and validation images (as
    `cxr run` checks its sets), or None, said in one line, when the run's data cannot be read."""
    from ..data.loading import prepare_splits
    from ..data.overlap import content_overlap_notes

    try:
        root = json.loads((Path(run_dir) / "config.json").read_text()).get("data")
        splits = prepare_splits(Path(root), config.val_ratio, config.seed, config.limit, config.classes, config.labels)
    except (CxrError, OSError, TypeError, ValueError) as e:
        log(f"note: no overlap check against the run's training images (its data cannot be read: {e})")
        return None
    train = splits.train + splits.val
    images = load_images([s.path for s in train], config.image_size, workers, desc="decode train (overlap check)",
                         cache_dir=cache_dir)
    (name, notes), = content_overlap_notes((train, images), sets, "train").items()
    return notes
