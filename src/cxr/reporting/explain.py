"""Figures of a run folder, from the files the earlier steps wrote (history, metrics, predictions,
best.pt). Writes OUT/<task>/figures/*.png and OUT/figures/compare_loss.png; never trains."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..config import CLASSES
from ..data.labels import probability_key, run_classes
from ..data.loading import load_images
from ..errors import CxrError
from ..evaluation.evaluate import external_sets, result_files
from ..files import folder_hint, read_csv
from ..training.checkpoint import load_checkpoint, model_from_checkpoint
from ..training.operating_point import OperatingPoint
from ..training.preprocess import normalize, place
from .cam import METHODS
from .plots import (
    plot_cam_pairs,
    plot_compare_loss,
    plot_confusion,
    plot_history,
    plot_pr,
    plot_reliability,
    plot_roc,
    plot_roc_per_class,
)


def _require(path: Path, made_by: str) -> Path:
    if not path.is_file():
        hint = folder_hint(path.parent)
        raise CxrError(f"{path}: not found" + (hint if "output folder" in hint else f"; {made_by} writes it"))
    return path


def read_predictions(run_dir: Path, name: str | None = None) -> list[dict]:
    """Rows of predictions[_NAME].csv, every probability a float; "score": the probability of
    the positive class (two classes) or of the predicted one (more)."""
    rows = read_csv(_require(run_dir / result_files(name)[1], "cxr evaluate" + (f" --name {name}" if name else "")))
    for r in rows:
        for k in [k for k in r if k.startswith("prob_")]:
            r[k] = float(r[k])
        probs = [k for k in r if k.startswith("prob_") and k != "prob_pneumonia"] or ["prob_pneumonia"]
        r["score"] = r[probs[0]] if len(probs) == 1 else r[probability_key(r["predicted_label"])]
    return rows


def draw_run_figures(run_dir: Path) -> list[Path]:
    """loss, confusion, ROC, PR and calibration figures of one task folder."""
    run_dir = Path(run_dir)
    figures = run_dir / "figures"
    history = read_csv(_require(run_dir / "history.csv", "cxr train"))
    metrics = json.loads(_require(run_dir / "metrics.json", "cxr evaluate").read_text())
    rows = read_predictions(run_dir)
    task = run_dir.name if not run_dir.name.startswith("seed") else f"{run_dir.parent.name} {run_dir.name}"
    classes = run_classes(run_dir)
    plot_history(history, metrics["checkpoint"]["epoch"], task, figures / "loss.png")
    plot_confusion(metrics["confusion_matrix"], task, figures / "confusion.png", classes)
    y = np.array([classes.index(r["true_label"]) for r in rows])
    if len(classes) > 2:
        return [figures / "loss.png", figures / "confusion.png", *_multiclass_figures(metrics, rows, y, classes, task,
                                                                                      figures)]
    prob = np.array([r["score"] for r in rows])
    rule = OperatingPoint.from_dict(metrics.get("operating_point")).rule or "stored"
    points = {"0.5": 0.5, f"operating ({rule})": metrics["threshold"]}
    plot_roc(y, prob, points, metrics["roc_auc"], task, figures / "roc.png")
    ap = metrics.get("at_threshold", {}).get("0.5", {}).get("pr_auc", {}).get("value")
    plot_pr(y, prob, points, ap, task, figures / "pr.png")
    names = ["loss.png", "confusion.png", "roc.png", "pr.png"]
    cal = metrics.get("calibration")
    if cal:
        curves = {"uncalibrated": (cal["bins_uncalibrated"], cal["ece_uncalibrated"])}
        if cal["temperature"] != 1.0:
            curves[f"temperature {cal['temperature']:.2f}"] = (cal["bins"], cal["ece"])
        plot_reliability(curves, task, figures / "calibration.png")
        names.append("calibration.png")
    return [figures / n for n in names]


def _multiclass_figures(metrics: dict, rows: list[dict], y: np.ndarray, classes, task: str, figures: Path
                        ) -> list[Path]:
    """Per-class ROC curves, the pneumonia reading's ROC (where a NORMAL class exists) and the
    top-label calibration of a model of more than two classes."""
    prob = np.array([[r[probability_key(c)] for c in classes] for r in rows])
    plot_roc_per_class(y, prob, classes, task, figures / "roc.png")
    written = [figures / "roc.png"]
    reading = metrics.get("pneumonia_reading")
    if reading:
        yb = (y != list(classes).index("NORMAL")).astype(int)
        pb = np.array([r["prob_pneumonia"] for r in rows])
        plot_roc(yb, pb, {"0.5": reading["threshold"]}, reading["roc_auc"], f"{task}, P(pneumonia) = 1 - P(normal)",
                 figures / "roc_pneumonia.png")
        written.append(figures / "roc_pneumonia.png")
    cal = metrics["calibration"]
    plot_reliability({"top label": (cal["bins"], cal["ece"])}, task, figures / "calibration.png",
                     axes=("mean highest class probability in bin", "share of those images classified right"))
    return written + [figures / "calibration.png"]


def compute_cams(model, rows: list[dict], image_size: int, method: str, device, workers: int,
                 batch_size: int = 32, intensity: str = "none", classes=CLASSES,
                 target: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, S, S) uint8, maps (N, S, S) in [0, 1]) for the predicted class of each row
    (or the class `target` for every row)."""
    if not rows:
        return np.zeros((0, image_size, image_size), np.uint8), np.zeros((0, image_size, image_size))
    images = load_images([Path(r["path"]) for r in rows], image_size, workers, desc="decode for CAM")
    targets = torch.tensor([classes.index(target or r["predicted_label"]) for r in rows])
    maps = []
    place(model, device)
    with METHODS[method](model) as cam:
        for i in range(0, len(rows), batch_size):
            m, _ = cam(normalize(images[i:i + batch_size], device, intensity), targets[i:i + batch_size].to(device))
            maps.append(m)
    return images[:, 0].numpy(), np.concatenate(maps)


def _title(r: dict, threshold: float, classes=CLASSES) -> str:
    """A gallery caption that cannot read as a contradiction: the probability beside the threshold it
    was compared with (two classes), or the winning class's probability (more)."""
    shown = classes[1] if len(classes) == 2 else r["predicted_label"]
    p = float(r["score"] if "score" in r else r[probability_key(shown)])
    head = f"{Path(r['path']).stem[:22]}\ntrue {r['true_label']}, pred {r['predicted_label']}\n"
    if len(classes) > 2:
        return head + f"P({r['predicted_label'].lower()}) {p:.3f}, the highest"
    return head + f"P({classes[1].lower()}) {p:.3f} {'>=' if p >= threshold else '<'} {threshold:.3f}"


def select_examples(rows: list[dict], n: int, threshold: float = 0.5, seed: int = 0,
                    classes=CLASSES) -> dict[str, list[dict]]:
    """Mistakes farthest from the threshold first (more than two classes: most confident first,
    ordered by true -> predicted); for each class, a seeded random sample of correctly classified
    images."""
    wrong = [r for r in rows if r["true_label"] != r["predicted_label"]]
    if len(classes) > 2:
        wrong = sorted(sorted(wrong, key=lambda r: -r["score"])[:n],
                       key=lambda r: (classes.index(r["true_label"]), classes.index(r["predicted_label"]), -r["score"]))
    else:
        wrong = sorted(wrong, key=lambda r: -abs(r["score"] - threshold))
    chosen = {"misclassified": wrong[:n]}
    rng = random.Random(seed)
    for name in classes:
        right = [r for r in rows if r["true_label"] == r["predicted_label"] == name]
        chosen[f"cam_{name.lower()}"] = sorted(rng.sample(right, min(n, len(right))), key=lambda r: r["path"])
    return chosen


def explain_run(run_dir: Path, n: int = 16, only_errors: bool = False, method: str = "cam",
                device: torch.device | str = "cpu", workers: int = 2) -> list[Path]:
    """misclassified.png, misclassified_NAME.png for each external set evaluated, and (unless
    only_errors) cam_normal.png and cam_pneumonia.png."""
    run_dir = Path(run_dir)
    rows = read_predictions(run_dir)
    checkpoint = load_checkpoint(run_dir / "best.pt")
    model, config = model_from_checkpoint(checkpoint)
    classes = tuple(checkpoint["classes"])
    groups = select_examples(rows, n, float(checkpoint.get("threshold", 0.5)), classes=classes)
    if only_errors:
        groups = {"misclassified": groups["misclassified"]}
    written = []
    for set_name in external_sets(run_dir):  # one gallery of mistakes per external set
        ext = select_examples(read_predictions(run_dir, set_name), n, float(checkpoint.get("threshold", 0.5)),
                              classes=classes)
        groups[f"misclassified_{set_name}"] = ext["misclassified"]
    for name, chosen in groups.items():
        images, maps = compute_cams(model, chosen, config.image_size, method, device, workers,
                                    intensity=config.intensity, classes=classes)
        order = ", by true -> predicted" if len(classes) > 2 else ""
        label = {"misclassified": f"test images the model got wrong, most confident first{order}",
                 **{f"cam_{c.lower()}": f"correctly classified {c} test images" for c in classes}}.get(
            name, f"{name.removeprefix('misclassified_')} images the model got wrong, most confident first{order}")
        path = run_dir / "figures" / f"{name}.png"
        plot_cam_pairs(images, maps, [_title(r, float(checkpoint.get("threshold", 0.5)), classes) for r in chosen],
                       f"{run_dir.name}: {label} ({method.upper()} of the predicted class)", path)
        written.append(path)
    return written


def draw_comparison(out: Path, tasks: list[str]) -> Path:
    histories = {t: read_csv(_require(Path(out) / t / "history.csv", "cxr train")) for t in tasks}
    path = Path(out) / "figures" / "compare_loss.png"
    plot_compare_loss(histories, path)
    return path
