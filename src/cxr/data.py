"""The data set on disk: layout discovery and checks, patient ids, the patient-level split, decoding.

Data: Kermany, Zhang, Goldbaum et al., Cell 172(5):1122-1131 (2018), Mendeley Data
doi:10.17632/rscbjbr9sj.2 (CC BY 4.0), also the Kaggle "Chest X-Ray Images (Pneumonia)" set.
Pediatric anterior-posterior chest radiographs, labelled NORMAL or PNEUMONIA (bacterial or
viral, which the file name says). Layout as downloaded:

    DIR/train/{NORMAL,PNEUMONIA}/*.jpeg   DIR/val/...  (optional, 16 images)   DIR/test/...

Labels come from the folder name: NORMAL=0, PNEUMONIA=1 (see `config.CLASSES`). The patient
comes from the file name (`person1234_bacteria_5678.jpeg` -> `person1234`, `IM-0115-0001.jpeg`
-> `IM-0115`, `NORMAL2-IM-0927-0001.jpeg` -> `NORMAL2-IM-0927`); several images of one patient
must never straddle two splits, or validation measures memory of the patient, not skill.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .cache import cached_decode
from .config import CLASSES
from .distributed import quiet
from .errors import DataError
from .images import DECODE_ERRORS, describe_error, load_image  # noqa: F401  (load_image: re-exported)

EXTENSIONS = (".jpeg", ".jpg", ".png")  # compared in lower case

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE),
)


# A small real subset shipped with the package (sample/SAMPLE.md): `--data sample`.
SAMPLE_ROOT = Path(__file__).resolve().parent / "sample"
SAMPLE_NAME = "sample"


def resolve_data_root(root: Path) -> Path:
    """`--data sample` means the bundled sample, unless a folder named `sample` exists here."""
    root = Path(root)
    return SAMPLE_ROOT if str(root) == SAMPLE_NAME and not root.exists() else root


def is_sample(root: Path) -> bool:
    """Whether `root` is the bundled sample (or a copy of it): its numbers mean little."""
    return (Path(root) / "SAMPLE.md").is_file() and (Path(root) / "train").is_dir()


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int      # index into CLASSES
    patient: str


@dataclass
class Splits:
    """Train and validation samples (validation carved from train by patient) and notes to show."""

    train: list[Sample]
    val: list[Sample]
    notes: list[str] = field(default_factory=list)


def patient_id(filename: str | Path) -> str:
    """The patient a file belongs to, from its name; an unknown naming makes each file its own."""
    stem = Path(filename).stem
    for pattern in _PATIENT_PATTERNS:
        m = pattern.match(stem)
        if m:
            return m.group(1)
    return stem


def check_root(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; pass --data DIR where DIR holds train/ and test/")
    if not (root / "train").is_dir():
        nested = [p.parent for p in root.glob("*/train") if p.is_dir()]
        hint = f" (did you mean --data {nested[0]}?)" if nested else ""
        raise DataError(f"{root / 'train'}: folder not found; --data must hold train/ and test/ "
                        f"with NORMAL/ and PNEUMONIA/ inside each{hint}")


def list_split(root: Path, split: str, notes: list[str] | None = None) -> list[Sample]:
    """Every image of `root/split/{NORMAL,PNEUMONIA}`, sorted; checks the class folders."""
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; expected {split}/NORMAL and {split}/PNEUMONIA in {root}")
    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in subdirs:
        if name not in CLASSES:
            raise DataError(f"{folder / name}: unexpected class folder; cxr expects exactly "
                            f"{' and '.join(CLASSES)} (upper case): rename or remove it")
    samples, ignored = [], 0
    for label, name in enumerate(CLASSES):
        class_dir = folder / name
        if not class_dir.is_dir():
            raise DataError(f"{class_dir}: class folder not found; create it with that exact name")
        found = 0
        for path in sorted(class_dir.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            if path.suffix.lower() not in EXTENSIONS:
                ignored += 1
                continue
            samples.append(Sample(path, label, patient_id(path.name)))
            found += 1
        if found == 0:
            raise DataError(f"{class_dir}: no .jpeg/.jpg/.png images; every class needs images")
    if ignored and notes is not None:
        notes.append(f"{split}: ignored {ignored} files that are not .jpeg/.jpg/.png")
    return samples


def split_by_patient(samples: list[Sample], ratio: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, val): about `ratio` of each class's images go to val, whole patients at a time.

    A patient is counted in the class most of their images have. Seeded, independent of the
    order of `samples`.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"validation ratio must be between 0 and 1, got {ratio}")
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_patient[s.patient].append(s)
    rng = random.Random(seed)
    val_patients: set[str] = set()
    for label in range(len(CLASSES)):
        patients = sorted(p for p, ss in by_patient.items()
                          if Counter(s.label for s in ss).most_common(1)[0][0] == label)
        rng.shuffle(patients)
        target = max(1, round(ratio * sum(len(by_patient[p]) for p in patients)))
        taken = 0
        for p in patients[:-1]:  # the last patient always stays in train
            if taken >= target:
                break
            val_patients.add(p)
            taken += len(by_patient[p])
    train = sorted((s for s in samples if s.patient not in val_patients), key=lambda s: s.path)
    val = sorted((s for s in samples if s.patient in val_patients), key=lambda s: s.path)
    return train, val


def limit_per_class(samples: list[Sample], n: int | None, seed: int) -> list[Sample]:
    """At most `n` samples of each class, a seeded random choice; all of them when n is None."""
    if n is None:
        return samples
    rng = random.Random(seed)
    kept: list[Sample] = []
    for label in range(len(CLASSES)):
        of_class = [s for s in samples if s.label == label]
        rng.shuffle(of_class)
        kept.extend(of_class[:n])
    return sorted(kept, key=lambda s: s.path)


def prepare_splits(root: Path, val_ratio: float, seed: int, limit: int | None = None,
                   classes: str | None = None) -> Splits:
    """Train and validation samples. A `val/` folder is folded into train before splitting:
    the official one holds 16 images, too few to choose anything with. `root` may be a CSV
    manifest instead (manifest.py; `classes` maps its label names)."""
    root = Path(root)
    if _is_manifest(root):
        from .manifest import manifest_splits, parse_classes

        train, val, _, notes = manifest_splits(root, val_ratio, seed, parse_classes(classes))
        return Splits(limit_per_class(train, limit, seed), limit_per_class(val, limit, seed), notes)
    check_root(root)
    notes: list[str] = []
    pool = list_split(root, "train", notes)
    if (root / "val").is_dir():
        extra = list_split(root, "val", notes)
        pool += extra
        notes.append(f"val/: its {len(extra)} images were folded into train before the patient split")
    unnamed = sum(1 for s in pool if s.patient == s.path.stem)
    if unnamed:
        notes.append(f"{unnamed} train images have no patient id in their name; each counts as its own patient")
    train, val = split_by_patient(pool, val_ratio, seed)
    return Splits(limit_per_class(train, limit, seed), limit_per_class(val, limit, seed), notes)


def _is_manifest(root: Path) -> bool:
    return Path(root).suffix.lower() == ".csv"


def get_test_samples(root: Path, seed: int, limit: int | None = None, val_ratio: float = 0.1,
                     classes: str | None = None) -> list[Sample]:
    """The test split (of a folder, or of a CSV manifest). Only evaluation reads these images."""
    root = Path(root)
    if _is_manifest(root):
        from .manifest import manifest_splits, parse_classes

        return limit_per_class(manifest_splits(root, val_ratio, seed, parse_classes(classes))[2], limit, seed)
    check_root(root)
    return limit_per_class(list_split(root, "test"), limit, seed)


def describe(splits: dict[str, list[Sample]]) -> str:
    """A table of images and patients per split and class."""
    head = f"{'split':<7}" + "".join(f"{c + ' images (patients)':>30}" for c in CLASSES) + f"{'total':>8}"
    lines = [head]
    for name, samples in splits.items():
        cells = []
        for label in range(len(CLASSES)):
            of_class = [s for s in samples if s.label == label]
            cells.append(f"{len(of_class)} ({len({s.patient for s in of_class})})")
        lines.append(f"{name:<7}" + "".join(f"{c:>30}" for c in cells) + f"{len(samples):>8}")
    return "\n".join(lines)


def _try_load(path: Path, size: int) -> np.ndarray | str:
    try:
        return load_image(path, size)
    except DECODE_ERRORS as e:
        return describe_error(e)


def decode_all(paths: list[Path], size: int, workers: int = 2, desc: str = "decode",
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[tuple[int, Path, str]]]:
    """(N, 1, size, size) uint8 tensor of every image, decoded once with `workers` threads
    (Pillow releases the GIL while decoding), and (index, path, reason) of each unreadable one.
    `out`: where to write them (e.g. a memory-mapped file); a new tensor when None."""
    out = torch.zeros((len(paths), 1, size, size), dtype=torch.uint8) if out is None else out
    bad: list[tuple[int, Path, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda p: _try_load(p, size), paths)
        for i, (path, r) in enumerate(tqdm(zip(paths, results), total=len(paths), desc=desc,
                                           unit="img", leave=False, disable=quiet())):
            if isinstance(r, str):
                bad.append((i, path, r))
            else:
                out[i, 0] = torch.from_numpy(r)
    return out, bad


def bad_images_error(bad: list[tuple[int, Path, str]]) -> DataError:
    listing = "; ".join(f"{p} ({why})" for _, p, why in bad)
    return DataError(f"cannot read {len(bad)} image(s): {listing}; remove or replace them, or pass "
                     "--skip-bad-images to go on without them")


def load_images(paths: list[Path], size: int, workers: int = 2, desc: str = "decode",
                cache_dir: Path | None = None) -> torch.Tensor:
    """All images as one (N, 1, size, size) uint8 tensor; every unreadable file is listed in one DataError."""
    images, bad = cached_decode(paths, size, workers, cache_dir, desc)
    if bad:
        raise bad_images_error(bad)
    return images


def load_samples(samples: list[Sample], size: int, workers: int, skip_bad: bool, desc: str = "decode",
                 cache_dir: Path | None = None,
                 mmap: bool = False) -> tuple[list[Sample], torch.Tensor, list[tuple[int, Path, str]]]:
    """Decode `samples` (through the cache in `cache_dir`, if given; with `mmap`, kept on disk
    and memory-mapped); with `skip_bad`, drop unreadable ones (returned as the third item)
    instead of raising."""
    images, bad = cached_decode([s.path for s in samples], size, workers, cache_dir, desc, mmap)
    if bad and not skip_bad:
        raise bad_images_error(bad)
    drop = {i for i, _, _ in bad}
    keep = [i for i in range(len(samples)) if i not in drop]
    return [samples[i] for i in keep], images[keep] if drop else images, bad


def labels_of(samples: list[Sample]) -> torch.Tensor:
    return torch.tensor([s.label for s in samples], dtype=torch.long)


def get_external_samples(folder: Path) -> list[Sample]:
    """An external evaluation set: `folder` holding NORMAL/ and PNEUMONIA/ directly, or a test/
    with them inside (a downloaded data set). Only evaluation reads these images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: external data folder not found; pass a folder holding NORMAL/ and "
                        "PNEUMONIA/ (or test/NORMAL and test/PNEUMONIA)")
    if any((folder / c).is_dir() for c in CLASSES):
        return list_split(folder.parent, folder.name)
    if (folder / "test").is_dir():
        return list_split(folder, "test")
    raise DataError(f"{folder}: holds neither NORMAL/ and PNEUMONIA/ nor test/; pass a folder with the two "
                    "class folders inside")
