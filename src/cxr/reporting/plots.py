"""Arrays or rows in, PNG files out. Nothing here computes a result; it only draws one."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve  # noqa: E402

from ..config import CLASSES  # noqa: E402

# One colour per task in every figure, so a task is recognised at a glance.
TASK_COLORS = {"scratch": "#1f77b4", "finetune": "#ff7f0e", "finetune-full": "#2ca02c"}
_FALLBACK = ["#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def task_color(task: str) -> str:
    if task in TASK_COLORS:
        return TASK_COLORS[task]
    return _FALLBACK[sum(map(ord, task)) % len(_FALLBACK)]


def _save(fig, path: Path) -> None:
    from ..files import atomic_write

    # zlib level 1: a task's 8 PNGs at 64 px took 0.94 s of CPU instead of 1.25 s (one thread), files ~12% larger
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png",
                                             pil_kwargs={"compress_level": 1}))
    plt.close(fig)


def _epoch_axis(ax, epochs: list[int]) -> None:
    """Whole epochs on the x axis, with a margin so a single epoch is not a degenerate range."""
    last = max(epochs, default=1)
    ax.set_xlim(0.5, last + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def robust_top(values: list[float], factor: float = 3.0) -> float | None:
    """An upper limit for a loss axis when one spike (e.g. a first epoch at 12) would flatten the
    rest: `factor` times the median, if some value lies above it; None when nothing needs cutting."""
    finite = [v for v in values if np.isfinite(v)]
    if len(finite) < 3:
        return None
    top = factor * float(np.median(finite))
    return top if max(finite) > top else None


_OFF_SCALE_LINES = 3  # epochs listed in the off-scale note; more would hide the curves below it


def _clip_axis(ax, series: dict[str, tuple[list[int], list[float]]]) -> None:
    """Cut the y axis at robust_top and write the values above it in one note at the top, a line per
    epoch naming each series: a label per value at its epoch printed two spikes of one epoch (train
    and validation) on top of each other, and neighbouring epochs' labels too."""
    values = [v for _, vs in series.values() for v in vs]
    top = robust_top(values)
    if top is None:
        return
    ax.set_ylim(min(0.0, min(values)), top)
    by_epoch: dict[int, list[str]] = {}
    for name, (es, vs) in series.items():
        for e, v in zip(es, vs):
            if v > top:
                by_epoch.setdefault(e, []).append(f"{name} {v:.3g}")
    lines = [f"epoch {e}: " + ", ".join(by_epoch[e]) for e in sorted(by_epoch)]
    if len(lines) > _OFF_SCALE_LINES:
        lines = lines[:_OFF_SCALE_LINES - 1] + [f"and {len(lines) - _OFF_SCALE_LINES + 1} more epochs"]
    ax.text(0.5, 0.98, "\n".join(["off scale", *lines]), transform=ax.transAxes, ha="center", va="top",
            fontsize=7, color="0.3", bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})


def plot_history(history: list[dict], best_epoch: int, task: str, path: Path) -> None:
    """Loss (left) and accuracy (right) per epoch, train dashed and validation solid, best epoch marked."""
    epochs = [int(r["epoch"]) for r in history]
    color = task_color(task)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        ax.plot(epochs, [float(r[f"train_{key}"]) for r in history], "--o", color=color, alpha=0.6,
                label="train", markersize=3)
        ax.plot(epochs, [float(r[f"val_{key}"]) for r in history], "-o", color=color, label="validation",
                markersize=3)
        ax.axvline(best_epoch, color="0.4", linestyle=":", label=f"best epoch ({best_epoch})")
        _epoch_axis(ax, epochs)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    _clip_axis(axes[0], {name: (epochs, [float(r[f"{s}_loss"]) for r in history])
                         for name, s in (("train", "train"), ("validation", "val"))})
    axes[0].set_title(f"{task}: loss")
    axes[1].set_title(f"{task}: accuracy")
    _save(fig, path)


def plot_compare_loss(histories: dict[str, list[dict]], path: Path) -> None:
    """Validation loss of every task on one axis."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for task, history in histories.items():
        losses = [float(r["val_loss"]) for r in history]
        best = int(np.argmin(losses))
        ax.plot([int(r["epoch"]) for r in history], losses, "-o", color=task_color(task), label=task, markersize=3)
        ax.plot([int(history[best]["epoch"])], [losses[best]], "*", color=task_color(task), markersize=12)
    _epoch_axis(ax, [int(r["epoch"]) for h in histories.values() for r in h])
    _clip_axis(ax, {task: ([int(r["epoch"]) for r in h], [float(r["val_loss"]) for r in h])
                    for task, h in histories.items()})
    ax.set_ylabel("validation cross-entropy loss")
    ax.set_title("Validation loss per task (star: lowest)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_confusion(cm: list[list[int]], task: str, path: Path, classes=CLASSES) -> None:
    """The K x K confusion matrix: counts and each row's share (rows true, columns predicted)."""
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4.6 + 0.9 * (len(classes) - 2), 4 + 0.8 * (len(classes) - 2)))
    im = ax.imshow(cm, cmap="Blues")
    row_totals = cm.sum(1, keepdims=True).clip(min=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            dark = cm[i, j] > cm.max() / 2
            ax.text(j, i, f"{cm[i, j]}\n({100 * cm[i, j] / row_totals[i, 0]:.1f}%)", ha="center", va="center",
                    color="white" if dark else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{task}: test confusion matrix")
    fig.colorbar(im, ax=ax, label="images")
    _save(fig, path)


_POINT_STYLE = [("o", "black"), ("s", "crimson"), ("^", "darkgreen")]


def plot_roc(y_true: np.ndarray, prob: np.ndarray, thresholds: dict[str, float], auc: float | None, task: str,
             path: Path) -> None:
    """ROC curve of P(PNEUMONIA), each named operating point marked."""
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    if len(np.unique(y_true)) == 2:
        fpr, tpr, _ = roc_curve(y_true, prob)
        ax.plot(fpr, tpr, color=task_color(task), label=f"ROC (AUC {auc:.3f})")
        for (name, t), (marker, color) in zip(thresholds.items(), _POINT_STYLE):
            pred = prob >= t
            ax.plot([pred[y_true == 0].mean()], [pred[y_true == 1].mean()], marker, color=color,
                    label=f"{name}: threshold {t:.3f}")
    else:
        ax.text(0.5, 0.5, "one class only: no ROC", ha="center")
    _finish_roc(fig, ax, f"{task}: test ROC", path)


def _finish_roc(fig, ax, title: str, path: Path) -> None:
    """The chance line, axes, title and legend of a ROC figure, then save it."""
    ax.plot([0, 1], [0, 1], ":", color="0.5", label="chance")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_roc_per_class(y_true: np.ndarray, prob: np.ndarray, classes, task: str, path: Path) -> None:
    """One-vs-rest ROC curve of each class's probability (more than two classes), AUC in the legend,
    the argmax decision's (1 - specificity, sensitivity) of each class marked."""
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    colors = plt.get_cmap("tab10")
    pred = prob.argmax(1)
    for i, name in enumerate(classes):
        one = (y_true == i).astype(int)
        if 0 < one.sum() < len(one):
            fpr, tpr, _ = roc_curve(one, prob[:, i])
            ax.plot(fpr, tpr, color=colors(i), label=f"{name} vs rest (AUC {roc_auc_score(one, prob[:, i]):.3f})")
            called = pred == i
            ax.plot([called[one == 0].mean()], [called[one == 1].mean()], "o", color=colors(i))
    ax.plot([], [], "o", color="0.3", label="argmax decision")
    _finish_roc(fig, ax, f"{task}: test ROC, one class vs the rest", path)


def plot_pr(y_true: np.ndarray, prob: np.ndarray, thresholds: dict[str, float], ap: float | None, task: str,
            path: Path) -> None:
    """Precision-recall curve (pneumonia positive), each named operating point marked."""
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    if len(np.unique(y_true)) == 2:
        precision, recall, _ = precision_recall_curve(y_true, prob)
        ax.step(recall, precision, where="post", color=task_color(task), label=f"PR (AP {ap:.3f})")
        for (name, t), (marker, color) in zip(thresholds.items(), _POINT_STYLE):
            pred = prob >= t
            ppv = y_true[pred].mean() if pred.any() else 1.0
            ax.plot([pred[y_true == 1].mean()], [ppv], marker, color=color, label=f"{name}: threshold {t:.3f}")
        ax.axhline(y_true.mean(), linestyle=":", color="0.5", label="prevalence")
    else:
        ax.text(0.5, 0.5, "one class only: no PR curve", ha="center")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{task}: test precision-recall")
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, path)


def plot_reliability(curves: dict[str, tuple[list[dict], float]], task: str, path: Path,
                     axes: tuple[str, str] = ("mean predicted P(pneumonia) in bin", "observed share of pneumonia")
                     ) -> None:
    """Reliability diagram: observed pneumonia rate against mean predicted probability per bin,
    one line per named curve (e.g. before and after temperature scaling), ECE in the legend."""
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot([0, 1], [0, 1], ":", color="0.5", label="perfect calibration")
    for (name, (bins, ece)), (marker, color) in zip(curves.items(), _POINT_STYLE):
        ax.plot([b["mean_prob"] for b in bins], [b["observed"] for b in bins], f"-{marker}", color=color,
                markersize=4, label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_title(f"{task}: test calibration")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H, W) uint8 grey image under its (H, W) map in [0, 1], in jet at `alpha`: (H, W, 3) floats."""
    from matplotlib import colormaps

    grey = np.repeat((image.astype(float) / 255)[..., None], 3, axis=2)
    return (1 - alpha) * grey + alpha * colormaps["jet"](np.clip(cam, 0, 1))[..., :3]


def plot_cam_pairs(images: np.ndarray, maps: np.ndarray, titles: list[str], suptitle: str, path: Path,
                   pairs_per_row: int = 4, inches_per_pair: float = 4.2) -> None:
    """Each image beside its CAM overlay. `images` (N, H, W) uint8, `maps` (N, H, W) in [0, 1];
    `inches_per_pair`: the width of one pair in the figure (a gallery's default; larger for one image).

    Drawn as one mosaic on one axes (captions as text), not two axes per image: with 16 images
    the 32 axes and their titles took most of the time of a run's figures (measured: about 1 s
    per gallery on 2 cores, against about 0.2 s for this)."""
    n = len(images)
    if n == 0:
        fig, ax = plt.subplots(figsize=(6, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{suptitle}: no images to show", ha="center", va="center")
        _save(fig, path)
        return
    cols = min(n, pairs_per_row)
    rows = -(-n // cols)
    h, w = images.shape[1:3]
    gap = max(2, w // 20)  # between tiles
    cell_w = 2 * w + gap
    width = cols * (cell_w + gap) - gap
    fig_w = inches_per_pair * cols
    inch_per_px = 0.85 * fig_w / width  # the mosaic's axes take about 85% of the width (the colour bar the rest)
    lines = max(t.count("\n") + 1 for t in titles)
    band = int(np.ceil((lines * 8 * 1.45 / 72 + 0.12) / inch_per_px))  # room above each row for 8-pt captions
    cell_h = h + band
    mosaic = np.ones((rows * cell_h, width, 3))
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = r * cell_h + band, c * (cell_w + gap)
        mosaic[y:y + h, x:x + w] = np.repeat((images[k].astype(float) / 255)[..., None], 3, axis=2)
        mosaic[y:y + h, x + w + gap:x + cell_w] = overlay(images[k], maps[k])
    fig, ax = plt.subplots(figsize=(fig_w, rows * cell_h * inch_per_px + 0.7))
    ax.imshow(mosaic, interpolation="antialiased")
    ax.axis("off")
    for k in range(n):
        r, c = divmod(k, cols)
        x, y = c * (cell_w + gap), r * cell_h + band - 2
        ax.text(x + w / 2, y, titles[k], ha="center", va="bottom", fontsize=8)
        ax.text(x + w + gap + w / 2, y, "CAM overlay", ha="center", va="bottom", fontsize=8)
    ax.set_title(suptitle)
    scale = plt.cm.ScalarMappable(cmap="jet", norm=plt.Normalize(0, 1))
    fig.colorbar(scale, ax=ax, shrink=0.6, label="class activation (normalised)")
    _save(fig, path)


def plot_robustness(clean: dict, rows: list[dict], metrics: tuple, title: str, path: Path) -> None:
    """One panel per metric: its value against shift severity (0 = clean), a line per shift."""
    shifts = list(dict.fromkeys(r["shift"] for r in rows))
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4), sharex=True)
    for ax, m in zip(axes, metrics):
        for k, s in enumerate(shifts):
            vals = [clean[m]] + [r[m] for r in rows if r["shift"] == s]
            ax.plot(range(len(vals)), vals, "-o", color=cmap(k % 20), markersize=3, label=s)
        ax.axhline(clean[m], color="black", linestyle=":", linewidth=1)
        ax.set_xticks(range(4), ["clean", "1", "2", "3"])
        ax.set_xlabel("severity")
        ax.set_title(m.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("value")
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(f"{title}: metrics under acquisition shifts")
    _save(fig, path)


def plot_adapt_curve(result: dict, path: Path) -> None:
    """The learning curve of `cxr adapt --evaluate`: held-out accuracy and ROC AUC (95% intervals)
    against the labelled site images per class, one line per variant (the site-threshold ones
    dashed); where forgetting was measured, the first site's accuracy on each of its sets."""
    from matplotlib.ticker import NullLocator

    rows = result["rows"]
    sizes = list(dict.fromkeys(r["per_class"] for r in rows))
    largest = max((max(r["adaptation_images"]["NORMAL"]) for r in rows if r["per_class"] is None), default=None)
    xs = {s: (s if s is not None else largest or 0) for s in sizes}
    sets = list(result.get("source_sets", {}))
    panels = [("accuracy", "site accuracy (held-out folds)"), ("roc_auc", "site ROC AUC (held-out folds)")]
    panels += [(f"{n}_accuracy", f"first site kept: {n} accuracy") for n in sets]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    axes = axes[0]
    for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        mine = [r for r in rows if r["variant"] == variant]
        color = "#444444" if i < 2 else _FALLBACK[(i // 2 - 1) % len(_FALLBACK)]
        style = "--" if i % 2 else "-"
        x = np.array([xs[r["per_class"]] for r in mine], dtype=float) * (1 + 0.012 * i)
        for ax, (key, title) in zip(axes, panels):
            ax.set_title(title, fontsize=10)
            if key in ("accuracy", "roc_auc"):
                v = np.array([r[key]["value"] if r[key]["value"] is not None else np.nan for r in mine])
                ci = np.array([r[key]["ci"] or [np.nan, np.nan] for r in mine], dtype=float)
                ax.errorbar(x, v, yerr=[v - ci[:, 0], ci[:, 1] - v], color=color, linestyle=style, marker="o",
                            capsize=3, label=variant)
            else:
                v = np.array([r["source_sets"].get(key, {}).get("mean", np.nan) for r in mine])
                ax.plot(x, v, color=color, linestyle=style, marker="o", label=variant)
    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks([xs[s] for s in sizes])
        ax.set_xticklabels([str(s) if s is not None else f"all\n({largest})" for s in sizes])
        ax.set_xlabel("labelled site images per class")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"adaptation at {Path(result['site']).name}: {result['folds']} folds by patient; "
                 "dashed: threshold chosen at the site")
    fig.tight_layout()
    _save(fig, path)
