"""Through the command line, as a user runs it: the output contract on real images, and bad
input ending in one clear line, exit code 2 and nothing left in OUT."""

import csv
import json
from pathlib import Path

import pytest
import torch

from cxr.cli import main
from cxr.data.dataset import patient_id
from cxr.training.model import IMAGENET_WEIGHTS

from .conftest import cxr

CONTRACT = ("config.json", "history.csv", "best.pt", "last.pt", "metrics.json", "predictions.csv")


def test_run_fills_the_output_contract(study):
    out, result = study
    assert "images (patients)" in result.stdout  # the data summary
    for task in ("scratch", "finetune"):
        for name in CONTRACT:
            assert (out / task / name).is_file(), f"{task}/{name} missing"
    assert (out / "report.md").is_file() and (out / "summary.json").is_file()
    assert (out / "report.html").is_file() and (out / "figures" / "compare_loss.png").is_file()
    timings = json.loads((out / "timings.json").read_text())
    steps = ["check and decode data", "scratch: train", "finetune: train", "scratch: evaluate",
             "scratch: figures and CAMs", "finetune: evaluate", "finetune: figures and CAMs", "report", "total"]
    assert list(timings) == steps and all(v >= 0 for v in timings.values())
    assert timings["total"] >= sum(v for k, v in timings.items() if k != "total") - 0.05
    assert json.loads((out / "summary.json").read_text())["timings"] == timings
    assert "where the time went" in result.stdout and "finetune: train" in result.stdout
    for task in ("scratch", "finetune"):
        for name in ("loss", "confusion", "roc", "misclassified", "cam_normal", "cam_pneumonia"):
            png = out / task / "figures" / f"{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


@pytest.mark.parametrize("task", ["scratch", "finetune"])
def test_run_numbers_are_consistent(study, task):
    out, _ = study
    m = json.loads((out / task / "metrics.json").read_text())
    cm = m["confusion_matrix"]
    assert sum(map(sum, cm)) == m["n"] == 48
    for i, name in enumerate(("NORMAL", "PNEUMONIA")):
        pc = m["per_class"][name]
        assert pc["total"] == sum(cm[i]) == 24  # --limit 24 per class, the shared test has more
        assert pc["correct"] == cm[i][i]
    assert 0 <= m["roc_auc"] <= 1
    with open(out / task / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "true_label", "predicted_label", "prob_pneumonia", "patient"]
    assert all(r["patient"] == patient_id(Path(r["path"]).name) for r in rows)  # what the intervals grouped by
    assert len(rows) == m["n"]
    assert sum(r["true_label"] == r["predicted_label"] for r in rows) == round(m["accuracy"] * m["n"])
    assert all(r["true_label"] == r["path"].split("/")[-2] for r in rows)
    assert all(r["predicted_label"] == ("PNEUMONIA" if float(r["prob_pneumonia"]) >= m["threshold"] else "NORMAL")
               for r in rows)
    with open(out / task / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert {"epoch", "train_loss", "val_loss", "train_acc", "val_acc", "seconds"} <= set(history[0])
    assert len(history) == 1
    ck = torch.load(out / task / "best.pt", weights_only=True)
    assert ck["config"]["task"] == task and ck["classes"] == ["NORMAL", "PNEUMONIA"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary[task] == m
    assert f"| {task} |" in (out / "report.md").read_text()
    recorded = json.loads((out / task / "config.json").read_text())
    assert recorded["device"] == "cpu" and recorded["compile"] is False
    # --precision auto: bf16 exactly where the CPU has AMX tiles (bf16 matrix units)
    assert recorded["precision"] == ("bf16" if torch.cpu._is_amx_tile_supported() else "fp32")


def test_evaluate_alone_reproduces_the_metrics(study, tmp_path):
    out, _ = study
    before = json.loads((out / "scratch" / "metrics.json").read_text())
    result = cxr("evaluate", out / "scratch")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test" in result.stdout and "images (patients)" in result.stdout
    assert json.loads((out / "scratch" / "metrics.json").read_text()) == before


def test_rerun_into_a_used_folder_is_refused(study, shared_data):
    out, _ = study
    result = cxr("run", "--data", shared_data, "--out", out, "--limit", 2, "--epochs", 1, "--tasks", "scratch")
    assert result.returncode == 2
    assert "--overwrite" in result.stderr and "Traceback" not in result.stderr


def run_main(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_clean_failure(code, err, out, *needles):
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("cxr: error: "), err
    for needle in needles:
        assert str(needle) in err, err
    assert not out.exists(), "a failed run left output behind"


def test_missing_data_folder(capsys, tmp_path):
    code, err = run_main(capsys, "run", "--data", tmp_path / "nope", "--out", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", tmp_path / "nope")


def test_empty_class(capsys, tiny_data, tmp_path):
    for p in (tiny_data / "test" / "NORMAL").iterdir():
        p.unlink()
    code, err = run_main(capsys, "run", "--data", tiny_data, "--out", tmp_path / "out", "--tasks", "scratch")
    assert_clean_failure(code, err, tmp_path / "out", tiny_data / "test" / "NORMAL", "no .jpeg")


def test_unreadable_image(capsys, tiny_data, tmp_path):
    bad = tiny_data / "train" / "PNEUMONIA" / "person77_virus_1.jpeg"
    bad.write_text("not an image")
    code, err = run_main(capsys, "run", "--data", tiny_data, "--out", tmp_path / "out", "--tasks", "scratch",
                         "--image-size", 32)
    assert_clean_failure(code, err, tmp_path / "out", bad, "remove or replace")


@pytest.mark.parametrize("breakage, detail", [("missing", "missing ['bn1.bias'"),
                                               ("shape", "conv1.weight has shape (3, 3), ResNet-18 needs (64, 3, 7, 7)"),
                                               ("unexpected", "unexpected ['extra.weight']")])
def test_weights_of_the_wrong_shape(capsys, tiny_data, tmp_path, breakage, detail):
    from torchvision.models import resnet18

    state = resnet18().state_dict()
    if breakage == "missing":
        state = {"conv1.weight": state["conv1.weight"]}
    elif breakage == "shape":
        state["conv1.weight"] = torch.zeros(3, 3)
    else:
        state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "w.pt"
    torch.save(state, bad)
    code, err = run_main(capsys, "run", "--data", tiny_data, "--out", tmp_path / "out", "--weights", bad)
    assert_clean_failure(code, err, tmp_path / "out", bad, "ResNet-18")
    assert detail in err, err


def test_no_weights_offline_stops_before_training(capsys, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(type(IMAGENET_WEIGHTS), "get_state_dict", offline)
    code, err = run_main(capsys, "run", "--data", tiny_data, "--out", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "--weights PATH", "internet")


def test_train_then_evaluate_on_tiny_data(capsys, tiny_data, tmp_path):
    out = tmp_path / "out"
    code = main(["train", "--data", str(tiny_data), "--out", str(out), "--task", "scratch", "--epochs", "2",
                 "--image-size", "32", "--batch-size", "4", "--val-ratio", "0.25"])
    assert code == 0
    assert {p.name for p in (out / "scratch").iterdir()} == {"config.json", "history.csv", "best.pt", "last.pt",
                                                               "val_predictions.csv"}
    assert main(["evaluate", str(out / "scratch"), "--device", "cpu"]) == 0
    m = json.loads((out / "scratch" / "metrics.json").read_text())
    assert m["n"] == 6 and m["per_class"]["NORMAL"]["total"] == 3


def test_evaluate_without_a_run(capsys, tmp_path):
    code, err = run_main(capsys, "evaluate", tmp_path)
    assert code == 2 and "config.json" in err and len(err.splitlines()) == 1


def test_evaluate_refuses_a_foreign_checkpoint(capsys, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"weights": torch.zeros(2)}, run_dir / "best.pt")
    code, err = run_main(capsys, "evaluate", run_dir, "--data", tiny_data)
    assert code == 2 and "not a cxr checkpoint" in err and str(run_dir / "best.pt") in err


def test_help_lists_the_commands():
    result = cxr("--help")
    assert result.returncode == 0
    for command in ("run", "train", "evaluate", "explain", "report", "adapt", "demo", "download"):
        assert command in result.stdout


@pytest.mark.parametrize("flags, expected", [([], [(224, 10), (224, 20)]), (["--quick"], [(128, 5)] * 2),
                                             (["--quick", "--epochs", "7"], [(128, 7)] * 2),
                                             (["--quick", "--image-size", "96"], [(96, 5)] * 2)])
def test_quick_is_smaller_images_and_fewer_epochs_unless_told(flags, expected):
    from cxr.cli import build_parser
    from cxr.commands.options import configs as _configs

    args = build_parser().parse_args(["run", "--data", "d", "--out", "o", "--tasks", "scratch,scratch-robust", *flags])
    configs = _configs(args.tasks, args)
    assert [(c.image_size, c.epochs) for c in configs] == expected
    assert configs[1].augment == "frame"  # the rest of each preset stays


def test_a_mistyped_task_gets_the_nearest_name(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--data", "x", "--out", "y", "--tasks", "scratch,scrach-robust"])
    err = capsys.readouterr().err
    assert "unknown task 'scrach-robust' ('scrach-robust': did you mean 'scratch-robust'?)" in err
    assert "choose from scratch, finetune" in err
