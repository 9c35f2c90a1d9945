"""Bugs found by review (issue 24), each with a test that failed before its fix."""

from __future__ import annotations

import pytest
import torch

from cxr.cli import main
from cxr.config import AUGMENT_PRESETS
from cxr.training.augment import augment
from cxr.training.engine import run_epoch
from cxr.training.model import build_model
from cxr.training.preprocess import normalize

from .conftest import write_png


@pytest.mark.parametrize("preset", [p for p in AUGMENT_PRESETS if p != "none"])
def test_an_empty_share_of_a_batch_is_augmented_and_keeps_the_generators_in_step(preset):
    """torchrun: a rank whose share of the last batch is empty draws what the others draw, warps nothing."""
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    g_empty, g_full = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = augment(x[3:], preset, g_empty, rows=(3, 3, 3))
    augment(x, preset, g_full, rows=(0, 3, 3))
    assert out.shape == (0, 1, 32, 32)
    assert torch.equal(g_empty.get_state(), g_full.get_state())


def test_a_last_training_batch_of_one_is_left_for_the_next_epoch():
    """At 32 px layer4 is 1x1: batch norm cannot train on one image (it raised)."""
    torch.manual_seed(0)
    model = build_model(None).train()
    images = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1, 0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []

    def forward(x):
        seen.append(len(x))
        return model(normalize(x, "cpu"))

    out = run_epoch(forward, images, labels, 2, "cpu", optimizer, torch.Generator().manual_seed(0))
    assert seen == [2, 2] and 0 <= out["acc"] <= 1 and out["acc"] * 4 == round(out["acc"] * 4)


@pytest.mark.parametrize("command", [["train", "--data", "d", "--out", "o"], ["run", "--data", "d", "--out", "o"],
                                     ["adapt", "r", "--data", "d", "--out", "o"]])
def test_a_negative_seed_is_refused_before_anything_runs(command, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([*command, "--seed", "-1"])
    assert e.value.code == 2
    assert "--seed: must be 0 or a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_threads_sets_torchs_pool_before_the_command_runs(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["evaluate", str(tmp_path / "no-run"), "--threads", "1", "--no-cache"]) == 2  # fails after
    assert calls == [1]
    assert main(["evaluate", str(tmp_path / "no-run"), "--no-cache"]) == 2
    assert calls == [1]  # not given: torch's default stays
    # every command that computes takes it (those that only read files or the network do not)
    from cxr.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    computing = {"run", "train", "demo", "pretrain", "evaluate", "explain", "robustness", "predict", "export", "serve",
                 "adapt"}
    with_threads = {name for name, p in sub.choices.items() if any("--threads" in a.option_strings for a in p._actions)}
    assert with_threads == computing


def test_gallery_captions_state_the_threshold():
    from cxr.reporting.explain import _title

    row = {"path": "a/IM-0001-0001.jpeg", "true_label": "NORMAL", "predicted_label": "NORMAL",
           "prob_pneumonia": "0.887"}
    assert _title(row, 0.897).endswith("P(pneumonia) 0.887 < 0.897")
    assert _title(row, 0.5).endswith("P(pneumonia) 0.887 >= 0.500")


@pytest.fixture
def out_folder(tmp_path):
    """OUT/scratch as cxr run leaves it (the files these commands look for first)."""
    from cxr.config import make_config
    from cxr.files import write_json
    from cxr.training.checkpoint import make_checkpoint, save_checkpoint

    task = tmp_path / "out" / "scratch"
    config = make_config("scratch", image_size=32)
    save_checkpoint(task / "best.pt", make_checkpoint(build_model(None), config, 1, {"val_loss": 0.7}, 0.7))
    write_json(task / "config.json", {"config": config.to_dict(), "data": str(tmp_path / "data")})
    write_json(task / "metrics.json", {"accuracy": 0.5})
    (task / "history.csv").write_text("epoch,train_loss,val_loss,seconds\n1,0.7,0.7,1.0\n")
    return task


@pytest.mark.parametrize("case", ["predict_out", "predict_image_first", "explain_out", "evaluate_out",
                                  "report_task", "data_train"])
def test_the_wrong_kind_of_path_gets_the_right_advice(case, out_folder, tmp_path, capsys):
    from .conftest import write_png

    out, image = out_folder.parent, tmp_path / "chest.jpeg"
    write_png(image, 1)
    argv, expect = {
        "predict_out": (["predict", str(out), str(image)], f"pass one of its task folders, e.g. {out_folder}"),
        "predict_image_first": (["predict", str(image), str(image)], "is an image, not a checkpoint"),
        "explain_out": (["explain", str(out)], f"is an output folder: pass one of its task folders, e.g. {out_folder}"),
        "evaluate_out": (["evaluate", str(out), "--no-cache"], "is an output folder: pass one of its task folders"),
        "report_task": (["report", str(out_folder)], f"is a task folder; the report covers an output folder: pass {out}"),
        "data_train": (["train", "--data", str(tmp_path / "data" / "train"), "--out", str(tmp_path / "o")],
                       f"did you mean --data {tmp_path / 'data'}?"),
    }[case]
    if case == "data_train":
        for c in ("NORMAL", "PNEUMONIA"):
            write_png(tmp_path / "data" / "train" / c / "IM-0001-0001.png", 2)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err, err


def test_a_task_folder_stands_for_its_best_pt_and_says_so(out_folder, tmp_path, capsys, monkeypatch):
    from .conftest import write_png

    image = tmp_path / "chest.png"
    write_png(image, 1)
    assert main(["predict", str(out_folder / "best.pt"), str(image)]) == 0
    direct = capsys.readouterr().out
    assert main(["predict", str(out_folder), str(image)]) == 0
    captured = capsys.readouterr()
    assert captured.out == direct
    assert f"note: {out_folder} is a task folder: using its best.pt ({out_folder / 'best.pt'})" in captured.err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(empty), str(image)]) == 2  # a folder without best.pt is still refused
    assert "is a folder, not a checkpoint" in capsys.readouterr().err
    pytest.importorskip("fastapi")
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app.state.card["checkpoint"]))
    assert main(["serve", str(out_folder), "--port", "0"]) == 0
    assert served == [str(out_folder / "best.pt")]


def test_patient_ids_for_a_site_come_from_a_table(tmp_path, capsys):
    """`--patients CSV`: images named without ids get the table's patients, so folds and intervals
    keep a person's images together; a missing row is one line naming the table and the image."""
    from cxr.adaptation.kfold import patient_folds
    from cxr.adaptation.methods import site_samples
    from cxr.data.manifest import with_patients
    from cxr.errors import DataError

    site = tmp_path / "site"
    rows = ["path,patient"]
    for c, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(12):
            write_png(site / cls / f"scan_{c}{i:02d}.png", 50 * c + i, size=16)
            rows.append(f"{cls}/scan_{c}{i:02d}.png,p{c}{i // 3}" if i % 2 else f"scan_{c}{i:02d}.png,p{c}{i // 3}")
    table = tmp_path / "patients.csv"
    table.write_text("\n".join(rows) + "\n")
    plain = site_samples(site, unlabeled=False)
    assert len({s.patient for s in plain}) == 24  # no ids in the names: each image is its own patient
    samples = site_samples(site, unlabeled=False, patients=table)
    assert len({s.patient for s in samples}) == 8 and [s.path for s in samples] == [s.path for s in plain]
    fold = patient_folds(samples, 2, 0)
    for p in {s.patient for s in samples}:  # all of a patient's images in one fold
        assert len({fold[i] for i, s in enumerate(samples) if s.patient == p}) == 1
    table.write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(DataError, match=r"patients.csv: 1 images of .*site have no patient row \(PNEUMONIA/scan_111"):
        with_patients(plain, table, site)
    assert main(["evaluate", str(tmp_path / "run"), "--patients", str(table)]) == 2
    assert "--patients goes with --name" in capsys.readouterr().err
