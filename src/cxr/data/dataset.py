"""Describing a data set: the `Sample` record, patient ids from file names, the patient-level split.

The bottom of the data layers: it reads no files. Patients come from the file name
(`person1234_bacteria_5678.jpeg` -> `person1234`, `IM-0115-0001.jpeg` -> `IM-0115`,
`NORMAL2-IM-0927-0001.jpeg` -> `NORMAL2-IM-0927`, NIH's `00001280_004.png` -> `00001280`);
several images of one patient must never straddle two splits, or validation measures memory of
the patient, not skill.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import CLASSES

EXTENSIONS = (".jpeg", ".jpg", ".png")  # compared in lower case

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE),
    re.compile(r"^(\d{8})_\d{3}$"),  # NIH ChestX-ray8/14: PPPPPPPP_FFF (patient, follow-up)
)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int      # index into the run's class names (labels.py; CLASSES for the study's)
    patient: str
    subtype: str | None = None  # BACTERIAL / VIRAL where a manifest says it (else the file name does)
    site: str | None = None     # the training source it comes from, when several are named (sites.py)


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


def without_patient_id(samples: list[Sample]) -> int:
    """How many samples carry no patient id in their file name (each then counts as its own patient:
    two images of one person may land on both sides of a split, and intervals count images)."""
    return sum(1 for s in samples if s.patient == Path(s.path).stem)


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
    for label in sorted({s.label for s in samples}):
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
    for label in sorted({s.label for s in samples}):
        of_class = [s for s in samples if s.label == label]
        rng.shuffle(of_class)
        kept.extend(of_class[:n])
    return sorted(kept, key=lambda s: s.path)


def describe(splits: dict[str, list[Sample]], classes: tuple[str, ...] = CLASSES) -> str:
    """A table of images and patients per split and class."""
    head = f"{'split':<7}" + "".join(f"{c + ' images (patients)':>30}" for c in classes) + f"{'total':>8}"
    lines = [head]
    for name, samples in splits.items():
        cells = []
        for label in range(len(classes)):
            of_class = [s for s in samples if s.label == label]
            cells.append(f"{len(of_class)} ({len({s.patient for s in of_class})})")
        lines.append(f"{name:<7}" + "".join(f"{c:>30}" for c in cells) + f"{len(samples):>8}")
    return "\n".join(lines)


def labels_of(samples: list[Sample]) -> torch.Tensor:
    return torch.tensor([s.label for s in samples], dtype=torch.long)
