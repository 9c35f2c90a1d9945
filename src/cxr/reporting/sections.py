"""The study's sections of the report: a row per task read from its run folder, and the cells and
notes of its tables (comparison, every evaluation set, per class, clinical, robustness, data checks).

Reads files only; the sentences are generated from the numbers, so the text cannot contradict the
tables.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import CLASSES, PRESETS, RECIPE_CHOSEN_ON
from ..data.labels import class_names
from ..errors import CxrError
from ..evaluation.evaluate import external_sets, result_files
from ..files import read_csv
from ..training.operating_point import OperatingPoint
from .card import describe_backbone, few_validation_warning

TASK_FIGURES = [("loss.png", "Training and validation curves"), ("confusion.png", "Confusion matrix (test)"),
                ("roc.png", "ROC curve (test)"), ("pr.png", "Precision-recall curve (test)"),
                ("calibration.png", "Reliability diagram (test)"), ("misclassified.png", "Mistakes, most confident first, with CAM"),
                ("cam_normal.png", "CAM over correctly classified NORMAL images"),
                ("cam_pneumonia.png", "CAM over correctly classified PNEUMONIA images"),
                ("robustness_test.png", "Metrics under acquisition shifts (test)"),
                ("adapt_curve.png", "Fitting at the site: what labelled site images buy (k-fold by patient)")]


def task_figures(row: dict) -> list[tuple[str, str]]:
    """The figures of a task: the fixed list (a CAM gallery per class of its label set), plus a
    mistakes gallery per external set."""
    classes = row.get("classes", CLASSES)
    extra = [(f"misclassified_{name}.png", f"Mistakes on the external set {name}, most confident first, with CAM")
             for name in row.get("externals", {})]
    head = TASK_FIGURES[:6]
    if len(classes) > 2:
        head = [*head[:3], ("roc_pneumonia.png", "ROC of P(pneumonia) = 1 - P(normal) (test)"), *head[3:]]
        head[2] = ("roc.png", "ROC curve of each class against the rest (test)")
    cams = [(f"cam_{c.lower()}.png", f"CAM over correctly classified {c} images") for c in classes]
    return head + extra + cams + TASK_FIGURES[8:]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def find_tasks(out: Path) -> list[str]:
    """Task folders of OUT that hold results, presets first in their usual order."""
    found = [p.name for p in Path(out).iterdir() if (p / "metrics.json").is_file()] if Path(out).is_dir() else []
    if not found:
        if (Path(out) / "metrics.json").is_file():
            raise CxrError(f"{out}: is a task folder; the report covers an output folder: pass {Path(out).parent}")
        raise CxrError(f"{out}: no task folder with metrics.json; run `cxr run` (or train and evaluate) first")
    order = list(PRESETS)
    return sorted(found, key=lambda t: (order.index(t) if t in order else len(order), t))


def task_row(run_dir: Path) -> dict:
    """What the comparison shows for one task folder."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = read_csv(run_dir / "history.csv")
    config = json.loads((run_dir / "config.json").read_text())
    externals = {name: json.loads((run_dir / result_files(name)[0]).read_text()) for name in external_sets(run_dir)}
    adaptation = run_dir / "adaptation.json"
    kfold = run_dir / "adapt_evaluation.md"
    return {
        "kfold_table": kfold.read_text() if kfold.is_file() else None,
        "adaptation": json.loads(adaptation.read_text()) if adaptation.is_file() else None,
        "task": run_dir.name,
        "classes": class_names(config.get("config", {}).get("labels")),
        "metrics": metrics,
        "externals": externals,
        "config": config,
        "history": history,
        "best_epoch": metrics["checkpoint"]["epoch"],
        "epochs": len(history),
        "train_seconds": sum(float(r["seconds"]) for r in history),
    }


def _classes(rows: list[dict]) -> tuple[str, ...]:
    """The class names of the report's label set (every task of one run shares it)."""
    return rows[0].get("classes", CLASSES) if rows else CLASSES


def _auc_cell(m: dict) -> dict:
    """ROC AUC with its interval: of the positive class (two classes), macro over classes (more)."""
    if "multiclass" in m:
        return m["multiclass"]["overall"]["macro_roc_auc"]
    return m.get("at_threshold", {}).get("0.5", {}).get("roc_auc") or {"value": m["roc_auc"], "ci": None}


def comparison_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    classes = _classes(rows)
    many = len(classes) > 2
    head = ["task", "decision (rule)" if many else "threshold (rule)", "test accuracy",
            *(f"{c} accuracy (correct/total)" for c in classes),
            "macro ROC AUC (95% CI)" if many else "ROC AUC (95% CI)", "best epoch (kept by)", "training time"]
    body = []
    for r in rows:
        m = r["metrics"]
        per_class = [f"{_pct(m['per_class'][c]['accuracy'])} ({m['per_class'][c]['correct']}/"
                     f"{m['per_class'][c]['total']})" for c in classes]
        op = OperatingPoint.from_dict(m.get("operating_point"))
        auc = _auc_cell(m)
        where = "" if op.chosen_on in (None, "validation") else f", on {op.chosen_on}"
        few = f"; only {op.n_val} validation images" if few_validation_warning(op) else ""
        decision = "argmax (highest probability)" if m.get("threshold") is None else \
            f"{m['threshold']:.3f} ({op.rule or 'fixed'}{where}{few})"
        body.append([r["task"], decision, f"{_pct(m['accuracy'])} (n={m['n']})",
                     *per_class, _with_ci(auc, 3),
                     f"{r['best_epoch']} of {r['epochs']} ({r['config']['config'].get('select_by', 'val_loss')})",
                     f"{r['train_seconds']:.0f} s" + _processes(r["config"])])
    return head, body


def _processes(run_config: dict) -> str:
    n = run_config.get("processes", 1)
    return f" on {n} processes" if n > 1 else ""


PROPORTIONS = {"accuracy", "sensitivity", "specificity", "ppv", "npv", "balanced_accuracy"}


def _with_ci(cell: dict, digits: int = 3, metric: str | None = None) -> str:
    """value [low, high]: proportions in percent (as the comparison table), AUC, F1 and ECE as
    fractions."""
    if cell is None or cell.get("value") is None:
        return "n/a"
    pct = metric in PROPORTIONS
    fmt = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.{digits}f}")
    v = fmt(cell["value"]) + ("%" if pct else "")
    if not cell.get("ci"):
        return v
    # at 0 or 1 every bootstrap resample agrees; metrics.py gives Wilson's interval there instead
    method = " (Wilson)" if cell.get("ci_method") == "wilson" else ""
    return f"{v} [{fmt(cell['ci'][0])}, {fmt(cell['ci'][1])}]{method}"


def evaluation_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Every evaluation set of every task side by side (dev-test first, then each external set),
    at the stored threshold (or the argmax), with 95% bootstrap intervals."""
    classes = _classes(rows)
    if len(classes) > 2:
        keys = ("accuracy", "balanced_accuracy", "kappa", "macro_roc_auc")
        titles = ["accuracy", "balanced accuracy", "Cohen's kappa", "macro ROC AUC"]
    else:
        keys = ("accuracy", "sensitivity", "specificity", "roc_auc")
        titles = ["accuracy", "sensitivity", "specificity", "ROC AUC"] if classes == CLASSES else \
            ["accuracy", f"sensitivity ({classes[1]} recall)", f"specificity ({classes[0]} recall)", "ROC AUC"]
    head = ["task", "evaluation set", f"images ({'/'.join(classes)})", *titles]
    body = []
    for r in rows:
        for name, m in [("test", r["metrics"]), *r.get("externals", {}).items()]:
            block = m["multiclass"]["overall"] if "multiclass" in m else m.get("at_threshold", {}).get("operating", {})
            counts = "/".join(str(m["per_class"][c]["total"]) for c in classes)
            body.append([r["task"], name + (" (external)" if name != "test" else ""), counts,
                         *(_with_ci(block.get(k), metric=k) for k in keys)])
    return head, body


def per_class_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """More than two classes: each class against the rest, on every evaluation set, with intervals."""
    if len(_classes(rows)) <= 2:
        return None
    head = ["task", "evaluation set", "class", "images", "sensitivity (recall)", "specificity", "PPV", "F1", "ROC AUC"]
    body = []
    for r in rows:
        for name, m in [("test", r["metrics"]), *r.get("externals", {}).items()]:
            for c, cells in m["multiclass"]["per_class"].items():
                body.append([r["task"], name, c, str(m["per_class"][c]["total"]),
                             *(_with_ci(cells[k], metric=k) for k in ("sensitivity", "specificity", "ppv", "f1",
                                                                       "roc_auc"))])
    return head, body


def reading_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """A three-way model's pneumonia-vs-normal reading, P(PNEUMONIA) = 1 - P(NORMAL) at 0.5, on
    every evaluation set: comparable with a binary pneumonia model's numbers."""
    if not any("pneumonia_reading" in r["metrics"] for r in rows):
        return None
    head = ["task", "evaluation set", "images (NORMAL/PNEUMONIA)", "accuracy", "sensitivity", "specificity", "ROC AUC"]
    body = []
    for r in rows:
        for name, m in [("test", r["metrics"]), *r.get("externals", {}).items()]:
            reading = m.get("pneumonia_reading")
            if reading:
                block = reading["at_threshold"]["operating"]
                counts = "/".join(str(reading["per_class"][c]["total"]) for c in CLASSES)
                body.append([r["task"], name, counts, *(_with_ci(block.get(k), metric=k)
                                                        for k in ("accuracy", "sensitivity", "specificity", "roc_auc"))])
    return head, body


READING_NOTE = ("The pneumonia reading of a three-way model: P(PNEUMONIA) = P(BACTERIAL) + P(VIRAL) = 1 - P(NORMAL), "
                "PNEUMONIA when it is at least 0.5; the same metrics as a pneumonia-vs-normal model's, on the same "
                "images, so the two can be set side by side.")


def external_note(rows: list[dict]) -> str | None:
    """Where the external sets came from, that nothing was chosen on them, and which presets'
    recipes were chosen on one."""
    folders = {name: m.get("set", {}).get("folder") for r in rows for name, m in r.get("externals", {}).items()}
    if not folders:
        return None
    listing = "; ".join(f"{name}: {folder}" for name, folder in folders.items())
    chosen = [f"the recipe of {r['task']} was chosen on {RECIPE_CHOSEN_ON[r['task']]}" for r in rows
              if r["task"] in RECIPE_CHOSEN_ON]
    adapted = [r["task"] for r in rows if r.get("adaptation")]
    plain = [r["task"] for r in rows if not r.get("adaptation")]
    origin = ((f"for {', '.join(plain)} " if adapted else "") + "the kept epoch, threshold and temperature come from "
              "each task's rules and its validation split (split from train by patient)" if plain else "")
    if adapted:  # adaptation chose them at a site instead (adaptation.json says where)
        origin += ("; " if origin else "") + (f"for {', '.join(adapted)} they were chosen by cxr adapt at its site "
                                              "(see below)")
    return (f"External sets ({listing}) are evaluated only: {origin}. If recipes or settings were compared on an "
            "external set, its numbers are optimistic for the chosen one"
            + ("; " + "; ".join(chosen) if chosen else "") + ".")


def resampled_units(rows: list[dict], test_only: bool = False) -> str:
    """What the bootstrap intervals resampled, as the metrics files record it: patients (all
    their images together), or images where the file names carry no patient id."""
    units = {(m.get("at_threshold", {}).get("operating") or m.get("multiclass", {})).get("resampled", "patients")
             for r in rows for m in [r["metrics"], *([] if test_only else r.get("externals", {}).values())]}
    if units <= {"patients"}:
        return "patients resampled with all their images, within their class"
    return ("images resampled one by one where the file names carry no patient id (such a set's intervals "
            "are too narrow if a patient has several images), patients elsewhere")


def data_check_note(rows: list[dict]) -> str:
    """What the overlap check (overlap.py) found between each evaluation set and the training
    images, as kept in the metrics files, and what it cannot find."""
    notes: list[str] = []
    unchecked: list[str] = []
    for r in rows:
        for name, m in [("test", r["metrics"]), *r.get("externals", {}).items()]:
            block = m.get("data_checks", {"ran": False, "notes": []})
            if not block["ran"]:
                unchecked.append(f"{r['task']} on {name}")
            notes += [n for n in block["notes"] if n not in notes]
    ran = sum(1 + len(r.get("externals", {})) for r in rows) > len(unchecked)
    found = "; ".join(notes) if notes else \
        "no checked set holds a copy of a train or validation image by content" if ran else ""
    return ("Overlap check against the training images (32x32 thumbnails, correlation >= 0.995): "
            + (found + ". " if found else "")
            + (f"Not checked: {', '.join(unchecked)} (evaluated before the check was kept, or its training "
               "images could not be read). " if unchecked else "")
            + "The check finds re-encoded, resized or identical copies; it misses copies that were cropped, "
              "slightly rotated, padded, mirrored or equalised, so a clean check is no proof of disjoint sets.")


SAMPLE_NOTE = ("This run used cxr's bundled sample (100 images per class to train, 50 to test): real images, but "
               "far too few for numbers that mean much. Run the full data set for real ones (cxr download, then "
               "cxr run --data DIR).")


def sites_note(rows: list[dict]) -> str | None:
    """Runs trained on several sites: each site's training images and, per task, each site's
    validation ROC AUC at the kept epoch (the worst site chose it, unless --select-by said otherwise)."""
    parts = []
    for r in rows:
        sites = r["config"].get("sites")
        if not sites:
            continue
        aucs = {k.removeprefix("val_auc_"): v for k, v in r["metrics"]["checkpoint"].items()
                if k.startswith("val_auc_") and k != "val_auc_worst_site"}
        parts.append(f"{r['task']} trained on " + ", ".join(f"{s} {n:,}" for s, n in sites["train"].items())
                     + " images (kept by " + r["config"]["config"].get("select_by", "val_loss") + "; validation ROC AUC "
                     + ", ".join(f"{s} {v:.3f}" for s, v in aucs.items()) + ")")
    return ("Several training sites: " + "; ".join(parts) + ".") if parts else None


def backbone_note(rows: list[dict]) -> str | None:
    """Tasks started from a `cxr pretrain` backbone: where it came from."""
    parts = [f"{r['task']}: {describe_backbone(r['config']['backbone'])}" for r in rows if r["config"].get("backbone")]
    return ("Pretrained backbones: " + "; ".join(parts) + ".") if parts else None


def few_validation_note(rows: list[dict]) -> str | None:
    """Each task whose threshold was chosen on fewer than FEW_VALIDATION_IMAGES validation images."""
    said = [f"{r['task']}'s {w}" for r in rows
            if (w := few_validation_warning(OperatingPoint.from_dict(r["metrics"].get("operating_point"))))]
    return ("Few validation images: " + "; ".join(said) + ".") if said else None


def sample_note(rows: list[dict]) -> str | None:
    return SAMPLE_NOTE if any(r["config"].get("sample") for r in rows) else None


def skipped_note(out: Path) -> str | None:
    """Tasks that were asked for but left out (OUT/skipped.json, e.g. cxr demo offline), with why."""
    left = _read_json(Path(out) / "skipped.json") or {}
    return ("Left out: " + "; ".join(f"{task} ({why})" for task, why in left.items()) + ".") if left else None


ECE_NOTE_MULTICLASS = ("ECE (top-label expected calibration error): over 15 equal-width bins of the highest class "
                       "probability, the share of images in each bin times the gap between the share of them classified "
                       "right and their mean highest probability, summed; 0 is perfect calibration.")


ECE_NOTE = ("ECE (expected calibration error): over 15 equal-width bins of P(pneumonia), the share of images in "
            "each bin times the gap between the bin's observed pneumonia rate and its mean predicted probability, "
            "summed; 0 is perfect calibration. It does not depend on the threshold, so both rows of a task show "
            "the same value; its interval resamples patients like the others.")


CLINICAL = [("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ppv", "PPV"), ("npv", "NPV"),
            ("f1", "F1"), ("balanced_accuracy", "balanced accuracy"), ("roc_auc", "ROC AUC"), ("pr_auc", "PR AUC")]


def clinical_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Every clinical metric, at 0.5 and at the validation-chosen threshold, with 95% bootstrap CIs."""
    head = ["task", "threshold", *(label for _, label in CLINICAL), "ECE (95% CI)"]
    body = []
    for r in rows:
        m = r["metrics"]
        cal = m.get("calibration", {})
        for name, block in m.get("at_threshold", {}).items():
            rule = OperatingPoint.from_dict(m.get("operating_point")).rule or "stored"
            label = "0.5" if name == "0.5" else f"{block['threshold']:.3f} ({rule})"
            ece = _with_ci({"value": cal.get("ece"), "ci": cal.get("ece_ci")})
            body.append([r["task"], label, *(_with_ci(block[k], metric=k) for k, _ in CLINICAL),
                         ece + (f" (T={cal['temperature']:.2f}; before {cal['ece_uncalibrated']:.3f})"
                                if cal.get("temperature", 1.0) != 1.0 else "")])
    return head, body


def _ece_text(rows: list[dict]) -> str:
    """Each task's top-label ECE with its interval (models of more than two classes)."""
    return "; ".join(f"{r['task']} ECE " + _with_ci({"value": r["metrics"]["calibration"]["ece"],
                                                      "ci": r["metrics"]["calibration"].get("ece_ci")})
                     for r in rows)


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def setting(value) -> str:
    """A config value as a reader writes it: yes/no, none, 0.001 rather than True/None/1e-03."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(setting, value)) or "none"
    return str(value)


def _config_text(config: dict) -> str:
    return ", ".join(f"{k} {setting(v)}" for k, v in config["config"].items() if k != "task")


def robustness_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """Per task with a robustness_test.json: each metric clean, mean and worst over the shifts."""
    head = ["task", "metric", "clean", "mean under shifts", "worst shift", "mean, shifts never augmented"]
    body = []
    for r in rows:
        path = Path(r["dir"]) / "robustness_test.json"
        if not path.is_file():
            continue
        rb = json.loads(path.read_text())
        for m in rb["clean"]:
            body.append([r["task"], m, f"{rb['clean'][m]:.3f}", f"{rb['mean'][m]:.3f}", f"{rb['worst'][m]:.3f}",
                         f"{rb['held_out_mean'][m]:.3f}"])
    return (head, body) if body else None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
