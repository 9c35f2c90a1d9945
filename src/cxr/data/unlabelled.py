"""The images self-supervised pretraining learns from (`cxr pretrain`): every image under the given
folders or manifests, labels ignored, and never a test split.

- a folder in the layout (`train/`, `val/`, `test/` with class folders): `train/` and `val/`; its
  `test/` scores results, so it is left out, and the note says so;
- a CSV manifest: its rows, except those whose `split` is test;
- any other folder: every JPEG/PNG under it (hidden folders skipped), class folders or not.

Labels are never read: a folder of class folders counts as a tree of images. `digests` gives each
file's SHA-1 (the pretraining's provenance; `overlap.backbone_overlap` compares it with the sets a
later run scores).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import DataError
from .dataset import EXTENSIONS
from .folders import resolve_data_root
from .overlap import backbone_overlap, file_digest

MIN_IMAGES = 8  # two batches of four: fewer cannot train a contrastive batch at all
PROVENANCE_FORMAT = "cxr-backbone-v1"  # provenance.json beside a backbone.pt written by cxr pretrain


def _tree(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _manifest(path: Path) -> list[Path]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if "path" not in [c.strip() for c in (reader.fieldnames or [])]:
            raise DataError(f"{path}: no path column; a manifest's first line names the columns path,label[,patient][,split]")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    unsplit = sum(1 for row in rows if not row.get("split"))
    if unsplit and not any(row.get("split", "").lower() == "test" for row in rows):
        # a run on this manifest carves its test split from these rows (manifest.manifest_splits)
        raise DataError(f"{path}: {unsplit} rows have no split and none is test, so a run on this manifest takes its "
                        "test images from them, and pretraining on them would see those; give every row a split "
                        "(train, val or test) first")
    paths = []
    for row in rows:
        if row.get("split", "").lower() == "test":
            continue
        p = Path(row["path"])
        paths.append(p if p.is_absolute() else path.parent / p)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} listed images do not exist (e.g. {missing[0]}); fix the paths")
    return paths


def pretraining_images(sources: list[Path]) -> tuple[list[Path], list[int], list[str]]:
    """Every image the pretraining reads from `sources` (in order, each file once), the index of
    the source each comes from (its first), and notes."""
    owner: dict[Path, int] = {}
    notes: list[str] = []
    for k, source in enumerate(resolve_data_root(Path(s)) for s in sources):
        if source.is_file() and source.suffix.lower() == ".csv":
            found = _manifest(source)
        elif not source.is_dir():
            raise DataError(f"{source}: not found; pass --data with a folder of X-ray images or a CSV manifest")
        elif (source / "train").is_dir():
            found = [p for split in ("train", "val") if (source / split).is_dir() for p in _tree(source / split)]
            if (source / "test").is_dir():
                notes.append(f"{source / 'test'}: left out (a test split scores results; pretraining never sees it)")
        else:
            found = _tree(source)
        if not found:
            raise DataError(f"{source}: no .jpeg/.jpg/.png images found; pass a folder of X-ray images")
        for p in found:
            owner.setdefault(p.resolve(), k)
    if len(owner) < MIN_IMAGES:
        raise DataError(f"{', '.join(map(str, sources))}: {len(owner)} images; pretraining needs at least {MIN_IMAGES}")
    return list(owner), list(owner.values()), notes


def digests(paths: list[Path], workers: int = 2) -> list[str]:
    """Each file's SHA-1 (as `overlap.file_digest`), read with `workers` threads."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(file_digest, paths))


def folder_digest(file_digests: list[str]) -> str:
    """One digest of a set of images: their file digests, sorted (the order of listing does not count)."""
    h = hashlib.sha256()
    for d in sorted(file_digests):
        h.update(d.encode())
    return h.hexdigest()


def read_provenance(weights: Path | None) -> dict | None:
    """The provenance.json beside a backbone written by `cxr pretrain`; None for any other weights.
    For a `backbone_epochE.pt` (--keep-every) the epochs done are E, not those of the last epoch."""
    if weights is None:
        return None
    file = Path(weights).parent / "provenance.json"
    try:
        found = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(found, dict) and found.get("format") == PROVENANCE_FORMAT):
        return None
    kept = re.fullmatch(r"backbone_epoch(\d+)\.pt", Path(weights).name)
    return {**found, "epochs_done": int(kept.group(1))} if kept else found


def refuse_seen_by_recorded_backbone(checkpoint: dict, sets: dict,
                                     workers: int = 2, log=print) -> None:
    """A run started from a `cxr pretrain` backbone records it (checkpoint["backbone"]); every command that
    scores the run on a set (cxr evaluate, cxr adapt's sets of the first site) refuses, as `cxr run` does,
    when that pretraining saw an image of the set (DataError naming it). When the backbone's folder is
    not here, it says in one line that the check could not be made."""
    card = checkpoint.get("backbone")
    if not isinstance(card, dict) or not card.get("file"):
        return
    weights = Path(card["file"])
    provenance = read_provenance(weights)
    if provenance is None:
        log(f"note: the run's pretrained backbone {weights} (with provenance.json, images.csv and thumbnails.npy "
            "beside it) is not here, so no check that its pretraining never saw these images")
        return
    refusal = backbone_overlap(weights, provenance, sets, workers)
    if refusal:
        raise DataError(refusal)
