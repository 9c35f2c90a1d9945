"""Through the command line, as a user runs it: the output contract on real images, and bad
input ending in one clear line, exit code 2 and nothing left in OUT."""

import csv
import json
from pathlib import Path

import pytest
import torch

from cxr.cli import main
from cxr.data.dataset import patient_id
from cxr.training import machine
from cxr.training.model import IMAGENET_WEIGHTS

from .helpers import HISTORY, cxr, make_run_dir, write_png

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
    assert list(rows[0]) == ["path", "true_label", "predicted_label", "prob_pneumonia", "patient", "ood_score",
                             "in_distribution"]  # the last two: best.pt carries the out-of-distribution statistics
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
    # --precision auto: what timed training steps on this CPU found faster (cached), and why
    assert recorded["precision"] == machine.measured_cpu_precision()[0]
    assert "images/s in bf16" in recorded["precision_reason"]


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


@pytest.mark.slow
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


@pytest.mark.slow
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
                 "adapt", "check"}
    with_threads = {name for name, p in sub.choices.items() if any("--threads" in a.option_strings for a in p._actions)}
    assert with_threads == computing


@pytest.fixture
def out_folder(tmp_path):
    """OUT/scratch as cxr run leaves it (the files these commands look for first)."""
    return make_run_dir(tmp_path / "out" / "scratch", seed=None, data=tmp_path / "data", metrics={"accuracy": 0.5},
                        history=HISTORY)


@pytest.mark.parametrize("case", ["predict_out", "predict_image_first", "explain_out", "evaluate_out",
                                  "report_task", "data_train"])
def test_the_wrong_kind_of_path_gets_the_right_advice(case, out_folder, tmp_path, capsys):
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
