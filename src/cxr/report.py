"""Run folders in, `summary.json`, `report.md` and a self-contained `report.html` out.

Reads files only; never trains or evaluates. Every sentence of conclusion is generated from the
numbers in those files, so the text cannot contradict the tables.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path

from .card import describe_adaptation
from .config import CLASSES, PRESETS, RECIPE_CHOSEN_ON
from .errors import CxrError
from .evaluate import external_sets, result_files
from .files import read_csv, write_json, write_text
from .labels import class_names, question

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
        op = m.get("operating_point", {})
        auc = _auc_cell(m)
        where = "" if op.get("chosen_on", "validation") == "validation" else f", on {op['chosen_on']}"
        decision = "argmax (highest probability)" if m.get("threshold") is None else \
            f"{m['threshold']:.3f} ({op.get('rule', 'fixed')}{where})"
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


def sample_note(rows: list[dict]) -> str | None:
    return SAMPLE_NOTE if any(r["config"].get("sample") for r in rows) else None


def skipped_note(out: Path) -> str | None:
    """Tasks that were asked for but left out (OUT/skipped.json, e.g. cxr demo offline), with why."""
    left = _read_json(Path(out) / "skipped.json") or {}
    return ("Left out: " + "; ".join(f"{task} ({why})" for task, why in left.items()) + ".") if left else None


def adaptation_note(rows: list[dict]) -> str | None:
    """What `cxr adapt` changed in each adapted task, on which site images, and which evaluation
    sets are those same images (optimistic)."""
    notes = []
    for r in rows:
        a = r.get("adaptation")
        if not a:
            continue
        op = a["operating_point"]
        sets = [("test", r["metrics"]), *r.get("externals", {}).items()]
        same = [f"{name} ({m['set']['adaptation_images']} of {m['n']} images)" for name, m in sets
                if m.get("set", {}).get("adaptation_images")]
        notes.append(f"{r['task']} is adapted by cxr adapt from {a['source_run']} on {a['date']} (batch norm: "
                     f"{a['batch_norm']}): {describe_adaptation(a)}; threshold {op['threshold']:.3f} ({op['rule']}) "
                     f"and temperature {op['temperature']:.3f}"
                     + (f"; {', '.join(same)} holds images the adaptation was fitted on (same file content), so "
                        "its numbers are optimistic" if same else "") + ".")
    return " ".join(notes) or None


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
            rule = m.get("operating_point", {}).get("rule", "stored")
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


def paired_comparisons(out: Path, rows: list[dict]) -> tuple[dict, str | None]:
    """{set: compare.compare_runs result} between the tasks, on the test split and on every external
    set all of them were evaluated on; (and why not, when the images cannot be read from here)."""
    from .compare import compare_runs, holm_across

    if len(rows) < 2:
        return {}, None
    sets = [None] + sorted(set.intersection(*(set(r["externals"]) for r in rows)))
    try:
        return holm_across({s or "test": compare_runs([Path(r["dir"]) for r in rows], s) for s in sets}), None
    except CxrError as e:
        return {}, f"Paired tests between the tasks were not computed: {e}"


def _difference_sentence(a: str, b: str, comparisons: dict) -> str | None:
    """What the paired test on the test split says about task a against task b, in one clause."""
    result = comparisons.get("test")
    if not result:
        return None
    n = sum(result["images"].values())
    for pair in result["pairs"]:
        names = (Path(pair["a"]).name, Path(pair["b"]).name)
        if set(names) != {a, b}:
            continue
        t = pair["tests"]["accuracy"]
        sign = 1 if names[0] == a else -1
        d, ci = sign * t["difference"], sorted(sign * c for c in t["ci"])
        verdict = ("a difference" if t["p_holm"] < 0.05 else f"no difference measurable on {n} images")
        return (f"against {b}: {100 * d:+.1f} points (95% CI {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}, McNemar "
                f"p = {t['p']:.2g}, Holm-adjusted {t['p_holm']:.2g}): {verdict}")
    return None


def conclusions(rows: list[dict], comparisons: dict | None = None) -> list[str]:
    """Plain sentences, each computed from the numbers it states; "better" only where the paired,
    Holm-corrected test on the same images says so."""
    out = []
    scored = [r for r in rows if r["metrics"]["accuracy"] is not None]
    if len(scored) > 1:
        best = max(r["metrics"]["accuracy"] for r in scored)
        leaders = [r["task"] for r in scored if r["metrics"]["accuracy"] == best]
        clauses = [_difference_sentence(leaders[0], r["task"], comparisons or {}) for r in scored
                   if r["task"] not in leaders]
        clauses = [c for c in clauses if c]
        out.append(f"Highest test accuracy: {' and '.join(leaders)} ({_pct(best)})"
                   + ("; " + "; ".join(clauses) if clauses else "") + ".")
    for r in rows:
        pc = r["metrics"]["per_class"]
        classes = r.get("classes", CLASSES)
        if classes != CLASSES:
            parts = [f"{_pct(pc[c]['accuracy'])} of {c.lower()} images ({pc[c]['correct']}/{pc[c]['total']})"
                     for c in reversed(classes)] if len(classes) == 2 else \
                [f"{_pct(pc[c]['accuracy'])} of {c.lower()} images ({pc[c]['correct']}/{pc[c]['total']})" for c in classes]
            out.append(f"{r['task']} recognises " + ", ".join(parts[:-1]) + f" and {parts[-1]}.")
            continue
        sens, spec = pc["PNEUMONIA"], pc["NORMAL"]
        out.append(f"{r['task']} recognises {_pct(sens['accuracy'])} of pneumonia images ({sens['correct']}/"
                   f"{sens['total']}) and {_pct(spec['accuracy'])} of normal images ({spec['correct']}/{spec['total']}).")
        if sens["accuracy"] is not None and spec["accuracy"] is not None and spec["accuracy"] < sens["accuracy"] - 0.1:
            gap = 100 * (sens["accuracy"] - spec["accuracy"])
            out.append(f"{r['task']} over-calls pneumonia: its NORMAL accuracy is {gap:.1f} points below its "
                       "PNEUMONIA accuracy.")
    lows = []
    for r in rows:
        losses = [float(h["val_loss"]) for h in r["history"]]
        i = min(range(len(losses)), key=losses.__getitem__)
        lows.append((losses[i], r["task"], int(r["history"][i]["epoch"])))
    if len(lows) > 1:
        lows.sort()
        parts = ", ".join(f"{t} {v:.4f} at epoch {e}" for v, t, e in lows)
        out.append(f"Lowest validation loss, best first: {parts}.")
    return out


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


def build_markdown(rows: list[dict], data_summary: str, comparisons: dict | None = None,
                   comparison_note: str | None = None, skipped: str | None = None) -> str:
    head, body = comparison_cells(rows)
    many = len(_classes(rows)) > 2
    parts = [f"# cxr report: {question(_classes(rows))}, ResNet-18", "",
             *([f"**{sample_note(rows)}**", ""] if sample_note(rows) else []),
             *([f"**{skipped}**", ""] if skipped else []),
             "Test metrics of each task's kept epoch (lowest validation loss, highest validation AUC or the last, "
             "as the task says; validation is split from train by patient). "
             + ("The decision is the class of highest probability." if many else
                f"Decision threshold on P({_classes(rows)[1]}) set by the task's rule (Youden's J on validation, or "
                "0.5) and stored in the checkpoint."), "",
             markdown_table(head, body), "", *[f"- {s}" for s in conclusions(rows, comparisons)], "",
             *_comparison_markdown(comparisons, comparison_note),
             f"## Every evaluation set (threshold of the task's rule; 95% bootstrap intervals, {resampled_units(rows)})",
             "",
             markdown_table(*evaluation_cells(rows)), "",
             *(["Each class against the rest:", "", markdown_table(*per_class_cells(rows)), ""] if many else []),
             *(["## The pneumonia reading (P(PNEUMONIA) = 1 - P(NORMAL))", "", READING_NOTE, "",
                markdown_table(*reading_cells(rows)), ""] if reading_cells(rows) else []),
             data_check_note(rows), "",
             *([external_note(rows), ""] if external_note(rows) else []),
             *([adaptation_note(rows), ""] if adaptation_note(rows) else []),
             *([f"## Clinical metrics (test, 95% bootstrap intervals, 1,000 resamples: {resampled_units(rows, True)})",
                "", markdown_table(*clinical_cells(rows)), "", ECE_NOTE, ""] if not many else
               [f"Calibration (test): {_ece_text(rows)}. {ECE_NOTE_MULTICLASS}", ""]),
             "![validation loss per task](figures/compare_loss.png)", "",
             *(["## Robustness to acquisition shifts (test split, `cxr robustness`)", "",
                markdown_table(*robustness_cells(rows)), ""] if robustness_cells(rows) else []),
             "## Data", "", "```", data_summary, "```", "", "## Tasks", ""]
    for r in rows:
        parts += [f"### {r['task']}", "", f"Config: {_config_text(r['config'])}", ""]
        if r.get("kfold_table"):
            parts += ["Fitting at the site, measured by k folds of its patients (`cxr adapt --evaluate`):", "",
                      r["kfold_table"].strip(), ""]
        parts += [f"![{title}]({r['task']}/figures/{name})" for name, title in task_figures(r)
                  if (Path(r["dir"]) / "figures" / name).is_file()]
        parts.append("")
    return "\n".join(parts) + "\n"


def _markdown_table_cells(text: str) -> tuple[list[str], list[list[str]], str]:
    """(head, body, the text after the table) of a markdown table such as adapt_evaluation.md."""
    lines = text.strip().splitlines()
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines if ln.startswith("|")]
    rest = " ".join(ln for ln in lines if ln.strip() and not ln.startswith("|"))
    return rows[0], [r for r in rows[1:] if not set("".join(r)) <= set("-: ")], rest


def _comparison_markdown(comparisons: dict | None, note: str | None) -> list[str]:
    from .compare import comparison_table

    if note:
        return [note, ""]
    parts = []
    for name, result in (comparisons or {}).items():
        parts += [f"## Is the difference real? Paired tests on {name}", "", comparison_table(result), ""]
    return parts


def _comparison_html(comparisons: dict | None, note: str | None) -> list[str]:
    from .compare import comparison_table

    if note:
        return [f"<p>{html.escape(note)}</p>"]
    parts = []
    for name, result in (comparisons or {}).items():
        head, body, rest = _markdown_table_cells(comparison_table(result))
        parts += [f"<h2>Is the difference real? Paired tests on {html.escape(name)}</h2>",
                  f"<p>{html.escape(rest)} Each task at its own stored threshold; A - B on the same images.</p>",
                  _html_table(head, body)]
    return parts


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _html_table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


# a click enlarges a figure to the window (and a second click, or Escape, puts it back)
ZOOM = ("<script>document.addEventListener('click', e => { if (e.target.tagName === 'IMG') "
        "e.target.classList.toggle('big'); }); document.addEventListener('keydown', e => { if (e.key === 'Escape') "
        "document.querySelectorAll('img.big').forEach(i => i.classList.remove('big')); });</script>")

_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;display:block;max-width:100%;overflow-x:auto}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}figure{display:inline-block;margin:0.5em;vertical-align:top}
img{max-width:100%;border:1px solid #eee;cursor:zoom-in}figcaption{font-size:0.9em;color:#555}
img.big{position:fixed;inset:0;margin:auto;max-width:98vw;max-height:98vh;z-index:10;cursor:zoom-out;
background:#fff;box-shadow:0 0 0 100vmax rgba(0,0,0,0.6)}
pre{background:#f7f7f7;padding:0.8em;overflow-x:auto}.task{border-top:2px solid #ddd;margin-top:2em}"""


def build_html(rows: list[dict], data_summary: str, out: Path, comparisons: dict | None = None,
               comparison_note: str | None = None, skipped: str | None = None) -> str:
    head, body = comparison_cells(rows)
    many = len(_classes(rows)) > 2
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>cxr report</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>cxr report: {html.escape(question(_classes(rows)))}, ResNet-18</h1>",
             *([f"<p class='sample'><strong>{html.escape(sample_note(rows))}</strong></p>"] if sample_note(rows) else []),
             *([f"<p class='skipped'><strong>{html.escape(skipped)}</strong></p>"] if skipped else []),
             f"<p>Generated {stamp} from the files in this folder. Test metrics are those of each task's kept "
             "epoch (lowest validation loss, highest validation AUC or the last, as the task says; validation is "
             "split from train by patient), "
             + ("decided by the highest class probability.</p>" if many else "at the decision threshold of the "
                "task's rule (Youden's J on validation, or 0.5).</p>"),
             "<h2>Comparison</h2>", _html_table(head, body),
             "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in conclusions(rows, comparisons)) + "</ul>",
             *_comparison_html(comparisons, comparison_note),
             *([f"<h2>Clinical metrics</h2><p>Test split; 95% bootstrap intervals (1,000 resamples: "
                f"{resampled_units(rows, True)}; a patient's images move together, since they are not independent); "
                "each metric at threshold 0.5 and at the stored threshold.</p>",
                _html_table(*clinical_cells(rows)), f"<p>{html.escape(ECE_NOTE)}</p>"] if not many else []),
             "<h2>Every evaluation set</h2><p>Each task on the test split and every external set, at the "
             f"stored threshold; 95% bootstrap intervals, {resampled_units(rows)}.</p>",
             _html_table(*evaluation_cells(rows))]
    if many:
        parts += ["<h3>Each class against the rest</h3>", _html_table(*per_class_cells(rows)),
                  f"<p>Calibration (test): {html.escape(_ece_text(rows))}. {html.escape(ECE_NOTE_MULTICLASS)}</p>"]
    if reading_cells(rows):
        parts += ["<h2>The pneumonia reading</h2>", f"<p>{html.escape(READING_NOTE)}</p>",
                  _html_table(*reading_cells(rows))]
    parts.append(f"<p class='checks'>{html.escape(data_check_note(rows))}</p>")
    if external_note(rows):
        parts.append(f"<p>{html.escape(external_note(rows))}</p>")
    if adaptation_note(rows):
        parts.append(f"<p class='adaptation'>{html.escape(adaptation_note(rows))}</p>")
    compare = out / "figures" / "compare_loss.png"
    if compare.is_file():
        parts.append(_img(compare, "Validation loss of every task"))
    robust = robustness_cells(rows)
    if robust:
        parts += ["<h2>Robustness to acquisition shifts</h2><p>Test split under brightness, contrast, gamma, "
                  "stretching, blur, noise, JPEG, resampling, zoom and rotation shifts at three severities "
                  "(<code>cxr robustness</code>), at the stored threshold.</p>", _html_table(*robust)]
    parts += ["<h2>Data</h2>", f"<pre>{html.escape(data_summary)}</pre>"]
    for r in rows:
        m = r["metrics"]
        cfg = r["config"]["config"]
        parts += [f"<section class='task'><h2>{html.escape(r['task'])}</h2>",
                  _html_table(["setting", "value"], [[k.replace("_", " "), setting(v)] for k, v in cfg.items()]),
                  _html_table(["class", "accuracy", "correct", "total"],
                              [[c, _pct(m["per_class"][c]["accuracy"]), str(m["per_class"][c]["correct"]),
                                str(m["per_class"][c]["total"])] for c in r.get("classes", CLASSES)])]
        if r.get("kfold_table"):
            head, body, rest = _markdown_table_cells(r["kfold_table"])
            parts += ["<h3>Fitting at the site, measured by k folds of its patients</h3>", _html_table(head, body),
                      f"<p>{html.escape(rest)}</p>"]
        for name, title in task_figures(r):
            path = Path(r["dir"]) / "figures" / name
            if path.is_file():
                parts.append(_img(path, f"{r['task']}: {title}"))
        parts.append("</section>")
    parts += [ZOOM, "</body></html>"]
    return "\n".join(parts)


def _seed_spread_table(comparisons: dict) -> list[str]:
    """Markdown: per pair and set, the spread of the per-seed differences (A seed K - B seed K)."""
    lines = ["| A | B | set | metric | seeds | mean | sd | min | max |", "|---|---|---|---|---|---|---|---|---|"]
    for name, result in comparisons.items():
        for pair in result["pairs"]:
            d = pair["seed_differences"]
            for metric in ("accuracy", "roc_auc"):
                c, pct = d[metric], 1 if metric == "roc_auc" else 100
                fmt = (lambda x: f"{x:+.3f}") if metric == "roc_auc" else (lambda x: f"{pct * x:+.1f}")
                lines.append(f"| {pair['a']} | {pair['b']} | {name} | {metric} | {len(d['seeds'])} | {fmt(c['mean'])} | "
                             f"{abs(pct * c['sd']):.3g} | {fmt(c['min'])} | {fmt(c['max'])} |")
    return lines


def write_seeded_report(out: Path, seeded: dict[str, dict[int, Path]]) -> dict:
    """The report of a multi-seed output folder (seeds.py): it leads with mean ± sd over seeds and
    the paired tests on seed-averaged probabilities; each seed's own tables follow, and the
    figures of each task's first seed (every seed's are in its folder)."""
    from .compare import holm_across
    from .seeds import aggregate, aggregate_table, seed_comparisons, seed_sentences

    out = Path(out)
    rows = []
    for task, by_seed in seeded.items():
        for seed, d in sorted(by_seed.items()):
            row = task_row(d)
            row.update(task=f"{task} seed{seed}", dir=str(d), base=task, first=seed == min(by_seed))
            rows.append(row)
    agg = aggregate(seeded)
    write_json(out / "aggregate.json", agg)
    comparisons, note = {}, None
    if len(seeded) > 1:
        sets = [None] + sorted(set.intersection(*(set(r["externals"]) for r in rows)))
        try:
            comparisons = holm_across({s or "test": seed_comparisons(seeded, s) for s in sets})
            write_json(out / "comparisons.json", comparisons)
        except CxrError as e:
            note = f"Paired tests between the tasks were not computed: {e}"
    seeds = sorted({k for by_seed in seeded.values() for k in by_seed})
    timings = _read_json(out / "timings.json") or {}
    train_s = sum(v for t in timings.values() if isinstance(t, dict) for k, v in t.items() if k.endswith(": train"))
    lead = (f"Every task trained once per seed ({', '.join(map(str, seeds))}); each seed is a complete run in "
            "OUT/<task>/seed<K>/ with its own patient split, init and batch order. Mean ± sd (n - 1) [min-max] "
            "over seeds at each task's stored threshold"
            + (f"; training took {train_s / 60:.1f} min in all" if train_s else "") + ".")
    classes = _classes(rows)
    titles = {} if classes == CLASSES else {"sensitivity": f"sensitivity ({classes[1]} recall)",
                                            "specificity": f"specificity ({classes[0]} recall)"}
    table = aggregate_table(agg, titles=titles) if len(classes) <= 2 else aggregate_table(
        agg, ("accuracy", "balanced_accuracy", "roc_auc", *(f"sensitivity_{c.lower()}" for c in classes),
              *(("pneumonia_accuracy", "pneumonia_roc_auc") if "NORMAL" in classes else ())))
    sentences = seed_sentences(agg, comparisons)
    spread = _seed_spread_table(comparisons) if comparisons else []
    data_summary = rows[0]["config"].get("data_summary", "") if rows else ""
    shown = [r for r in rows if r["first"]]
    md = [f"# cxr report: {question(classes)}, ResNet-18, several seeds", "",
          *([f"**{sample_note(rows)}**", ""] if sample_note(rows) else []), lead, "", table, "",
          *[f"- {x}" for x in sentences], "", *_comparison_markdown(comparisons, note),
          *(["Per-seed differences (A seed K minus B seed K):", "", *spread, ""] if spread else []),
          "## Each seed", "", markdown_table(*comparison_cells(rows)), "",
          markdown_table(*evaluation_cells(rows)), "", data_check_note(rows), "",
          "## Data", "", "```", data_summary, "```", "", "## Figures (each task's first seed)", ""]
    for r in shown:
        md += [f"### {r['task']}", ""] + [f"![{title}]({Path(r['dir']).relative_to(out)}/figures/{name})"
                                          for name, title in task_figures(r)
                                          if (Path(r["dir"]) / "figures" / name).is_file()] + [""]
    html_parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>cxr report</title>"
                  f"<style>{_CSS}</style></head><body>",
                  f"<h1>cxr report: {html.escape(question(classes))}, ResNet-18, several seeds</h1>", *([f"<p class='sample'><strong>{html.escape(sample_note(rows))}</strong></p>"]
                                  if sample_note(rows) else []),
                  f"<p>{html.escape(lead)}</p>", _html_table(*_markdown_table_cells(table)[:2]),
                  "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in sentences) + "</ul>",
                  *_comparison_html(comparisons, note)]
    if spread:
        html_parts += ["<p>Per-seed differences (A seed K minus B seed K):</p>",
                       _html_table(*_markdown_table_cells("\n".join(spread))[:2])]
    html_parts += ["<h2>Each seed</h2>", _html_table(*comparison_cells(rows)), _html_table(*evaluation_cells(rows)),
                   f"<p class='checks'>{html.escape(data_check_note(rows))}</p>",
                   "<h2>Data</h2>", f"<pre>{html.escape(data_summary)}</pre>"]
    for r in shown:
        html_parts.append(f"<section class='task'><h2>{html.escape(r['task'])}</h2>")
        html_parts += [_img(Path(r["dir"]) / "figures" / name, f"{r['task']}: {title}") for name, title in
                       task_figures(r) if (Path(r["dir"]) / "figures" / name).is_file()]
        html_parts.append("</section>")
    html_parts += [ZOOM, "</body></html>"]
    summary = {"aggregate": agg, "seeds": seeds,
               "runs": {r["task"]: r["metrics"] for r in rows}, **({"timings": timings} if timings else {})}
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", "\n".join(md) + "\n")
    write_text(out / "report.html", "\n".join(html_parts))
    return summary


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_report(out: Path, tasks: list[str] | None = None) -> dict:
    """Write OUT/summary.json (task -> metrics.json content, and "external": task -> set name ->
    metrics_NAME.json content when external sets were evaluated; "timings": OUT/timings.json, written
    by `cxr run`), OUT/comparisons.json (paired tests between the tasks, compare.py) when there are
    several tasks, OUT/report.md and OUT/report.html."""
    out = Path(out)
    if tasks is None:
        from .seeds import seeded_runs

        seeded = seeded_runs(out)
        if seeded and not any((out / t / "metrics.json").is_file() for t in seeded):
            return write_seeded_report(out, seeded)
    tasks = tasks or find_tasks(out)
    rows = []
    for t in tasks:
        row = task_row(out / t)
        row["dir"] = str(out / t)
        rows.append(row)
    summary = {r["task"]: r["metrics"] for r in rows}
    if any(r["externals"] for r in rows):  # "external" is no task name, so it cannot collide
        summary["external"] = {r["task"]: r["externals"] for r in rows}
    if (out / "timings.json").is_file():  # where `cxr run` spent its time
        summary["timings"] = json.loads((out / "timings.json").read_text())
    data_summary = rows[0]["config"].get("data_summary", "") if rows else ""
    comparisons, note = paired_comparisons(out, rows)
    if comparisons:  # what the report's conclusions rest on
        write_json(out / "comparisons.json", comparisons)
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", build_markdown(rows, data_summary, comparisons, note, skipped_note(out)))
    write_text(out / "report.html", build_html(rows, data_summary, out, comparisons, note, skipped_note(out)))
    return summary
