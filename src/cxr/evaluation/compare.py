"""`cxr compare RUN_A RUN_B [...]`: are the differences between trained runs real?

Reads each run's predictions of one evaluation set (its test split, or an external set NAME),
checks that every run predicted the very same images (SHA-256 of each file's bytes, and the same
labels), and for every pair of runs writes the paired tests of `paired.py`: DeLong for the ROC AUC;
McNemar's exact test and a patient-level paired bootstrap interval for accuracy, sensitivity and
specificity, each run at its own stored threshold. Holm's correction runs across every p-value of
the comparison. Nothing is trained or evaluated: files in, `comparisons.json` and `.md` out.

`cxr adapt --evaluate` folders compare the same way on their site's k-fold held-out predictions
(`--variant`): two starting points fine-tuned at a site, paired on the very same held-out images.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np

from ..config import CLASSES
from ..data.dataset import patient_id
from ..data.labels import probability_key, run_classes
from ..errors import CxrError
from ..files import write_json, write_text
from .metrics import paired_difference
from .paired import apply_holm, delong, mcnemar_exact

N_BOOTSTRAP = 2000
# cxr adapt --evaluate's pooled held-out predictions, one row per image, variant and draw (adaptation/kfold.py)
ADAPT_PREDICTIONS = "adapt_predictions.csv"
THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity")


def read_evaluation(eval_dir: Path, variant: str | None) -> dict:
    """One `cxr adapt --evaluate` folder's pooled held-out predictions of the site, for one variant
    (all the site's other folds fitted each model): paths, labels, P(PNEUMONIA), each image's threshold
    (its fold's). Two evaluations of the same site with the same --seed hold the same folds, so the
    pairing compares two starting points on the very same held-out images."""
    pred_file = eval_dir / ADAPT_PREDICTIONS
    if not pred_file.is_file():
        raise CxrError(f"{eval_dir}: no {ADAPT_PREDICTIONS} (written by cxr adapt --evaluate since this release); "
                       "run the evaluation again")
    with open(pred_file, newline="") as f:
        rows = list(csv.DictReader(f))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    if variant not in variants:
        listing = "; ".join(f"'{v}'" for v in variants)
        raise CxrError(f"{eval_dir} is a cxr adapt --evaluate folder: name the variant to compare with --variant "
                       f"(one of {listing})" if variant is None else
                       f"{eval_dir}: no variant '{variant}' (it holds {listing})")
    rows = [r for r in rows if r["variant"] == variant]
    sizes = list(dict.fromkeys(r["per_class"] for r in rows))
    size = "all" if "all" in sizes else sizes[-1]  # all of the other folds when measured, else the largest draw
    rows = [r for r in rows if r["per_class"] == size]
    return {"run": f"{eval_dir} ({variant})", "task": variant, "paths": [r["path"] for r in rows],
            "classes": CLASSES, "patients": [r["patient"] for r in rows],
            "y": np.array([CLASSES.index(r["true_label"]) for r in rows]),
            "prob": np.array([float(r["prob_pneumonia"]) for r in rows]),
            "threshold": np.array([float(r["threshold"]) for r in rows])}


def read_run(run_dir: Path, set_name: str | None, variant: str | None = None) -> dict:
    """One run's predictions of the set: paths, labels, P(PNEUMONIA), threshold. A `cxr adapt
    --evaluate` folder gives its k-fold held-out predictions of the site instead (`variant`)."""
    run_dir = Path(run_dir)
    if (run_dir / "adapt_evaluation.json").is_file():
        if set_name:
            raise CxrError(f"{run_dir} is a cxr adapt --evaluate folder: it holds its site's k-fold predictions "
                           f"only, not a set {set_name}; leave out --set")
        return read_evaluation(run_dir, variant)
    suffix = f"_{set_name}" if set_name else ""
    pred_file, metrics_file = run_dir / f"predictions{suffix}.csv", run_dir / f"metrics{suffix}.json"
    if not pred_file.is_file() or not metrics_file.is_file():
        what = f"the external set {set_name}" if set_name else "its test split"
        hint = f"cxr evaluate {run_dir} --name {set_name} --data DIR" if set_name else f"cxr evaluate {run_dir}"
        raise CxrError(f"{run_dir}: no {pred_file.name} and {metrics_file.name}: the run was not evaluated on "
                       f"{what}; run {hint} first")
    with open(pred_file, newline="") as f:
        rows = list(csv.DictReader(f))
    metrics = json.loads(metrics_file.read_text())
    classes = run_classes(run_dir)
    if len(classes) > 2:
        if "NORMAL" not in classes or "pneumonia_reading" not in metrics:
            raise CxrError(f"{run_dir}: a {len(classes)}-class run ({', '.join(classes)}) without a pneumonia reading; "
                           "the paired tests (McNemar, DeLong) compare two-class decisions")
        # a three-way run is compared through its pneumonia reading, P(PNEUMONIA) = 1 - P(NORMAL)
        task = run_dir.parent.name if run_dir.name.startswith("seed") else run_dir.name  # OUT/<task>/seed<K>
        return {"run": str(run_dir), "task": task, "paths": [r["path"] for r in rows], "patients": _patients(rows),
                "classes": CLASSES, "reading": True,
                "y": np.array([int(r["true_label"] != "NORMAL") for r in rows]),
                "prob": np.array([float(r["prob_pneumonia"]) for r in rows]),
                "threshold": float(metrics["pneumonia_reading"]["threshold"])}
    return {"run": str(run_dir), "task": run_dir.name, "paths": [r["path"] for r in rows], "classes": classes,
            "patients": _patients(rows),
            "y": np.array([classes.index(r["true_label"]) for r in rows]),
            "prob": np.array([float(r[probability_key(classes[1])]) for r in rows]),
            "threshold": float(metrics["threshold"])}


def _patients(rows: list[dict]) -> list[str]:
    """Each image's patient as evaluation grouped it (the `patient` column: file name, manifest or
    --patients table); files written before the column existed fall back to the file name."""
    return [r.get("patient") or patient_id(Path(r["path"]).name) for r in rows]


def resampling_unit(paths: list[str], patients: list[str]) -> str:
    """What the paired bootstrap resamples, said truthfully: an image whose patient is its own file
    name carries no patient id (dataset.patient_id) and is resampled alone."""
    alone = sum(1 for p, g in zip(paths, patients) if g == Path(p).stem)
    if alone == 0:
        return "patients with all their images, stratified by class"
    if alone == len(paths):
        return ("images one by one, stratified by class (no patient ids: the file names carry none and no "
                "patient table was given to cxr evaluate --patients)")
    return (f"patients with all their images, stratified by class; {alone} of {len(paths)} images carry no patient "
            "id and count as their own patient")


def same_question(runs: list[dict]) -> str | None:
    """Refuse runs that answer different questions; a note when three-way runs are compared through
    their pneumonia reading."""
    kinds = {r["classes"] for r in runs}
    if len(kinds) > 1:
        listing = "; ".join(f"{r['run']}: {'/'.join(r['classes'])}" for r in runs)
        raise CxrError(f"the runs answer different questions ({listing}); compare runs of one label set (a "
                       "three-way run counts as NORMAL/PNEUMONIA through its pneumonia reading)")
    readers = list(dict.fromkeys(r["task"] for r in runs if r.get("reading")))
    return (f"three-way runs ({', '.join(readers)}) enter through their pneumonia reading, P(PNEUMONIA) = 1 - "
            "P(NORMAL) at 0.5") if readers else None


def digests(paths: list[str], where: str, known: dict[Path, str] | None = None) -> list[str]:
    """SHA-256 of each image file (`known`: digests already read, by resolved path, filled in);
    a missing file ends in one line naming it."""
    known = {} if known is None else known
    out = []
    for p in paths:
        key = Path(p).resolve()
        if key not in known:
            try:
                known[key] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            except OSError:
                raise CxrError(f"{p}: listed in {where} but not readable from here; run cxr compare from the folder "
                               "the runs were evaluated in (paths are as they were given), or restore the "
                               "file") from None
        out.append(known[key])
    return out


def _keys(paths: list[str], where: str, known: dict[Path, str]) -> list[str]:
    """Each image's content key: its SHA-256, numbered among byte-identical copies (data sets hold
    some: official_test_half has four pairs), in the order of the file names."""
    keys, seen = [""] * len(paths), {}
    for i in sorted(range(len(paths)), key=lambda i: Path(paths[i]).name):
        d = digests([paths[i]], where, known)[0]
        seen[d] = seen.get(d, 0) + 1
        keys[i] = f"{d}#{seen[d]}"
    return keys


def align(runs: list[dict], set_name: str | None) -> list[str]:
    """Reorder every run's rows to the first run's images, matched by content; refuse runs that did
    not predict exactly the same images with the same labels. Returns each image's patient."""
    first, known = runs[0], {}  # every file is read once, however many runs list it
    keys = _keys(first["paths"], first["run"], known)
    where = {k: i for i, k in enumerate(keys)}
    for r in runs[1:]:
        theirs = _keys(r["paths"], r["run"], known)
        if sorted(theirs) != sorted(keys):
            missing = len(set(keys) ^ set(theirs))
            raise CxrError(f"{r['run']}: evaluated on other images than {first['run']} ({missing} differ, "
                           f"set {set_name or 'test'}); compare runs evaluated on the very same images")
        order = np.argsort([where[k] for k in theirs])
        r.update(paths=[r["paths"][i] for i in order], y=r["y"][order], prob=r["prob"][order],
                 patients=[r["patients"][i] for i in order],
                 threshold=r["threshold"][order] if np.ndim(r["threshold"]) else r["threshold"])
        if not np.array_equal(r["y"], first["y"]):
            raise CxrError(f"{r['run']}: the same images carry other labels than in {first['run']}; compare runs "
                           "evaluated against the same labels")
    return list(first["patients"])


def compare_pair(a: dict, b: dict, groups: list[str], seed: int = 0) -> dict:
    """Every paired test of run A against run B on the same images (A minus B)."""
    y = a["y"]
    boot = paired_difference(y, a["prob"], a["threshold"], b["prob"], b["threshold"], N_BOOTSTRAP, seed,
                             groups=groups)
    ok_a, ok_b = (a["prob"] >= a["threshold"]) == y, (b["prob"] >= b["threshold"]) == y
    classes = a.get("classes", CLASSES)
    if len(np.unique(y)) == 2:
        tests = {"roc_auc": {**delong(y, a["prob"], b["prob"]), "test": "DeLong"}}
    else:  # one class: no ranking to compare
        tests = {"roc_auc": {"difference": None, "ci": None, "p": None, "test": "DeLong",
                             "undefined": f"ROC AUC needs both classes; the set holds {classes[int(y[0])]} images only"
                             if len(y) else "no images"}}
    for metric, rows in (("accuracy", np.ones_like(y, bool)), ("sensitivity", y == 1), ("specificity", y == 0)):
        if not rows.any():
            tests[metric] = {"difference": None, "ci": None, "p": None, "test": "McNemar exact",
                             "undefined": f"no {classes[1 if metric == 'sensitivity' else 0]} images in the set"}
            continue
        tests[metric] = {"difference": boot[metric]["value"], "ci": boot[metric]["ci"],
                         **mcnemar_exact(ok_a[rows], ok_b[rows]), "test": "McNemar exact"}
    return {"a": a["run"], "b": b["run"], "tests": tests}


def _threshold(value) -> float | str:
    if np.ndim(value):  # a k-fold evaluation: each fold's own
        return f"per fold, {float(np.min(value)):.3f}-{float(np.max(value)):.3f}"
    return value


def compare_runs(run_dirs: list[Path], set_name: str | None = None, out: Path | None = None, seed: int = 0,
                 variant: str | None = None) -> dict:
    """Paired comparisons of every pair of runs on one evaluation set (or of `cxr adapt --evaluate`
    folders on their site's held-out folds, `variant` of each); with `out`, writes
    OUT/comparisons.json and comparisons.md. Holm's correction across all p-values."""
    if len(run_dirs) < 2:
        raise CxrError("cxr compare needs at least two run folders")
    runs = [read_run(r, set_name, variant) for r in run_dirs]
    reading = same_question(runs)
    groups = align(runs, set_name)
    pairs = [compare_pair(a, b, groups, seed) for a, b in itertools.combinations(runs, 2)]
    flat = [t for p in pairs for t in p["tests"].values()]
    apply_holm(flat)
    y = runs[0]["y"]
    result = {"set": set_name or "test", "images": {c: int((y == i).sum()) for i, c in enumerate(runs[0]["classes"])},
              "patients": len(set(groups)), "runs": [{"run": r["run"], "threshold": _threshold(r["threshold"])} for r in runs],
              "pairs": pairs, "bootstrap": {"resamples": N_BOOTSTRAP, "unit": resampling_unit(runs[0]["paths"], groups), "seed": seed},
              "correction": f"Holm across all {len(flat)} p-values of this comparison",
              **({"reading": reading} if reading else {})}
    if out is not None:
        write_json(Path(out) / "comparisons.json", result)
        write_text(Path(out) / "comparisons.md", comparison_table(result) + "\n")
    return result


def holm_across(comparisons: dict[str, dict]) -> dict[str, dict]:
    """Holm's correction again, across every p-value of every set of one report (the test split
    and each external set), so that the report's family is all the comparisons it makes."""
    flat = [t for result in comparisons.values() for p in result["pairs"] for t in p["tests"].values()]
    apply_holm(flat)
    for result in comparisons.values():
        result["correction"] = (f"Holm across all {len(flat)} p-values of this report ({len(comparisons)} "
                                f"evaluation set{'s' if len(comparisons) > 1 else ''})"
                                + (" on seed-averaged probabilities, each task at the mean of its seeds' thresholds"
                                   if result.get("averaged_over_seeds") else ""))
    return comparisons


def _verdict(t: dict, alpha: float = 0.05) -> str:
    if t["p_holm"] is None:
        return f"undefined: {t.get('undefined', 'no p-value')}"
    return "differ" if t["p_holm"] < alpha else "no difference measurable"


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def comparison_table(result: dict) -> str:
    """A markdown table: one row per pair and metric, A minus B with its interval and both p-values."""
    lines = [f"Set {result['set']}: " + ", ".join(f"{k} {v}" for k, v in result["images"].items())
             + f" images, {result['patients']} patients"
             + (f" (bootstrap unit: {result['bootstrap']['unit']})" if "bootstrap" in result else "")
             + f". {result['correction']}."
             + (f" Compared on the pneumonia question: {result['reading']}." if result.get("reading") else ""), "",
             "| A | B | metric | A - B | 95% CI | test | p | p (Holm) | reading |", "|---|---|---|---|---|---|---|---|---|"]
    for p in result["pairs"]:
        for metric, t in p["tests"].items():
            ci = t["ci"]
            diff = "n/a" if t["difference"] is None else f"{t['difference']:+.3f}"
            lines.append(f"| {p['a']} | {p['b']} | {metric} | {diff} | "
                         + (f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "n/a")
                         + f" | {t['test']} | {_p(t['p'])} | {_p(t['p_holm'])} | {_verdict(t)} |")
    return "\n".join(lines)
