"""Several training sources at once: `--data kermany=DIR --data nih=DIR`.

Each source is named (`NAME=DIR`; a bare `DIR` is named after its folder) and is one of: the data
set's folder layout (`train/`, optionally `val/` and `test/`, each with NORMAL/ and PNEUMONIA/), a
bare class folder (NORMAL/ and PNEUMONIA/ at its top, like a second site's sample: all of it is
training material, split by patient into train and validation), or a CSV manifest. They are written
into one manifest with a `site` column (`OUT/sites.csv`), so that everything downstream reads one
data source: manifest.manifest_splits splits each site's rows by patient on its own (the split is
stratified on site and class), the test split is the sources' own `test/` images, and patients are
named `site:id`, so two sites' numbering never merges two people. A folder layout's `test/` patients
are named `site:test:id`: the data set's official numbering restarts there (person1 of test/ is not
person1 of train/), as the plain `--data DIR` route reads it.

The manifest is written by the run (`study_data.claim_sites_manifest`) once its run folders are
claimed, never while options are read.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from ..config import CLASSES
from ..errors import DataError
from ..files import write_csv
from .dataset import patient_id
from .folders import list_split

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
COLUMNS = ["path", "label", "patient", "split", "site", "subtype"]


def parse_sources(values: list[str]) -> list[tuple[str, Path]]:
    """(name, path) of every --data value; names unique, one line naming what is wrong."""
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not NAME.match(name):
            name, path = Path(value).name or "data", value
        out.append((name, Path(path)))
    names = [n for n, _ in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"--data: the site name {', '.join(twice)} is given twice; name each source, e.g. "
                        "--data kermany=DIR --data nih=DIR")
    return out


def _rows_of_folder(name: str, folder: Path) -> list[list[str]]:
    if (folder / "train").is_dir():
        splits = [("train", "train"), ("val", "train"), ("test", "test")]  # val/ folds into train, as for folders
        samples = [(s, kept) for split, kept in splits if (folder / split).is_dir()
                   for s in list_split(folder, split)]
    elif any((folder / c).is_dir() for c in CLASSES):  # a bare class folder: training material only
        samples = [(s, "") for s in list_split(folder.parent, folder.name)]
    else:
        raise DataError(f"{folder}: neither train/ nor NORMAL/ and PNEUMONIA/ inside; a --data source is the data "
                        "set's folder layout, a folder of NORMAL/ and PNEUMONIA/, or a CSV manifest")
    return [[str(s.path.resolve()), CLASSES[s.label], f"{name}:{'test:' if split == 'test' else ''}{s.patient}",
             split, name, ""] for s, split in samples]


def _rows_of_manifest(name: str, path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        file = Path(r.get("path", ""))
        file = file if file.is_absolute() else path.parent / file
        patient = r.get("patient") or patient_id(file.name)
        out.append([str(file.resolve()), r.get("label", ""), f"{name}:{patient}", r.get("split", ""), name,
                    r.get("subtype", "")])
    return out


def sites_rows(sources: list[tuple[str, Path]]) -> list[list[str]]:
    """The rows (COLUMNS) of the manifest of every source's images with their site (see the module
    docstring), every source checked; nothing is written."""
    rows = []
    for name, path in sources:
        if path.suffix.lower() == ".csv" and path.is_file():
            rows += _rows_of_manifest(name, path)
        elif path.is_dir():
            rows += _rows_of_folder(name, path)
        else:
            raise DataError(f"{path}: --data {name}: not found; pass a data folder, a folder of NORMAL/ and "
                            "PNEUMONIA/, or a CSV manifest")
    if not any(r[3] == "test" for r in rows):
        raise DataError("--data: no source has a test/ split; one of them (the data set's folder layout) must hold the "
                        "test images the run is scored on")
    return rows


def write_sites_manifest(sources: list[tuple[str, Path]], out: Path) -> Path:
    """The manifest of `sources` (sites_rows) written to `out`; returns its path."""
    write_csv(Path(out), COLUMNS, sites_rows(sources))
    return Path(out)


def read_sites_rows(path: Path) -> list[list[str]] | None:
    """The rows of a sites manifest written before (None when there is none, or another header)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError:
        return None
    return rows[1:] if rows and rows[0] == COLUMNS else None


def site_counts(samples) -> dict[str, int]:
    """Images per site, in order of first appearance ({} where samples carry no site)."""
    counts: dict[str, int] = {}
    for s in samples:
        if getattr(s, "site", None):
            counts[s.site] = counts.get(s.site, 0) + 1
    return counts
