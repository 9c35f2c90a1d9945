"""The folder layout as a source of samples: `DIR/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`.

Data: Kermany, Zhang, Goldbaum et al., Cell 172(5):1122-1131 (2018), Mendeley Data
doi:10.17632/rscbjbr9sj.2 (CC BY 4.0), also the Kaggle "Chest X-Ray Images (Pneumonia)" set.
Pediatric anterior-posterior chest radiographs, labelled NORMAL or PNEUMONIA (bacterial or
viral, which the file name says). Layout as downloaded:

    DIR/train/{NORMAL,PNEUMONIA}/*.jpeg   DIR/val/...  (optional, 16 images)   DIR/test/...

Labels come from the folder name: NORMAL=0, PNEUMONIA=1 (see `config.CLASSES`); patients from
the file name (dataset.patient_id). The other source, a CSV manifest, sits beside this one.
"""

from __future__ import annotations

from pathlib import Path

from ..config import CLASSES
from ..errors import DataError
from .dataset import EXTENSIONS, Sample, patient_id, split_by_patient
from .labels import relabel

# A small real subset shipped with the package (sample/SAMPLE.md): `--data sample`.
SAMPLE_ROOT = Path(__file__).resolve().parent.parent / "sample"
SAMPLE_NAME = "sample"


def resolve_data_root(root: Path) -> Path:
    """`--data sample` means the bundled sample, unless a folder named `sample` exists here."""
    root = Path(root)
    return SAMPLE_ROOT if str(root) == SAMPLE_NAME and not root.exists() else root


def is_sample(root: Path) -> bool:
    """Whether `root` is the bundled sample (or a copy of it): its numbers mean little."""
    return (Path(root) / "SAMPLE.md").is_file() and (Path(root) / "train").is_dir()


def check_root(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; pass --data DIR where DIR holds train/ and test/")
    if not (root / "train").is_dir():
        if root.name in ("train", "val", "test") and (root.parent / "train").is_dir():
            raise DataError(f"{root}: is the {root.name} split itself; --data takes the folder holding train/ and "
                            f"test/ (did you mean --data {root.parent}?)")
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


def folder_splits(root: Path, val_ratio: float, seed: int, labels: str | None = None
                  ) -> tuple[list[Sample], list[Sample], list[str]]:
    """(train, val, notes) of a folder, labelled under the label set `labels` (labels.relabel) and
    split by patient stratified on those labels. A `val/` folder is folded into train before
    splitting: the official one holds 16 images, too few to choose anything with."""
    check_root(root)
    notes: list[str] = []
    pool = list_split(root, "train", notes)
    if (root / "val").is_dir():
        extra = list_split(root, "val", notes)
        pool += extra
        notes.append(f"val/: its {len(extra)} images were folded into train before the patient split")
    pool = relabel(pool, labels)
    unnamed = sum(1 for s in pool if s.patient == s.path.stem)
    if unnamed:
        notes.append(f"{unnamed} train images have no patient id in their name; each counts as its own patient")
    train, val = split_by_patient(pool, val_ratio, seed)
    return train, val, notes


def get_external_samples(folder: Path, labels: str | None = None) -> list[Sample]:
    """An external evaluation set: `folder` holding NORMAL/ and PNEUMONIA/ directly, or a test/
    with them inside (a downloaded data set), labelled under `labels` (labels.relabel: subtype
    and three-way read the subtype from the file names). Only evaluation reads these images."""
    return relabel(_external_samples(Path(folder)), labels)


def _external_samples(folder: Path) -> list[Sample]:
    if not folder.is_dir():
        raise DataError(f"{folder}: external data folder not found; pass a folder holding NORMAL/ and "
                        "PNEUMONIA/ (or test/NORMAL and test/PNEUMONIA)")
    if any((folder / c).is_dir() for c in CLASSES):
        return list_split(folder.parent, folder.name)
    if (folder / "test").is_dir():
        return list_split(folder, "test")
    raise DataError(f"{folder}: holds neither NORMAL/ and PNEUMONIA/ nor test/; pass a folder with the two "
                    "class folders inside")
