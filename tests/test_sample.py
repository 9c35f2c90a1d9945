"""The bundled sample: what it holds, `--data sample`, and `cxr demo`'s handling of missing weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from cxr import cli, pipeline
from cxr.data.folders import SAMPLE_ROOT, is_sample, list_split, resolve_data_root
from cxr.data.loading import load_images
from cxr.data.overlap import near_duplicates
from cxr.errors import WeightsError

from .helpers import SHARED_DATA, cxr

OFFICIAL_HALF = SHARED_DATA.parent / "official_test_half"


def test_the_sample_is_small_real_patient_disjoint_and_attributed():
    train, test = list_split(SAMPLE_ROOT, "train"), list_split(SAMPLE_ROOT, "test")
    assert [sum(s.label == c for s in train) for c in (0, 1)] == [100, 100]
    assert [sum(s.label == c for s in test) for c in (0, 1)] == [50, 50]
    assert not {s.patient for s in train} & {s.patient for s in test}
    size = sum(f.stat().st_size for f in SAMPLE_ROOT.rglob("*") if f.is_file())
    assert size < 5_000_000
    images = load_images([s.path for s in train + test], 64, 2)
    assert images.shape == (300, 1, 64, 64) and images.float().std() > 20  # decodable, not blank
    text = (SAMPLE_ROOT / "SAMPLE.md").read_text()
    assert "CC BY 4.0" in text and "10.17632/rscbjbr9sj" in text
    assert is_sample(SAMPLE_ROOT) and resolve_data_root(Path("sample")) == SAMPLE_ROOT


def test_no_sample_image_comes_from_the_official_test_split(tmp_path):
    """By bytes and by content (overlap.near_duplicates: a re-saved or resized copy is the same
    radiograph); a re-saved copy of an official image planted among the sample's shows the
    content check would see one."""
    if not OFFICIAL_HALF.is_dir():
        pytest.skip(f"{OFFICIAL_HALF} not found")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    official_paths = sorted(OFFICIAL_HALF.rglob("*.jpeg"))
    sample_paths = sorted(SAMPLE_ROOT.rglob("*.jpeg"))
    assert official_paths and not {digest(p) for p in official_paths} & {digest(p) for p in sample_paths}
    planted = tmp_path / "resaved.jpeg"
    with Image.open(official_paths[17]) as im:
        im.convert("L").resize((im.width // 2, im.height // 2)).save(planted, quality=60)
    official = load_images(official_paths, 64, 2)
    sample = load_images([*sample_paths, planted], 64, 2)
    found = {(i, j) for i, j, _ in near_duplicates(official, sample)}
    assert found == {(17, len(sample_paths))}  # only the planted copy


def test_a_folder_named_sample_wins_over_the_bundled_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample").mkdir()
    assert resolve_data_root(Path("sample")) == Path("sample")


@pytest.mark.slow
def test_run_on_the_sample_says_so_in_the_report(tmp_path):
    out = tmp_path / "out"
    r = cxr("run", "--data", "sample", "--out", out, "--tasks", "scratch", "--epochs", 1, "--image-size", 64,
            "--n", 2, "--workers", 2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bundled sample" in r.stdout
    for report in ("report.md", "report.html"):
        assert "bundled sample" in (out / report).read_text()
    assert '"n": 100' in (out / "scratch" / "metrics.json").read_text()


@pytest.mark.parametrize("weights", [False, True])
def test_demo_leaves_out_the_finetune_only_without_weights(weights, weights_file, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(pipeline, "run_study", lambda root, out, configs, options: calls.append((root, configs, options)))

    def offline(path):
        if path is None:
            raise WeightsError("offline")
        return {}

    monkeypatch.setattr("cxr.training.model.imagenet_state_dict", offline)
    argv = ["demo", "--out", str(tmp_path / "first"), "--device", "cpu"] + (["--weights", str(weights_file)] if weights else [])
    assert cli.main(argv) == 0
    (root, configs, options), = calls
    assert root == SAMPLE_ROOT
    assert [c.task for c in configs] == (["scratch", "finetune"] if weights else ["scratch"])
    assert all(c.epochs == 10 and c.image_size == 160 for c in configs)  # the study's epochs, a smaller size
    calls.clear()
    assert cli.main(argv + ["--quick", "--overwrite"]) == 0
    (_, quick, _), = calls
    assert all(c.epochs == 5 and c.image_size == 128 for c in quick)
    calls.clear()
    assert cli.main(argv + ["--image-size", "224", "--overwrite"]) == 0
    (_, study, _), = calls
    assert all(c.epochs == 10 and c.image_size == 224 for c in study)  # the study's settings
    calls.clear()
    capsys.readouterr()
    assert cli.main(argv + ["--image-size", "224", "--quick", "--overwrite"]) == 2
    said = capsys.readouterr()
    assert not calls and "give one of them" in said.err and "fine-tune is left out" not in said.out  # before any work
    with pytest.raises(SystemExit) as stop:  # argparse: exit code 2 and its usage line
        cli.main(argv + ["--image-size", "0", "--overwrite"])
    assert stop.value.code == 2 and not calls and "must be at least 32" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert ("fine-tune is left out" in printed) != weights
    assert (dict(options.skipped) == {} if weights else
            list(dict(options.skipped)) == ["finetune"] and "--weights PATH" in dict(options.skipped)["finetune"])


def test_the_report_names_what_was_left_out_and_why(tmp_path):
    from cxr.files import write_json
    from cxr.reporting.sections import skipped_note

    assert skipped_note(tmp_path) is None
    write_json(tmp_path / "skipped.json", {"finetune": "ImageNet weights are not in torchvision's cache"})
    assert skipped_note(tmp_path) == "Left out: finetune (ImageNet weights are not in torchvision's cache)."


def test_demo_into_a_used_folder_asks_for_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "run_study", lambda *a: None)
    (tmp_path / "first" / "scratch").mkdir(parents=True)
    (tmp_path / "first" / "scratch" / "config.json").write_text("{}")
    assert cli.main(["demo", "--out", str(tmp_path / "first"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and "--resume" not in err
    monkeypatch.setattr("cxr.training.model.imagenet_state_dict", lambda path: {})
    assert cli.main(["demo", "--out", str(tmp_path / "first"), "--device", "cpu", "--overwrite"]) == 0


def test_demo_keeps_no_resume_state(tmp_path, monkeypatch):
    """A demo cannot be resumed, so its last.pt (weights plus Adam's two moments, ~130 MB a task at
    ResNet-18's size) is not kept; best.pt and the rest stay."""
    def fake_study(root, out, configs, options):
        for c in configs:
            (out / c.task).mkdir(parents=True)
            for name in ("best.pt", "last.pt", "history.csv"):
                (out / c.task / name).write_bytes(b"x")

    monkeypatch.setattr(pipeline, "run_study", fake_study)
    monkeypatch.setattr("cxr.training.model.imagenet_state_dict", lambda path: {})
    assert cli.main(["demo", "--out", str(tmp_path / "first"), "--device", "cpu", "--precision", "fp32"]) == 0
    for task in ("scratch", "finetune"):
        assert sorted(p.name for p in (tmp_path / "first" / task).iterdir()) == ["best.pt", "history.csv"]
