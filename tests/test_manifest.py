"""CSV manifests as --data/--manifest, `cxr manifest`, and every malformed manifest ending in one
line naming the rows, with nothing written."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from cxr.cli import main
from cxr.data.loading import get_test_samples, prepare_splits
from cxr.data.manifest import manifest_splits

from .helpers import write_png


def write(path: Path, rows: list[list[str]], header=("path", "label", "patient", "split")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_manifest_of_a_folder_gives_the_folder_splits(tiny_data, tmp_path, capsys):
    for i, name in enumerate(("NORMAL/IM-0300-0001.png", "PNEUMONIA/person300_virus_90.png")):
        write_png(tiny_data / "val" / name, 90 + i)  # like the official download's val/: folded into train
    out = tmp_path / "lists" / "all.csv"  # another folder: paths become ../data/...
    assert main(["manifest", str(tiny_data), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 24 and rows[0]["path"].startswith("../data/train/NORMAL/")
    assert {r["split"] for r in rows if "/val/" in r["path"]} == {"train"}
    folder, listed = prepare_splits(tiny_data, 0.25, 3), prepare_splits(out, 0.25, 3)
    assert [s.path.resolve() for s in folder.train] == [s.path.resolve() for s in listed.train]
    assert [s.path.resolve() for s in folder.val] == [s.path.resolve() for s in listed.val]
    assert {s.path.resolve() for s in get_test_samples(tiny_data, 3)} == {s.path.resolve() for s in get_test_samples(out, 3)}


@pytest.mark.slow
def test_run_from_a_manifest_trains_and_evaluates(tiny_data, tmp_path):
    m = tmp_path / "m.csv"
    assert main(["manifest", str(tiny_data), "--out", str(m)]) == 0
    out = tmp_path / "out"
    assert main(["run", "--manifest", str(m), "--out", str(out), "--tasks", "scratch", "--epochs", "1",
                 "--image-size", "32", "--n", "2", "--device", "cpu", "--no-cache"]) == 0
    assert '"n": 6' in (out / "scratch" / "metrics.json").read_text()
    assert main(["evaluate", str(out / "scratch"), "--device", "cpu", "--no-cache"]) == 0  # data from config.json


def test_rows_without_a_split_are_split_by_patient_and_labels_can_be_mapped(tmp_path):
    rows = []
    for p in range(30):
        for i in range(p % 3 + 1):
            write_png(tmp_path / "img" / f"{p}_{i}.png", 100 * p + i, size=16)
            rows.append([f"img/{p}_{i}.png", "opacity" if p % 2 else "normal", f"pt{p}", ""])
    m = write(tmp_path / "m.csv", rows)
    with pytest.raises(Exception, match="unknown labels"):
        manifest_splits(m, 0.2, 0)
    from cxr.data.manifest import parse_classes

    train, val, test, notes = manifest_splits(m, 0.2, 0, parse_classes("normal=NORMAL,opacity=PNEUMONIA"))
    groups = [{s.patient for s in x} for x in (train, val, test)]
    assert set.union(*groups) == {f"pt{p}" for p in range(30)}  # the column's ids, not the file names'
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert len(train) + len(val) + len(test) == len(rows) and test and val
    assert {s.label for s in test} == {0, 1}
    again = manifest_splits(m, 0.2, 0, parse_classes("normal=NORMAL,opacity=PNEUMONIA"))
    assert [s.path for s in again[2]] == [s.path for s in test]


@pytest.mark.parametrize("case, expect", [
    ("missing", "2 files not found (line 3: img/nope.png; line 4: /abs/gone.png)"),
    ("label", "unknown labels (line 2: Bacterial)"),
    ("duplicate", "paths listed twice (lines 2 and 6"),
    ("patient", "patients in two splits (pA (test, train))"),
    ("column", "no label column"),
    ("split", "unknown splits (line 2: holdout)"),
    ("one class", "the test split has no PNEUMONIA images; every split needs both classes"),
])
def test_a_bad_manifest_is_one_line_and_nothing_is_written(case, expect, tmp_path, capsys):
    for k in range(6):
        write_png(tmp_path / "img" / f"{k}.png", k, size=16)
    rows = [["img/0.png", "NORMAL", "pA", "train"], ["img/1.png", "PNEUMONIA", "pB", "train"],
            ["img/2.png", "NORMAL", "pC", "test"], ["img/3.png", "PNEUMONIA", "pD", "test"]]
    header = ("path", "label", "patient", "split")
    if case == "missing":
        rows[1][0], rows[2][0] = "img/nope.png", "/abs/gone.png"
    elif case == "label":
        rows[0][1] = "Bacterial"
    elif case == "duplicate":
        rows.append(["img/../img/0.png", "NORMAL", "pA", "train"])
    elif case == "patient":
        rows[2][2] = "pA"
    elif case == "column":
        header = ("path", "class", "patient", "split")
    elif case == "one class":  # valid train and val splits, a test split of NORMAL images only
        rows[3][1] = "NORMAL"
        rows += [["img/4.png", "NORMAL", "pE", "val"], ["img/5.png", "PNEUMONIA", "pF", "val"]]
    else:
        rows[0][3] = "holdout"
    m = write(tmp_path / "m.csv", rows, header)
    out = tmp_path / "out"
    assert main(["train", "--manifest", str(m), "--out", str(out), "--epochs", "1", "--image-size", "32",
                 "--device", "cpu", "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(m) in err and expect in err, err
    assert not out.exists()


def test_a_manifests_carved_test_split_is_the_same_for_every_seed(tmp_path):
    from cxr.data.loading import get_test_samples
    from cxr.data.manifest import manifest_splits

    rows = ["path,label,patient"]
    for i in range(80):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
        rows.append(f"img/{i}.png,{'PNEUMONIA' if i % 2 else 'NORMAL'},p{i // 2}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    tests = [sorted(str(s.path) for s in manifest_splits(manifest, 0.2, seed)[2]) for seed in (0, 1, 2)]
    assert tests[0] == tests[1] == tests[2]
    vals = [sorted(str(s.path) for s in manifest_splits(manifest, 0.2, seed)[1]) for seed in (0, 1)]
    assert vals[0] != vals[1]  # validation still follows the seed
    limited = [sorted(str(s.path) for s in get_test_samples(manifest, seed, limit=3)) for seed in (0, 5)]
    assert limited[0] == limited[1]
