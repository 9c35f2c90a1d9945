"""Loading a split: its samples (from a folder or a CSV manifest) and its images (from the cache, or
decoded). The top of the data layers; below it, in the order data flows up:

    dataset.py   the Sample record, patient ids, the patient split (reads no files)
    folders.py   samples from the folder layout      manifest.py  samples from a CSV manifest
    images.py    decoding one file                    decode.py    decoding many files
    cache.py     decoded images kept on disk
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cache import cached_decode
from .dataset import Sample, Splits, limit_per_class
from .decode import Bad, bad_images_error
from .folders import check_root, folder_splits, list_split
from .labels import relabel
from .manifest import manifest_splits, parse_classes


def _is_manifest(root: Path) -> bool:
    return Path(root).suffix.lower() == ".csv"


def prepare_splits(root: Path, val_ratio: float, seed: int, limit: int | None = None,
                   classes: str | None = None, labels: str | None = None) -> Splits:
    """Train and validation samples of a folder (folders.folder_splits) or of a CSV manifest
    (manifest.py; `classes` maps its label names), under the label set `labels` (labels.py)."""
    root = Path(root)
    if _is_manifest(root):
        train, val, _, notes = manifest_splits(root, val_ratio, seed, parse_classes(classes), labels)
    else:
        train, val, notes = folder_splits(root, val_ratio, seed, labels)
    return Splits(limit_per_class(train, limit, seed), limit_per_class(val, limit, seed), notes)


def get_test_samples(root: Path, seed: int, limit: int | None = None, val_ratio: float = 0.1,
                     classes: str | None = None, labels: str | None = None) -> list[Sample]:
    """The test split (of a folder, or of a CSV manifest), under the label set `labels`. Only
    evaluation reads these images."""
    root = Path(root)
    if _is_manifest(root):
        # the test split (and its --limit subset) does not move with the training seed
        return limit_per_class(manifest_splits(root, val_ratio, seed, parse_classes(classes), labels)[2], limit, 0)
    check_root(root)
    # the subset of a --limit is drawn with a fixed seed: the test images are the data's, not the
    # training seed's, so that runs of several seeds are compared on the very same images
    return limit_per_class(relabel(list_split(root, "test"), labels), limit, 0)


def load_images(paths: list[Path], size: int, workers: int = 2, desc: str = "decode",
                cache_dir: Path | None = None) -> torch.Tensor:
    """All images as one (N, 1, size, size) uint8 tensor; every unreadable file is listed in one DataError."""
    images, bad = cached_decode(paths, size, workers, cache_dir, desc)
    if bad:
        raise bad_images_error(bad)
    return images


def load_samples(samples: list[Sample], size: int, workers: int, skip_bad: bool, desc: str = "decode",
                 cache_dir: Path | None = None, mmap: bool = False,
                 quiet: bool | None = None) -> tuple[list[Sample], torch.Tensor, Bad]:
    """Decode `samples` (through the cache in `cache_dir`, if given; with `mmap`, kept on disk
    and memory-mapped); with `skip_bad`, drop unreadable ones (returned as the third item)
    instead of raising. `quiet`: tqdm's `disable` for the progress bar."""
    images, bad = cached_decode([s.path for s in samples], size, workers, cache_dir, desc, mmap, quiet)
    if bad and not skip_bad:
        raise bad_images_error(bad)
    drop = {i for i, _, _ in bad}
    keep = [i for i in range(len(samples)) if i not in drop]
    return [samples[i] for i in keep], images[keep] if drop else images, bad
