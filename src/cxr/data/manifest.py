"""CSV manifests: a data set described by a file instead of the folder layout.

    path,label,patient,split
    images/0001.png,NORMAL,p17,train
    /data/other/0002.dcm.png,PNEUMONIA,p18,test

`path` (relative to the manifest's folder, or absolute) and `label` are required; `patient`
defaults to the id in the file name (as for folders); `split` is one of train, val, test. Without
a `split` column (or with it empty) the rows are split by patient, stratified by class: test
first, then validation, each about `val_ratio` of the images. Labels are the class names
NORMAL and PNEUMONIA, or any names mapped onto them with `classes` ("normal=NORMAL,
opacity=PNEUMONIA"). Every problem is found before anything is decoded and reported in one line
naming the file, the rows and the fix: missing columns, missing files, unknown labels or splits,
duplicated paths, a patient in two splits.

`with_patients` reads a table of patient ids for a folder of images whose names carry none
(`--patients CSV` of `cxr evaluate` and `cxr adapt`).

`write_manifest` makes one from a folder in the usual layout (`cxr manifest`); a `val/` folder's
rows are listed as train, as the folder route folds them in, so both routes give the same splits.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

from ..config import CLASSES
from ..errors import DataError
from ..files import write_csv
from .dataset import Sample, patient_id, split_by_patient
from .folders import list_split
from .labels import class_names, relabel

SPLITS = ("train", "val", "test")
MAX_LISTED = 5


def parse_classes(text: str | None) -> dict[str, str]:
    """{"normal": "NORMAL", ...} from "normal=NORMAL,opacity=PNEUMONIA" (names map to cxr's classes)."""
    mapping = {c: c for c in CLASSES}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, target = part.partition("=")
        if not sep or target.strip() not in CLASSES:
            raise DataError(f"--classes {text!r}: write NAME=CLASS pairs with CLASS among {', '.join(CLASSES)}, "
                            "e.g. normal=NORMAL,opacity=PNEUMONIA")
        mapping[name.strip()] = target.strip()
    return mapping


def _listing(items: list[str]) -> str:
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return "; ".join(items[:MAX_LISTED]) + more


def read_manifest(path: Path, classes: dict[str, str] | None = None) -> tuple[dict[str, list[Sample]], list[Sample]]:
    """({split: samples} for the rows that name a split, the rows that do not), all checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; pass a CSV with columns path,label[,patient][,split]")
    classes = classes or {c: c for c in CLASSES}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise DataError(f"{path}: no {' or '.join(missing)} column (found: {', '.join(columns) or 'nothing'}); "
                            "the first line must name the columns path,label[,patient][,split]")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    if not rows:
        raise DataError(f"{path}: no rows under the header; list one image per line")
    base = path.parent
    problems: dict[str, list[str]] = {"missing": [], "label": [], "split": [], "duplicate": []}
    seen: dict[Path, int] = {}
    by_split: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    unsplit: list[Sample] = []
    for line, row in enumerate(rows, start=2):
        file = Path(row["path"])
        file = file if file.is_absolute() else base / file
        if not row["path"] or not file.is_file():
            problems["missing"].append(f"line {line}: {row['path'] or '(empty)'}")
        key = file.resolve()
        if key in seen:
            problems["duplicate"].append(f"lines {seen[key]} and {line}: {row['path']}")
        seen.setdefault(key, line)
        label = classes.get(row["label"])
        if label is None:
            problems["label"].append(f"line {line}: {row['label'] or '(empty)'}")
        split = row.get("split", "").lower()
        if split and split not in SPLITS:
            problems["split"].append(f"line {line}: {row['split']}")
        if label is None or (split and split not in SPLITS):
            continue
        sample = Sample(file, CLASSES.index(label), row.get("patient") or patient_id(file.name),
                        row.get("subtype") or None, row.get("site") or None)
        (by_split[split] if split else unsplit).append(sample)
    fixes = {"missing": ("files not found", "fix the paths (relative to the manifest's folder) or drop the rows"),
             "label": ("unknown labels", f"use {' or '.join(CLASSES)}, or map names with --classes "
                                         "name=NORMAL,other=PNEUMONIA"),
             "split": ("unknown splits", f"use {', '.join(SPLITS)}, or leave it empty for the patient split"),
             "duplicate": ("paths listed twice", "keep one row per image")}
    for kind, items in problems.items():
        if items:
            what, fix = fixes[kind]
            raise DataError(f"{path}: {len(items)} {what} ({_listing(items)}); {fix}")
    owners: dict[str, set[str]] = {}
    for split, samples in by_split.items():
        for s in samples:
            owners.setdefault(s.patient, set()).add(split)
    for s in unsplit:
        owners.setdefault(s.patient, set()).add("(no split)")
    shared = sorted(f"{p} ({', '.join(sorted(where))})" for p, where in owners.items() if len(where) > 1)
    if shared:
        raise DataError(f"{path}: {len(shared)} patients in two splits ({_listing(shared)}); a patient's images "
                        "must all be in one split: fix their split column")
    return by_split, unsplit


# Several sites: the kept epoch is the one the worst site's validation ROC AUC prefers, so a small
# site's validation share must be large enough to rank epochs. At 10% nih_half's 393 fitting images (fold 0) gave 40
# validation images, whose AUC jumped 0.555-0.656 from epoch to epoch (Another hospital, one fold).
SITE_MIN_VAL_PER_CLASS = 50  # a site's validation holds at least this many images of its rarer class...
SITE_MAX_VAL_RATIO = 0.3     # ...unless that would take more than this share of the site from training


def site_val_ratio(samples: list[Sample], ratio: float) -> float:
    """The validation share of one site of several: `ratio`, raised so that the rarer class gets
    SITE_MIN_VAL_PER_CLASS images, at most SITE_MAX_VAL_RATIO (never below `ratio`)."""
    rarer = min(Counter(s.label for s in samples).values(), default=0)
    if rarer == 0:
        return ratio
    return max(ratio, min(SITE_MAX_VAL_RATIO, SITE_MIN_VAL_PER_CLASS / rarer))


def _per_site(samples: list[Sample], ratio: float, seed: int, small_sites: bool = False
              ) -> tuple[list[Sample], list[Sample]]:
    """split_by_patient within each site (a `site` column: the split is stratified on site and
    class); one split of all rows where there is no site. With `small_sites` (the validation split)
    a small site's share is raised by site_val_ratio."""
    sites = list(dict.fromkeys(s.site for s in samples))
    if len(sites) <= 1:
        return split_by_patient(samples, ratio, seed)
    parts = []
    for site in sites:
        mine = [s for s in samples if s.site == site]
        parts.append(split_by_patient(mine, site_val_ratio(mine, ratio) if small_sites else ratio, seed))
    return [s for a, _ in parts for s in a], [s for _, b in parts for s in b]


TEST_SPLIT_SEED = 0  # the seed of the test split carved from a manifest's unsplit rows, whatever the run's seed


def manifest_splits(path: Path, val_ratio: float, seed: int, classes: dict[str, str] | None = None,
                    labels: str | None = None) -> tuple[list[Sample], list[Sample], list[Sample], list[str]]:
    """(train, val, test, notes) of a manifest: the named splits, and the unnamed rows split by
    patient (test first, then validation from what is left, each about `val_ratio`), labelled under
    the label set `labels` (a `subtype` column, else the file name, tells bacterial from viral)."""
    by_split, unsplit = read_manifest(path, classes)
    by_split = {k: relabel(v, labels) for k, v in by_split.items()}
    unsplit = relabel(unsplit, labels)
    names = class_names(labels)
    notes = []
    train, val, test = by_split["train"], by_split["val"], by_split["test"]
    if unsplit:
        # the carved test split is the data's, not the training seed's: every seed of `--seeds` (and
        # every run on this manifest) is scored on the very same images; validation follows the seed
        rest, carved_test = _per_site(unsplit, val_ratio, TEST_SPLIT_SEED) if not test else (unsplit, [])
        train, test = train + rest, test + carved_test
        notes.append(f"{len(unsplit)} rows without a split were divided by patient"
                     + (f" ({len(carved_test)} to test)" if carved_test else ""))
    if not val:
        train, val = _per_site(train, val_ratio, seed, small_sites=True)  # one site splits as folders do
        notes.append(f"validation: {len(val)} images split from train by patient")
    for name, samples in (("train", train), ("val", val), ("test", test)):
        counts = [sum(s.label == c for s in samples) for c in range(len(names))]
        if min(counts) == 0:
            raise DataError(f"{path}: the {name} split has no {names[counts.index(0)]} images; every split needs "
                            + ("both classes" if len(names) == 2 else "every class"))
    key = lambda s: str(s.path)  # noqa: E731
    return sorted(train, key=key), sorted(val, key=key), sorted(test, key=key), notes


def write_manifest(folder: Path, out: Path) -> int:
    """A manifest of `folder` (train/, val/, test/ with NORMAL/ and PNEUMONIA/), paths relative to
    `out`'s folder. Returns the number of rows."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; pass a data folder holding train/ and test/")
    rows = []
    for split in SPLITS:
        if (folder / split).is_dir():
            for s in list_split(folder, split):
                rel = Path(os.path.relpath(s.path.resolve(), out.resolve().parent))
                # val/ is folded into train, as the folder route does (folders.folder_splits), so that
                # the manifest of a folder gives exactly the folder's splits
                rows.append([rel.as_posix(), CLASSES[s.label], s.patient, "train" if split == "val" else split])
    if not rows:
        raise DataError(f"{folder}: no train/, val/ or test/ with {' and '.join(CLASSES)} inside; nothing to list")
    write_csv(out, ["path", "label", "patient", "split"], rows)
    return len(rows)



def with_patients(samples: list[Sample], table: Path, folder: Path) -> list[Sample]:
    """`samples` of the set in `folder` with their patient ids from `table` (`--patients CSV`):
    columns `path` (the file name, or its path relative to the set's folder) and `patient`, one
    row per image. For sites whose file names carry no patient id: without them each image counts
    as its own patient, in folds and in intervals. Every image must be listed."""
    table, folder = Path(table), Path(folder)
    if not table.is_file():
        raise DataError(f"{table}: patient table not found; pass a CSV with columns path,patient")
    with open(table, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in columns or "patient" not in columns:
            raise DataError(f"{table}: needs the columns path and patient (found: {', '.join(columns) or 'nothing'})")
        ids = {}
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if row["path"] and row["patient"]:
                ids[row["path"]] = row["patient"]
    out, missing, names = [], [], {}
    for s in samples:
        names.setdefault(s.path.name, []).append(s)
    for s in samples:
        rel = s.path.relative_to(folder).as_posix() if s.path.is_relative_to(folder) else s.path.name
        # the file name alone names an image only when no other image of the set has that name
        key = rel if rel in ids else s.path.name if s.path.name in ids and len(names[s.path.name]) == 1 else None
        if key is None:
            missing.append(rel)
        else:
            out.append(Sample(s.path, s.label, ids[key]))
    if missing:
        raise DataError(f"{table}: {len(missing)} images of {folder} have no patient row ({_listing(missing)}); "
                        "list every image (path relative to the folder, or its file name) with its patient")
    return out
