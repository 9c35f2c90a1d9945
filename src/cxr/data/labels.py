"""Label sets: which question a run answers, and each image's class under it.

    pneumonia   NORMAL / PNEUMONIA            the study's question (the default)
    subtype     VIRAL / BACTERIAL             pneumonia images only; BACTERIAL is the positive class
    three-way   NORMAL / BACTERIAL / VIRAL    softmax over three classes, decided by argmax

Every source of samples (folders, manifests) labels images NORMAL=0 / PNEUMONIA=1 first; `relabel`
then maps them onto the run's label set. The subtype comes from the file name, as the data set names
its pneumonia images (`person1_bacteria_1.jpeg`, `person2_virus_3.jpeg`), or from a manifest's
`subtype` column for data sets named otherwise.

Binary label sets keep the study's convention: class 1 is the positive class, its probability the
one reported, and sensitivity its recall. For `subtype` that is BACTERIAL: the finding that calls
for antibiotics (and the majority class, as PNEUMONIA is in the study). Both classes' recalls are
reported anyway (sensitivity and specificity). A three-way model also gives the pneumonia-vs-normal
reading P(PNEUMONIA) = P(BACTERIAL) + P(VIRAL).

No torch here: `--help` and the data layers read it.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from ..errors import DataError

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "pneumonia": ("NORMAL", "PNEUMONIA"),
    "subtype": ("VIRAL", "BACTERIAL"),
    "three-way": ("NORMAL", "BACTERIAL", "VIRAL"),
}
DEFAULT = "pneumonia"
# what a manifest's subtype column or a file name may say (lower case)
_WORDS = {"bacteria": "BACTERIAL", "bacterial": "BACTERIAL", "virus": "VIRAL", "viral": "VIRAL"}
_NAME = re.compile(r"(?:^|(?<=[_\-. ]))(bacterial|bacteria|viral|virus)(?=[_\-. ]|$)", re.IGNORECASE)


def class_names(labels: str | None) -> tuple[str, ...]:
    """The class names of a label set, in index order."""
    try:
        return LABEL_SETS[labels or DEFAULT]
    except KeyError:
        raise DataError(f"--labels {labels!r}: unknown label set; choose from {', '.join(LABEL_SETS)}") from None


def run_classes(run_dir: Path | str) -> tuple[str, ...]:
    """The class names of a task folder's label set (its config.json; the study's when it says none
    or cannot be read)."""
    import json

    try:
        labels = json.loads((Path(run_dir) / "config.json").read_text())["config"].get("labels")
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        labels = None
    return LABEL_SETS.get(labels or DEFAULT, LABEL_SETS[DEFAULT])


QUESTIONS = {"pneumonia": "pneumonia vs normal", "subtype": "bacterial vs viral pneumonia",
             "three-way": "normal, bacterial or viral pneumonia"}


def question(classes) -> str:
    """What a label set asks, in words (report titles)."""
    for name, names in LABEL_SETS.items():
        if tuple(classes) == names:
            return QUESTIONS[name]
    return " vs ".join(c.lower() for c in classes)


def probability_key(name: str) -> str:
    """The field or column holding P(name): prob_pneumonia, prob_bacterial, ..."""
    return f"prob_{name.lower()}"


def subtype_of(path: Path | str, given: str | None = None) -> str:
    """BACTERIAL or VIRAL for a pneumonia image: `given` (a manifest's subtype column) when set,
    else the word in the file name; DataError when neither says which."""
    if given:
        word = _WORDS.get(given.strip().lower())
        if word is None:
            raise DataError(f"{path}: subtype {given!r} is neither bacterial nor viral; write bacterial or viral "
                            "in the manifest's subtype column")
        return word
    found = {_WORDS[m.lower()] for m in _NAME.findall(Path(path).stem)}
    if len(found) != 1:
        what = "both 'bacteria' and 'virus'" if found else "neither 'bacteria' nor 'virus'"
        raise DataError(f"{path}: a pneumonia image whose name says {what}; --labels subtype and three-way read the "
                        "subtype from the file name (person1_bacteria_2.jpeg): rename it, or list the data in a CSV "
                        "manifest with a subtype column")
    return found.pop()


def relabel(samples: list, labels: str | None) -> list:
    """`samples` (labelled NORMAL=0 / PNEUMONIA=1) under the label set `labels`: unchanged for
    pneumonia; for subtype the pneumonia images only; for three-way all of them. Every pneumonia
    image whose subtype cannot be told is listed in one DataError."""
    labels = labels or DEFAULT
    names = class_names(labels)
    if labels == DEFAULT:
        return list(samples)
    out, unknown = [], []
    for s in samples:
        if s.label == 0:
            if "NORMAL" in names:
                out.append(replace(s, label=names.index("NORMAL")))
            continue
        try:
            out.append(replace(s, label=names.index(subtype_of(s.path, getattr(s, "subtype", None)))))
        except DataError as e:
            unknown.append((s.path, str(e)))
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        first = unknown[0][1]
        listing = ", ".join(str(p) for p, _ in unknown[:3])
        raise DataError(f"{len(unknown)} pneumonia images carry no subtype ({listing}{more}): "
                        + first.split(": ", 1)[1])
    return out
