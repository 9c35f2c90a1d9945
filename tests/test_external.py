"""External evaluation sets (`cxr evaluate --name`, `cxr run --external`) and the check for
copies between splits by image content (a patient id shared by two splits is not a copy)."""

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.cli import main
from cxr.config import CLASSES
from cxr.data.dataset import patient_id
from cxr.data.folders import get_external_samples, list_split
from cxr.data.images import load_image
from cxr.data.loading import prepare_splits
from cxr.data.overlap import content_overlap_notes, near_duplicates
from cxr.errors import DataError

HALF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "official_test_half"


def link_set(root: Path, sources: dict[str, list[Path]]) -> Path:
    """A folder of symbolic links in the NORMAL/PNEUMONIA layout (the images stay where they are)."""
    for label, paths in sources.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for p in paths:
            os.symlink(p.resolve(), root / label / p.name)
    return root


@pytest.fixture(scope="module")
def half() -> Path:
    if not HALF.is_dir():
        pytest.skip(f"official test half not found at {HALF}")
    return HALF


def test_external_layouts_and_errors(tiny_data, tmp_path):
    direct = get_external_samples(tiny_data / "test")  # NORMAL/ and PNEUMONIA/ directly inside
    nested = get_external_samples(tiny_data)  # a downloaded data set: its test/ is used
    assert [s.path for s in direct] == [s.path for s in nested] == [s.path for s in list_split(tiny_data, "test")]
    assert {s.label for s in direct} == {0, 1}
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        get_external_samples(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither NORMAL/ and PNEUMONIA/ nor test/"):
        get_external_samples(tmp_path / "empty")
    (tmp_path / "one" / "NORMAL").mkdir(parents=True)
    (tiny_data / "test" / "NORMAL" / "IM-0100-0001.png").rename(tmp_path / "one" / "NORMAL" / "IM-0100-0001.png")
    with pytest.raises(DataError, match=str(tmp_path / "one" / "PNEUMONIA")):
        get_external_samples(tmp_path / "one")  # a class folder missing is named


@pytest.fixture(scope="module")
def external_run(shared_data, half, tmp_path_factory):
    """A 1-epoch scratch run at 64 px on a few real images, evaluated on 12 + 12 official-test images."""
    tmp = tmp_path_factory.mktemp("external")
    ext = link_set(tmp / "site", {c: sorted((half / c).iterdir())[:12] for c in ("NORMAL", "PNEUMONIA")})
    out = tmp / "out"
    code = main(["run", "--data", str(shared_data), "--out", str(out), "--tasks", "scratch", "--limit", "16",
                 "--image-size", "64", "--epochs", "1", "--n", "4", "--external", f"site={ext}"])
    assert code == 0
    return out, ext


@pytest.mark.slow
def test_run_evaluates_every_external_set_and_reports_it(external_run):
    out, ext = external_run
    run = out / "scratch"
    m = json.loads((run / "metrics_site.json").read_text())
    own = json.loads((run / "metrics.json").read_text())
    assert m["n"] == 24 and m["per_class"]["NORMAL"]["total"] == 12
    patients = {patient_id(p.name) for p in ext.rglob("*.jpeg")}
    assert m["set"] == {"name": "site", "folder": str(ext.resolve()), "external": True, "n_patients": len(patients)}
    assert 12 <= len(patients) < 24  # some patients have two images: patients are not images
    assert m["data_checks"]["ran"] and not any(n.startswith("warning") for n in m["data_checks"]["notes"])
    assert m["threshold"] == own["threshold"]  # the operating point of validation, not one chosen on the set
    with open(run / "predictions_site.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and all(Path(r["path"]).parent.parent == ext for r in rows)
    assert sum(r["true_label"] == r["predicted_label"] for r in rows) == round(m["accuracy"] * 24)
    assert (run / "figures" / "misclassified_site.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scratch"] == own and summary["external"]["scratch"]["site"] == m
    report = (out / "report.md").read_text()
    assert "| scratch | site (external) | 12/12 |" in report and "| scratch | test | 16/16 |" in report
    assert "misclassified_site.png" in report and "evaluated only" in report
    assert "no checked set holds a copy of a train or validation image by content" in report
    assert summary["scratch"]["data_checks"]["ran"] and summary["external"]["scratch"]["site"]["data_checks"]["ran"]


@pytest.mark.slow
def test_evaluate_names_an_external_set(external_run, capsys):
    out, ext = external_run
    run = out / "scratch"
    before = json.loads((run / "metrics_site.json").read_text())
    assert main(["evaluate", str(run), "--data", str(ext), "--name", "again"]) == 0
    again = json.loads((run / "metrics_again.json").read_text())
    assert again["confusion_matrix"] == before["confusion_matrix"] and again["roc_auc"] == before["roc_auc"]
    assert "metrics_again.json" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text())["set"]["name"] == "test"  # the run's own untouched


@pytest.mark.slow
def test_evaluate_name_finds_training_images_in_the_set_and_keeps_the_warning(external_run, tmp_path, capsys):
    out, ext = external_run
    run = out / "scratch"
    cfg = json.loads((run / "config.json").read_text())
    c = cfg["config"]
    trained = prepare_splits(Path(cfg["data"]), c["val_ratio"], c["seed"], c["limit"]).train
    leaky = link_set(tmp_path / "leaky", {"NORMAL": sorted((ext / "NORMAL").iterdir()),
                                          "PNEUMONIA": sorted((ext / "PNEUMONIA").iterdir())})
    for i, s in enumerate(trained[:2]):  # two training images under new names
        os.symlink(s.path.resolve(), leaky / CLASSES[s.label] / f"copy{i}.jpeg")
    assert main(["evaluate", str(run), "--data", str(leaky), "--name", "leaky"]) == 0
    assert "warning: 2 leaky images are copies of train images by content" in capsys.readouterr().out
    m = json.loads((run / "metrics_leaky.json").read_text())
    warning, = [n for n in m["data_checks"]["notes"] if n.startswith("warning")]
    assert "copy0.jpeg" in warning and "copy1.jpeg" in warning
    assert main(["report", str(out)]) == 0
    assert "warning: 2 leaky images are copies of train images" in (out / "report.md").read_text()
    for name in ("metrics_leaky.json", "predictions_leaky.csv"):  # leave the shared run as the others expect
        (run / name).unlink()
    (run / "figures" / "misclassified_leaky.png").unlink(missing_ok=True)
    assert main(["report", str(out)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["--name", "bad/name"], "external set name 'bad/name'"),
    (["--name", "test"], "not 'test'"),
    (["--name", "x", "--data", "MISSING"], "missing: external data folder not found"),
])
def test_evaluate_refuses_bad_names_and_folders(external_run, argv, message, capsys):
    out, ext = external_run
    argv = [a.replace("MISSING", str(ext.parent / "missing")) for a in argv]
    if "--data" not in argv:
        argv += ["--data", str(ext)]
    code = main(["evaluate", str(out / "scratch"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not list((out / "scratch").glob("metrics_bad*")) and not (out / "scratch" / "metrics_x.json").exists()


def test_run_with_a_bad_external_folder_stops_before_writing(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "site" / "NORMAL").mkdir(parents=True)  # empty, and PNEUMONIA/ missing
    code = main(["run", "--data", str(tiny_data), "--out", str(out), "--tasks", "scratch", "--image-size", "32",
                 "--epochs", "1", "--external", f"site={tmp_path / 'site'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(tmp_path / "site" / "NORMAL") in err and len(err.splitlines()) == 1
    assert not out.exists()
    code = main(["run", "--data", str(tiny_data), "--out", str(out), "--external", f"a={tiny_data}",
                 "--external", f"a={tiny_data}"])
    assert code == 2 and "the same NAME is given twice" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        main(["run", "--data", str(tiny_data), "--out", str(out), "--external", "no-equals-sign"])
    assert "write NAME=DIR" in capsys.readouterr().err


def _reencoded(path: Path, size: tuple[int, int], quality: int) -> np.ndarray:
    """`path` resized to `size` and saved as a JPEG at `quality`, then decoded as cxr decodes it."""
    buf = io.BytesIO()
    Image.open(path).convert("L").resize(size).save(buf, format="JPEG", quality=quality)
    tmp = Path(os.environ["XDG_CACHE_HOME"]) / f"copy-{path.stem}.jpg"
    tmp.write_bytes(buf.getvalue())
    return load_image(tmp, 64)


def test_copies_are_found_by_content_and_distinct_children_are_not(shared_data):
    train = list_split(shared_data, "train")[:300]
    test = list_split(shared_data, "test")[:60]
    a = torch.from_numpy(np.stack([load_image(s.path, 64) for s in train]))[:, None]
    b = torch.from_numpy(np.stack([load_image(s.path, 64) for s in test]))[:, None]
    assert near_duplicates(a, b) == []  # patient-disjoint splits: no copies
    copies = torch.from_numpy(np.stack([_reencoded(train[7].path, (300, 260), 40),
                                        _reencoded(train[42].path, (180, 200), 70)]))[:, None]
    found = near_duplicates(a, torch.cat([b, copies]))
    assert [(i, j) for i, j, _ in found] == [(7, 60), (42, 61)]
    # A shared patient id with no shared image is a numbering coincidence, said plainly.
    renamed = [type(s)(s.path, s.label, train[0].patient) for s in test]
    note, = content_overlap_notes((train, a), {"test": (renamed, b)})["test"]
    assert note.startswith("note: 1 patient ids appear in both train and test") and "numbered per split" in note
    warning, = content_overlap_notes((train, a), {"test": (renamed + renamed[:2], torch.cat([b, copies]))})["test"]
    assert warning.startswith("warning: 2 test images are copies of train images by content")


def test_the_report_says_which_recipe_was_chosen_on_an_external_set():
    from cxr.reporting.sections import external_note

    ext = {"half": {"set": {"folder": "/data/official_test_half"}}}
    plain = external_note([{"task": "scratch", "externals": ext}])
    robust = external_note([{"task": "scratch", "externals": ext}, {"task": "scratch-robust", "externals": ext}])
    assert "evaluated only" in plain and "scratch-robust" not in plain
    assert "the recipe of scratch-robust was chosen on official_test_half" in robust
    assert external_note([{"task": "scratch", "externals": {}}]) is None


def test_the_report_does_not_claim_validation_chose_an_adapted_runs_threshold():
    from cxr.reporting.sections import external_note

    ext = {"half": {"set": {"folder": "/data/official_test_half"}}}
    plain = external_note([{"task": "scratch", "externals": ext}])
    assert "come from each task's rules and its validation split" in plain and "cxr adapt" not in plain
    mixed = external_note([{"task": "scratch", "externals": ext},
                           {"task": "scratch-nih", "externals": ext, "adaptation": {"adapted": "threshold"}}])
    assert "for scratch the kept epoch" in mixed and "for scratch-nih they were chosen by cxr adapt" in mixed
    only = external_note([{"task": "scratch-nih", "externals": ext, "adaptation": {"adapted": "threshold"}}])
    assert "validation split" not in only and "chosen by cxr adapt" in only


def test_the_report_says_what_its_intervals_resampled():
    from cxr.reporting.sections import resampled_units

    def metrics(unit):
        return {"at_threshold": {"operating": {"resampled": unit}}}

    kermany = [{"metrics": metrics("patients"), "externals": {"half": metrics("patients")}}]
    renamed = [{"metrics": metrics("patients"), "externals": {"site": metrics("images")}}]
    assert resampled_units(kermany).startswith("patients resampled with all their images")
    assert resampled_units(renamed).startswith("images resampled one by one where the file names carry no")
    assert resampled_units(renamed, test_only=True).startswith("patients")
