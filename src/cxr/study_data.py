"""The data steps of a study, before any training: split train by patient, list what is shared
between splits, decode every split once (the tasks and seeds share it) and the external sets.
How the study runs is `run_options.RunOptions`; what it trains, `config.TaskConfig`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import CLASSES, TaskConfig
from .data.dataset import Sample, Splits, describe
from .data.decode import bad_images_error
from .data.labels import class_names
from .data.loading import load_samples, prepare_splits
from .data.overlap import duplicates_across
from .data.sites import COLUMNS as SITE_COLUMNS
from .data.sites import read_sites_rows, site_counts, sites_rows
from .errors import CxrError
from .files import write_csv
from .run_options import RunOptions
from .training.distributed import quiet


@dataclass
class PreparedData:
    splits: Splits
    train_images: torch.Tensor
    val_images: torch.Tensor
    summary: str


@dataclass(frozen=True)
class EvalSet:
    """An external evaluation set, decoded before training: like test, only evaluation reads it."""

    folder: Path             # where its images are, resolved
    samples: list[Sample]    # its readable images, with their labels
    images: torch.Tensor     # the samples decoded, in their order (uint8)


def plan_data(root: Path, config: TaskConfig, test: list[Sample] | None, *, workers: int = 2,
              log: Callable[[str], None] = print,
              externals: dict[str, list[Sample]] | None = None) -> tuple[Splits, str]:
    """Split train by patient; print the data summary (images and patients per split and class)
    and warnings: byte-identical files shared between splits. Nothing is decoded yet (copies by
    content are looked for once decoded: `overlap.content_overlap_notes`)."""
    splits = prepare_splits(root, config.val_ratio, config.seed, config.limit, config.classes, config.labels)
    table = {"train": splits.train, "val": splits.val}
    if test is not None:
        table["test"] = test
    table.update(externals or {})
    copies = duplicates_across(table, workers)
    if copies:
        listing = "; ".join(f"{a}:{pa.name} = {b}:{pb.name}" for a, pa, b, pb in copies[:10])
        splits.notes.append(f"warning: {len(copies)} identical files sit in two splits ({listing}"
                            f"{' ...' if len(copies) > 10 else ''}); remove the copies for an honest test")
    summary = describe(table, class_names(config.labels))
    log(f"data: {root}\n{summary}")
    for note in splits.notes:
        log(f"note: {note}")
    return splits, summary


def decode_split(samples: list[Sample], name: str, image_size: int, options: RunOptions,
                 log: Callable[[str], None], *,
                 unreadable: list | None = None) -> tuple[list[Sample], torch.Tensor]:
    """A split's readable samples and their images. Unreadable images are dropped with a line each
    under --skip-bad-images; otherwise they go to `unreadable` (every split's, listed together in
    one error once all are decoded: decode_data) or, without it, stop here."""
    memo = options.memo
    if memo is not None:  # several seeds: each image is decoded once, whatever split it lands in
        missing = [s for s in samples if (s.path, image_size) not in memo]
        if missing:
            kept, images = decode_split(missing, name, image_size, replace(options, memo=None), log,
                                        unreadable=unreadable)
            memo.update({(s.path, image_size): images[i] for i, s in enumerate(kept)})
            memo.update({(s.path, image_size): None for s in set(missing) - set(kept)})  # unreadable
        kept = [s for s in samples if memo[(s.path, image_size)] is not None]
        rows = [memo[(s.path, image_size)] for s in kept]
        if not rows:
            return kept, torch.empty(0, 1, image_size, image_size, dtype=torch.uint8)
        return kept, torch.stack(rows)
    kept, images, bad = load_samples(samples, image_size, options.workers,
                                     options.skip_bad_images or unreadable is not None,
                                     desc=f"decode {name}", cache_dir=options.cache_dir, mmap=options.mmap,
                                     quiet=quiet())
    if bad and not options.skip_bad_images:
        unreadable.extend(bad)
        return kept, images
    for _, path, why in bad:
        log(f"skipped unreadable image: {path} ({why})")
    return kept, images


def decode_data(splits: Splits, summary: str, *, image_size: int, options: RunOptions,
                test: list[Sample] | None, log: Callable[[str], None],
                classes: tuple[str, ...] = CLASSES) -> tuple[PreparedData, tuple | None]:
    """Decode every split once (tasks share the result). Unreadable images stop the run, or with
    skip_bad_images are dropped and the summary shows what is left."""
    unreadable: list = []  # every split's unreadable images, listed in one error

    def decode(samples: list[Sample], name: str) -> tuple[list[Sample], torch.Tensor]:
        return decode_split(samples, name, image_size, options, log, unreadable=unreadable)

    train, train_images = decode(splits.train, "train")
    val, val_images = decode(splits.val, "val")
    # The test images are decoded now only so that an unreadable one stops the run before hours
    # of training; they go to evaluation and nowhere else.
    test_set = decode(test, "test") if test is not None else None
    if unreadable:
        raise bad_images_error(unreadable)
    dropped_test = test_set is not None and len(test_set[0]) < len(test)
    if len(train) + len(val) < len(splits.train) + len(splits.val) or dropped_test:
        table = {"train": train, "val": val, **({"test": test_set[0]} if test_set else {})}
        summary = describe(table, classes)
        log(f"data after skipping unreadable images:\n{summary}")
    splits = Splits(train, val, splits.notes)
    return PreparedData(splits, train_images, val_images, summary), test_set


def decode_externals(externals: dict[str, Path], listed: dict[str, list[Sample]], image_size: int,
                     options: RunOptions, log: Callable[[str], None]) -> dict[str, EvalSet]:
    """Every external evaluation set (its folder, and its samples as listed), decoded before
    training (a bad image stops the run early); like test, only evaluation reads them."""
    out = {}
    for name, folder in externals.items():
        log(f"external set {name}: {folder} (evaluated only; nothing is chosen on it)")
        samples, images = decode_split(listed[name], name, image_size, options, log)
        out[name] = EvalSet(Path(folder).resolve(), samples, images)
    return out


def _runs_reading(out: Path, manifest: Path) -> list[str]:
    """The run folders under `out` whose config.json names `manifest` as their data."""
    found = []
    for config in sorted(Path(out).rglob("config.json")):
        try:
            data = json.loads(config.read_text()).get("data")
        except (OSError, ValueError, AttributeError):
            continue
        if data == str(manifest.resolve()):
            found.append(str(config.parent.relative_to(out)))
    return found


@contextlib.contextmanager
def claim_sites_manifest(sources: list[tuple[str, Path]] | None, manifest: Path, out: Path,
                         overwrite: bool, write: bool = True) -> Iterator[None]:
    """Several --data sources: write their manifest (OUT/sites.csv) once the run folders are claimed,
    for the data steps inside the block to read. Refused (nothing written) when the file there lists
    other images and a run in OUT was trained on it, unless `overwrite`; a failure inside the block
    puts back what was there before, so a refused run leaves OUT as it was. `write`: this process
    writes (rank 0); the others only read."""
    if not sources or not write:
        yield
        return
    rows = sites_rows(sources)
    before = read_sites_rows(manifest)
    old = manifest.read_bytes() if manifest.is_file() else None
    if before is not None and before != rows and not overwrite:
        runs = _runs_reading(out, manifest)
        if runs:
            raise CxrError(f"{manifest}: lists other images than these --data sources, and "
                           f"{', '.join(runs)} was trained on it; repeat its --data sources, pass --overwrite "
                           "to replace it, or choose another --out")
    if before != rows:
        write_csv(manifest, SITE_COLUMNS, rows)
    try:
        yield
    except BaseException:
        if old is None:
            manifest.unlink(missing_ok=True)
        elif before != rows:
            manifest.write_bytes(old)
        raise


def check_sites(splits: Splits, configs: list[TaskConfig]) -> None:
    """Before anything is written: a task that keeps the epoch by the worst site's validation ROC
    AUC needs two training sites (--limit can leave one empty), and every site's validation must
    hold every class of train (else no ROC AUC can rank the epochs on it)."""
    train, val = splits.train, splits.val
    if any(c.select_by == "worst_site_auc" for c in configs) and len(site_counts(train)) < 2:
        found = ", ".join(site_counts(train)) or "no named site"
        raise CxrError("--select-by worst_site_auc needs two training sites, and the training split holds "
                       f"{found} (a --limit keeps a few images per class, possibly of one site only): raise "
                       "--limit, or choose another --select-by")
    if len(site_counts(train)) < 2:
        return
    for site in site_counts(val) | site_counts(train):
        present = {s.label for s in val if s.site == site}
        if len(present) < len(set(s.label for s in train)):
            raise CxrError(f"--data {site}: its validation patients hold only {len(present)} class(es), so "
                           "the epoch cannot be chosen on that site; add images of the missing class or raise "
                           "--val-ratio")


def training_sites(data: PreparedData) -> dict:
    """fit's train_sites / val_sites when the run trains on several sites (checked before anything
    is written: check_sites); {} otherwise."""
    train, val = data.splits.train, data.splits.val
    if len(site_counts(train)) < 2:
        return {}
    return {"train_sites": [s.site for s in train], "val_sites": [s.site for s in val]}
