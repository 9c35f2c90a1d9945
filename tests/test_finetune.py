"""Fine-tuning at a site (adaptation/finetune.py, `cxr adapt --finetune`): the loop (what it trains,
replay of the source run's images, the kept epoch, the class-balanced loss, validation on held-out
patients), the ways to keep the first site (WiSE-FT, L2-SP, LP-FT and the model soup, checked
against their definitions; adaptation/weights.py), and the command: a fine-tuned run written, its
operating points per site, its k-fold evaluation (inner validation by patient, never the scoring
fold), and the settings it refuses before training."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxr.adaptation import finetune as ft
from cxr.adaptation import methods
from cxr.adaptation.settings import estimate_settings, kfold_estimate
from cxr.adaptation.finetune import (
    SOUP_SEED_STEP,
    WISE_GRID,
    average_states,
    finetune,
    freeze_for,
    kept_epoch,
    replay_batches,
)
from cxr.adaptation.weights import adabn, l2sp_penalty, wise_mix
from cxr.adaptation.kfold import patient_folds
from cxr.adaptation.methods import site_validation_split
from cxr.cli import main
from cxr.config import FinetuneSpec, make_config
from cxr.data.dataset import Sample, patient_id
from cxr.errors import CxrError, DataError
from cxr.files import read_csv, write_json
from cxr.training.checkpoint import load_checkpoint, save_checkpoint
from cxr.training.model import build_model

from .helpers import SIZE, digest, make_run_dir, write_image


def make_nih_site(root: Path, patients: int = 8) -> Path:
    """A site named like NIH's files (PPPPPPPP_FFF): 1-3 follow-ups per patient."""
    for c, (name, level) in enumerate((("NORMAL", 90), ("PNEUMONIA", 150))):
        for p in range(patients):
            for f in range(p % 3 + 1):
                write_image(root / name / f"{10000000 + 100 * c + p:08d}_{f:03d}.png", level, 1000 * c + 10 * p + f)
    return root


@pytest.fixture
def source_run(tmp_path) -> Path:
    """A run folder whose config names a real (tiny) data folder, for replay and the source test split."""
    data = tmp_path / "kermany"
    for split, n in (("train", 10), ("test", 4)):
        for i in range(n):
            write_image(data / split / "NORMAL" / f"IM-{i + 100 * (split == 'test'):04d}-0001.png", 60, i)
            write_image(data / split / "PNEUMONIA" / f"person{i + 100 * (split == 'test')}_virus_{i}.png", 200, 50 + i)
    return make_run_dir(tmp_path / "runs" / "scratch-robust", task="scratch-robust", threshold=0.5, rule="0.5",
                        temperature=1.0, data=data.resolve(),
                        history="epoch,train_loss,train_acc,val_loss,val_acc,val_auc,lr,seconds\n"
                                "1,0.7,0.5,0.7,0.5,0.5,0.001,1.0\n")


@pytest.mark.slow
def test_a_fine_tuned_model_chooses_the_first_sites_point_again_by_the_sources_rule(source_run, tmp_path):
    """A source whose threshold is Youden's J on its validation split: after fine-tuning, the
    stored threshold of that source no longer means what it meant, so the first site's point is
    Youden's J of the fine-tuned model on the same validation split (the default, and --site source)."""
    from cxr.adaptation.source import source_validation
    from cxr.evaluation.evaluate import pneumonia_probability, predict_logits
    from cxr.evaluation.metrics import youden_threshold
    from cxr.training.checkpoint import model_from_checkpoint

    ck = load_checkpoint(source_run / "best.pt")
    config = make_config("scratch", image_size=SIZE)  # Youden's J, no temperature
    ck.update(config=config.to_dict(), threshold=0.123,
              operating_point={"rule": "youden", "threshold": 0.123, "temperature": 1.0, "chosen_on": "validation"})
    save_checkpoint(source_run / "best.pt", ck)
    run_config = json.loads((source_run / "config.json").read_text())
    write_json(source_run / "config.json", {**run_config, "config": config.to_dict()})
    out = tmp_path / "runs" / "youden-nih"
    assert main(["adapt", str(source_run), "--data", str(make_nih_site(tmp_path / "nih")), "--out", str(out),
                 "--finetune", "--epochs", "1", "--replay", "0", "--device", "cpu", "--no-cache",
                 "--precision", "fp32"]) == 0
    new = load_checkpoint(out / "best.pt")
    x, y = source_validation(run_config["data"], config, 0, None, lambda _: None)
    model, _ = model_from_checkpoint(new)
    expected = youden_threshold(y.numpy(), pneumonia_probability(predict_logits(model, x, 64, "cpu", config.intensity)))
    assert new["threshold"] == pytest.approx(expected) and new["threshold"] != 0.123
    point = new["operating_points"]["source"]
    assert point["threshold"] == pytest.approx(expected) and point["rule"] == "youden"
    assert f"validation split ({len(y)} images)" in point["chosen_on"]


def test_nih_names_give_patients_and_folds_keep_them_whole(tmp_path):
    site = make_nih_site(tmp_path / "nih")
    samples = [Sample(p, c, patient_id(p.name)) for c, name in enumerate(("NORMAL", "PNEUMONIA"))
               for p in sorted((site / name).iterdir())]
    assert len({s.patient for s in samples}) == 16 and len(samples) == 30
    fold = patient_folds(samples, 4, seed=0)
    for patient in {s.patient for s in samples}:
        assert len({int(f) for s, f in zip(samples, fold) if s.patient == patient}) == 1


def test_site_validation_split_is_by_patient_and_stratified():
    y = np.array([0] * 20 + [1] * 20)
    patients = [f"p{i // 2}" for i in range(40)]  # two images each
    fit, val = site_validation_split(y, patients, 0.25, seed=0)
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(40))
    assert {patients[i] for i in fit}.isdisjoint({patients[i] for i in val})
    assert set(y[val]) == {0, 1} and 6 <= len(val) <= 14


def test_replay_batches_hold_images_of_both_sites():
    spec = FinetuneSpec(replay=0.25, batch_size=8)
    steps = replay_batches(30, 100, spec, torch.Generator().manual_seed(0))
    assert all(len(site) >= 1 and len(rep) == 2 for site, rep in steps)
    assert sorted(torch.cat([s for s, _ in steps]).tolist()) == list(range(30))  # each site image once an epoch
    assert all(len(s) == 6 for s, _ in steps[:-1])
    assert all(len(rep) == 0 for _, rep in replay_batches(30, 100, FinetuneSpec(replay=0.0, batch_size=8),
                                                            torch.Generator().manual_seed(0)))


@pytest.mark.slow
def test_finetune_trains_only_what_it_is_told_and_replays_in_every_batch(monkeypatch):
    torch.manual_seed(0)
    config = make_config("scratch-robust", image_size=SIZE)
    site_x = torch.randint(0, 256, (12, 1, SIZE, SIZE), dtype=torch.uint8)
    site_y = torch.tensor([0, 1] * 6)
    rep_x = torch.full((10, 1, SIZE, SIZE), 7, dtype=torch.uint8)  # replay images recognisable by their value
    rep_y = torch.tensor([0, 1] * 5)
    seen = []
    real = methods.finetune.__globals__["normalize"]
    monkeypatch.setitem(finetune.__globals__, "normalize",
                        lambda x, *a, **k: (seen.append(x.clone()) if k.get("augment") else None) or real(x, *a, **k))
    model = build_model(None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = FinetuneSpec(train="last", epochs=2, replay=0.5, batch_size=4)
    model, history, _ = finetune(model, config, spec, site_x, site_y, site_x[:4], site_y[:4], "cpu", seed=0,
                                 replay=(rep_x, rep_y))
    assert len(history) == 2 and len(seen) == 2 * 6  # 2 site + 2 replay images a step, 6 steps an epoch
    assert all((x == 7).all(dim=(1, 2, 3)).sum() == 2 for x in seen)  # both sites in every batch
    after = model.state_dict()
    assert torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert torch.equal(before["layer3.0.bn1.running_mean"], after["layer3.0.bn1.running_mean"])  # frozen, eval mode
    assert not torch.equal(before["layer4.0.conv1.weight"], after["layer4.0.conv1.weight"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    assert all(p.requires_grad for p in model.parameters())  # the returned model is left as a normal one
    assert [n for n, p in build_model(None).named_parameters() if n.startswith("fc")] == ["fc.weight", "fc.bias"]
    assert {n.split(".")[0] for n, p in model.named_parameters()} >= {"fc", "layer4"}
    assert len(freeze_for(model, "fc")) == 2


@pytest.mark.slow
def test_finetune_on_a_tiny_site_writes_a_loadable_run_and_leaves_the_source(source_run, tmp_path, capsys):
    site = make_nih_site(tmp_path / "nih")
    before = digest(source_run / "best.pt")
    out = tmp_path / "runs" / "scratch-robust-nih"
    ext = source_run.parent.parent / "kermany" / "test"
    tracked = ["--log", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    assert main(["adapt", str(source_run), "--data", str(site), "--out", str(out), "--finetune", "--train", "all",
                 "--epochs", "2", "--replay", "0.5", "--external", f"half={ext}", "--device", "cpu", "--no-cache",
                 "--precision", "fp32", *tracked]) == 0
    assert digest(source_run / "best.pt") == before
    ck = load_checkpoint(out / "best.pt")
    src = load_checkpoint(source_run / "best.pt")
    assert not torch.equal(ck["model"]["conv1.weight"], src["model"]["conv1.weight"])
    a = ck["adaptation"]
    assert a["adapted"] == "finetune-all+replay0.5"  # the source's operating point is kept by default
    ft = a["finetune"]
    assert ft["train"] == "all" and ft["epochs"] == 2 and ft["replay"] == 0.5 and len(ft["history"]) == 2
    assert ft["replay_images"] > 0 and ft["site_train"]["images"] + ft["site_validation"]["images"] == 30
    assert ck["operating_point"]["chosen_on"].startswith("the source run's rule (0.5) applied again to the fine-tuned")
    assert ck["threshold"] == 0.5 and ck["operating_points"]["source"]["threshold"] == 0.5
    rows = (out / "site_predictions.csv").read_text().splitlines()
    assert rows[0] == "path,true_label,prob_pneumonia,role"
    val = [r.split(",")[0] for r in rows[1:] if r.endswith(",validation")]
    fit = [r.split(",")[0] for r in rows[1:] if r.endswith(",fit")]
    assert len(val) == ft["site_validation"]["images"] and {patient_id(Path(p).name) for p in val}.isdisjoint(
        {patient_id(Path(p).name) for p in fit})
    assert (out / "metrics.json").is_file() and (out / "metrics_half.json").is_file()  # both sites measured
    epochs = read_csv(out / "finetune_history.csv")  # the fine-tune's own epochs, beside the source's history.csv
    assert [int(r["epoch"]) for r in epochs] == [1, 2] and sum(r["best"] == "True" for r in epochs) == 1
    assert [float(r["val_auc"]) for r in epochs] == pytest.approx([r["val_auc"] for r in ft["history"]])
    printed = capsys.readouterr().out
    assert "source test split" in printed and "half: accuracy" in printed
    if tracked:  # the fine-tuning's epochs and the new run's results, read back with TensorBoard's reader
        from tensorboard.backend.event_processing.event_accumulator import (
            EventAccumulator,
        )

        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        assert [(e.step, e.value) for e in events.Scalars("epoch/val_auc")] == [
            (r["epoch"], pytest.approx(r["val_auc"], rel=1e-6)) for r in ft["history"]]
        assert "half/accuracy" in events.Tags()["scalars"] and "epoch/best" not in events.Tags()["scalars"]
        assert json.loads((out / "config.json").read_text())["tracking"]["tensorboard"] == str(out / "tensorboard")
    # --site-threshold: chosen on the site's validation patients instead (here of a soup of two fine-tunes)
    chosen = tmp_path / "runs" / "site-threshold"
    assert main(["adapt", str(source_run), "--data", str(site), "--out", str(chosen), "--finetune", "--epochs", "1",
                 "--soup", "2", "--site-threshold", "--device", "cpu", "--no-cache", "--precision", "fp32"]) == 0
    ck = load_checkpoint(chosen / "best.pt")
    assert ck["adaptation"]["adapted"] == "finetune-all+replay0.5+soup2+threshold"
    assert ck["operating_point"]["chosen_on"] == "site validation patients"
    soup = ck["adaptation"]["finetune"]["soup_fitted"]
    assert soup["members"] == 2 and soup["kept_epochs"] == [1, 1]
    from cxr.deploy.predict import load_model

    assert "a soup of 2 such fine-tunes (seeds apart; epochs 1, 1 kept) deployed" in load_model(
        chosen / "best.pt").describe_operating_point()


def test_finetune_refuses_unlabeled_and_external_without_finetune(source_run, tmp_path, capsys):
    site = make_nih_site(tmp_path / "nih")
    out = tmp_path / "out"
    assert main(["adapt", str(source_run), "--data", str(site), "--out", str(out), "--finetune", "--unlabeled",
                 "--no-cache"]) == 2
    assert main(["adapt", str(source_run), "--data", str(site), "--out", str(out), "--external", f"x={site}",
                 "--no-cache"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("cxr: error: ") for line in err)
    assert not out.exists()


@pytest.mark.slow
def test_kfold_finetune_validates_inside_the_training_folds(source_run, tmp_path, monkeypatch, capsys):
    site = make_nih_site(tmp_path / "nih", patients=9)
    calls = []
    real = methods._finetune

    def spy(model, config, images, y, patients, device, seed, plan, context):
        fitted = real(model, config, images, y, patients, device, seed, plan, context)
        calls.append((list(patients), fitted.holdout.copy()))
        return fitted

    monkeypatch.setitem(methods.METHODS, "finetune", methods.Method(spy, True, "spy {spec}"))
    out = tmp_path / "eval"
    assert main(["adapt", str(source_run), "--data", str(site), "--out", str(out), "--evaluate", "3",
                 "--finetune", "--train", "fc", "--epochs", "1", "--replay", "0.5", "--device", "cpu", "--no-cache",
                 "--precision", "fp32"]) == 0
    result = json.loads((out / "adapt_evaluation.json").read_text())
    samples = [Sample(p, c, patient_id(p.name)) for c, name in enumerate(("NORMAL", "PNEUMONIA"))
               for p in sorted((site / name).iterdir())]
    fold = patient_folds(samples, 3, seed=0)
    assert len(calls) == 3 * 2  # 3 folds x (without, with replay)
    for i, (patients, holdout) in enumerate(calls):
        held = {s.patient for s, f in zip(samples, fold) if f == (i // 2)}
        assert held.isdisjoint(patients)  # the scoring fold is never seen, not even as validation
        assert {patients[j] for j in holdout}.isdisjoint({p for j, p in enumerate(patients) if j not in holdout})
    variants = [r["variant"] for r in result["rows"]]
    assert variants == ["source", "threshold", "adabn", "adabn+threshold", "finetune-fc", "finetune-fc+threshold",
                        "finetune-fc+replay0.5", "finetune-fc+replay0.5+threshold",
                        "nested choice", "nested choice+threshold"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["source"]["vs_source"]["accuracy"]["value"] == 0  # paired with itself
    assert rows["finetune-fc+replay0.5"]["source_sets"]["source_test_accuracy"]["models"] == 3
    assert "accuracy vs source (paired)" in (out / "adapt_evaluation.md").read_text()
    # every pooled held-out prediction is kept: each variant predicted each site image once, and the rows
    # reproduce the table's numbers
    with open(out / "adapt_predictions.csv", newline="") as f:
        pooled = list(csv.DictReader(f))
    assert len(pooled) == len(variants) * len(samples)
    mine = [r for r in pooled if r["variant"] == "finetune-fc+replay0.5+threshold"]
    assert sorted(Path(r["path"]).name for r in mine) == sorted(s.path.name for s in samples)
    y, prob = np.array([r["true_label"] == "PNEUMONIA" for r in mine]), np.array([float(r["prob_pneumonia"]) for r in mine])
    thr = np.array([float(r["threshold"]) for r in mine])
    assert roc_auc_score(y, prob) == pytest.approx(rows["finetune-fc+replay0.5+threshold"]["roc_auc"]["value"], abs=1e-5)
    assert ((prob >= thr) == y).mean() == pytest.approx(rows["finetune-fc+replay0.5+threshold"]["accuracy"]["value"])
    # cxr compare pairs two evaluations of the site on the same held-out images (here: a copy that ranks every
    # pneumonia image above every normal one, so the difference is exactly the first's ROC AUC minus 1)
    other = tmp_path / "eval-other"
    other.mkdir()
    (other / "adapt_evaluation.json").write_text((out / "adapt_evaluation.json").read_text())
    perfect = [dict(r, prob_pneumonia="0.9" if r["true_label"] == "PNEUMONIA" else "0.1")
               for r in reversed(pooled)]  # another order: the comparison aligns by content
    with open(other / "adapt_predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(pooled[0]))
        writer.writeheader()
        writer.writerows(perfect)
    assert main(["compare", str(out), str(other), "--out", str(tmp_path / "cmp")]) == 2  # which variant: one line
    assert "--variant" in capsys.readouterr().err
    assert main(["compare", str(out), str(other), "--variant", "finetune-fc+replay0.5+threshold",
                 "--out", str(tmp_path / "cmp")]) == 0
    cmp = json.loads((tmp_path / "cmp" / "comparisons.json").read_text())
    assert cmp["pairs"][0]["tests"]["roc_auc"]["difference"] == pytest.approx(roc_auc_score(y, prob) - 1, abs=1e-9)
    right = (prob >= thr) == y  # the copy is right wherever its fold's threshold lies in (0.1, 0.9]
    perfect_right = np.where(y, 0.9 >= thr, 0.1 < thr)
    assert cmp["pairs"][0]["tests"]["accuracy"]["difference"] == pytest.approx(right.mean() - perfect_right.mean())
    assert cmp["runs"][0]["threshold"].startswith("per fold")
    # the model fitted on all the site's images carries that estimate into its card (predict and serve)
    fitted = tmp_path / "fitted"
    assert main(["adapt", str(source_run), "--data", str(site), "--out", str(fitted), "--finetune", "--train", "fc",
                 "--epochs", "1", "--replay", "0.5", "--estimate-from", str(out), "--device", "cpu", "--no-cache",
                 "--precision", "fp32"]) == 0
    k = load_checkpoint(fitted / "best.pt")["adaptation"]["kfold_estimate"]
    assert k["variant"] == "finetune-fc+replay0.5" and k["folds"] == 3
    assert k["accuracy"] == rows["finetune-fc+replay0.5"]["accuracy"]
    from cxr.deploy.predict import load_model
    from cxr.deploy.serve import model_card

    text = load_model(fitted / "best.pt").describe_operating_point()
    assert "expected at the site (3-fold by patients): accuracy" in text and "fc trained for 1 epochs" in text
    assert model_card(load_checkpoint(fitted / "best.pt"), fitted / "best.pt")["fitted_at"] == load_model(fitted / "best.pt").describe_operating_point(
        ).split("; ", 1)[1]
    # the table travels with the model, and the report of its folder shows it
    assert (fitted / "adapt_evaluation.md").read_text() == (out / "adapt_evaluation.md").read_text()
    assert main(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "Fitting at the site, measured by k folds" in report and "| finetune-fc+replay0.5 |" in report
    assert "expected at the site (3-fold by patients)" in report
    assert "<h3>Fitting at the site" in (tmp_path / "report.html").read_text()
    # an estimate of other settings is refused in one line, and nothing is written
    for other in (["--train", "all"], ["--train", "fc", "--epochs", "1", "--replay", "0.5", "--lr", "1e-3"]):
        capsys.readouterr()
        assert main(["adapt", str(source_run), "--data", str(site), "--out", str(tmp_path / "other"), "--finetune",
                     *other, "--estimate-from", str(out), "--no-cache"]) == 2
        assert capsys.readouterr().err.count("\n") == 1
        assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_out_never_touches_the_source_run_even_with_overwrite(source_run, tmp_path, capsys, where):
    site = make_nih_site(tmp_path / "nih")
    out = {"same": source_run, "inside": source_run / "adapted", "contains": source_run.parent}[where]
    before = sorted(p.name for p in source_run.iterdir())
    assert main(["adapt", str(source_run), "--data", str(site), "--out", str(out), "--overwrite", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the source run" in err
    assert sorted(p.name for p in source_run.iterdir()) == before


@pytest.mark.slow
def test_kfold_warns_when_file_names_carry_no_patient(source_run, tmp_path, capsys):
    site = tmp_path / "renamed"
    for c, (name, level) in enumerate((("NORMAL", 90), ("PNEUMONIA", 150))):
        for i in range(10):
            write_image(site / name / f"scan{c}{i:02d}.png", level, 100 * c + i)
    out = tmp_path / "eval"
    assert main(["adapt", str(source_run), "--data", str(site), "--out", str(out), "--evaluate", "2",
                 "--device", "cpu", "--no-cache"]) == 0
    result = json.loads((out / "adapt_evaluation.json").read_text())
    assert result["warning"].startswith("20 of 20 site images carry no patient id")
    assert "warning: 20 of 20 site images" in capsys.readouterr().out
    assert {r["resampled"] for r in result["rows"]} == {"images"}
    table = (out / "adapt_evaluation.md").read_text()
    assert "resampling images" in table and "Warning: 20 of 20 site images" in table


# --- the loop: the kept epoch, its validation, the loss, replay ------------------------------------

def random_site(n=16, imbalance=False):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (n, 1, SIZE, SIZE), dtype=torch.uint8)
    y = torch.tensor([1 if (imbalance and i % 4 == 0) or (not imbalance and i % 2) else 0 for i in range(n)])
    return x, y

@pytest.mark.slow
def test_the_kept_epoch_is_the_best_scored_one_and_only_it_is_marked(monkeypatch):
    scripted = iter([0.60, 0.90, 0.70])
    seen = []

    def scores(model, sets, device, intensity):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {name: next(scripted) if name == "site" else 1.0 for name in sets}

    monkeypatch.setattr(ft, "validation_scores", scores)
    x, y = random_site()
    config = make_config("scratch", image_size=SIZE)
    model, history, _ = finetune(build_model(None), config, FinetuneSpec(epochs=3, batch_size=8, replay=0), x, y,
                                 x[:4], y[:4], "cpu")
    assert [r["best"] for r in history] == [False, True, False] and kept_epoch(history) == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, seen[1][k]), k  # epoch 2's weights, not the last epoch's

def test_a_validation_split_of_one_class_is_refused_before_training():
    x, y = random_site()
    config = make_config("scratch", image_size=SIZE)
    with pytest.raises(DataError, match="no NORMAL image"):
        finetune(build_model(None), config, FinetuneSpec(epochs=2, batch_size=8, replay=0), x, y,
                 x[y == 1][:3], y[y == 1][:3], "cpu")

@pytest.mark.slow
def test_the_epoch_is_chosen_on_both_sites_validation(monkeypatch):
    """The spy sees the site's and the source's validation images, and the worst site decides."""
    calls = []
    site_scores, source_scores = iter([0.9, 0.8, 0.95]), iter([0.5, 0.7, 0.6])

    def scores(model, sets, device, intensity):
        calls.append({k: v[0].clone() for k, v in sets.items()})
        return {"site": next(site_scores), "source": next(source_scores)}

    monkeypatch.setattr(ft, "validation_scores", scores)
    x, y = random_site()
    src_x, src_y = torch.full((6, 1, SIZE, SIZE), 9, dtype=torch.uint8), torch.tensor([0, 1] * 3)
    config = make_config("scratch", image_size=SIZE)
    _, history, _ = finetune(build_model(None), config, FinetuneSpec(epochs=3, batch_size=8, replay=0), x[4:], y[4:],
                             x[:4], y[:4], "cpu", source_val=(src_x, src_y))
    assert all(set(c) == {"site", "source"} for c in calls)
    assert torch.equal(calls[0]["site"], x[:4]) and torch.equal(calls[0]["source"], src_x)
    assert kept_epoch(history) == 2  # min(0.9, 0.5), min(0.8, 0.7), min(0.95, 0.6): epoch 2

def test_the_site_loss_is_class_balanced(monkeypatch):
    """With the per-image loss 1 on PNEUMONIA and 0 on NORMAL, a class-balanced mean is 1/2 whatever
    the classes' shares; unweighted it would be the PNEUMONIA share (1/4 here)."""
    real = ft.F.cross_entropy

    def one_for_pneumonia(logits, y, reduction="none", label_smoothing=0.0):
        return real(logits, y, reduction="none") * 0 + y.float()

    monkeypatch.setattr(ft.F, "cross_entropy", one_for_pneumonia)
    x, y = random_site(16, imbalance=True)
    config = make_config("scratch", image_size=SIZE)
    _, history, _ = finetune(build_model(None), config, FinetuneSpec(epochs=1, batch_size=16, replay=0), x, y,
                             torch.cat([x[:2], x[4:5]]), torch.tensor([1, 0, 1]), "cpu")
    assert history[0]["train_loss"] == pytest.approx(0.5)

def test_the_fine_tuning_validation_is_held_out_patients(monkeypatch):
    got = {}

    def spy(model, config, spec, images, labels, val_images, val_labels, *a, **k):
        got.update(fit=images, val=val_images)
        return model, [{"epoch": 1, "best": True}], None

    monkeypatch.setattr(methods, "finetune", spy)
    x = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 4, 4).contiguous()
    y = np.array([i % 2 for i in range(40)])
    patients = [f"p{i // 2}" for i in range(40)]
    plan = methods.Plan(False, "finetune", 10, None, FinetuneSpec(val_ratio=0.25))
    fitted = methods._finetune(build_model(None), make_config("scratch"), x, y, patients, "cpu", 0, plan,
                               methods.Context())
    fit_ids, val_ids = set(got["fit"][:, 0, 0, 0].tolist()), set(got["val"][:, 0, 0, 0].tolist())
    assert fit_ids.isdisjoint(val_ids) and len(fit_ids) + len(val_ids) == 40
    assert val_ids == set(fitted.holdout.tolist())
    assert {patients[i] for i in fit_ids}.isdisjoint({patients[i] for i in val_ids})

@pytest.mark.parametrize("replay", [0.5, 0.985, 0.99])
def test_replay_batches_hold_batch_size_images_with_a_site_image(replay):
    spec = FinetuneSpec(replay=replay, batch_size=32)
    steps = replay_batches(100, 500, spec, torch.Generator().manual_seed(0))
    assert all(len(s) >= 1 and len(s) + len(r) <= 32 for s, r in steps)
    assert all(len(s) + len(r) == 32 for s, r in steps[:-1])
    assert sum(len(s) for s, _ in steps) == 100


# --- keeping the first site: WiSE-FT, L2-SP, LP-FT, the soup ----------------------------------------

def _states():
    torch.manual_seed(0)
    a, b = build_model(None), build_model(None)
    return a.state_dict(), b.state_dict()


def test_wise_mix_is_the_source_at_0_the_fine_tuned_at_1_and_linear_between():
    src, tuned = _states()
    at0, at1, half = wise_mix(src, tuned, 0.0), wise_mix(src, tuned, 1.0), wise_mix(src, tuned, 0.5)
    for k in tuned:
        if tuned[k].is_floating_point():
            assert torch.equal(at0[k], src[k]) and torch.equal(at1[k], tuned[k]), k
            assert torch.allclose(half[k], (src[k] + tuned[k]) / 2), k
        else:
            assert torch.equal(half[k], tuned[k]), k  # batch-norm counters: the fine-tuned model's


def test_l2sp_is_zero_at_the_source_and_the_squared_distance_elsewhere():
    model = build_model(None)
    params = list(model.parameters())
    anchor = [p.detach().clone() for p in params]
    assert l2sp_penalty(params, anchor).item() == 0.0
    with torch.no_grad():
        params[0].add_(0.5)
    assert l2sp_penalty(params, anchor).detach().item() == pure_distance(params[0], anchor[0])


def pure_distance(p, a):
    return float(((p.detach() - a) ** 2).sum())


def learnable_site(n=24):
    torch.manual_seed(1)
    y = torch.tensor([i % 2 for i in range(n)])
    x = (torch.rand(n, 1, SIZE, SIZE) * 120 + 60 * y.view(-1, 1, 1, 1)).to(torch.uint8)
    return x, y


@pytest.mark.slow
def test_l2sp_keeps_the_weights_nearer_the_source():
    x, y = learnable_site()
    config = make_config("scratch", image_size=SIZE)
    distances = {}
    for beta in (0.0, 50.0):
        torch.manual_seed(0)
        model = build_model(None)
        start = [p.detach().clone() for p in model.parameters()]
        spec = FinetuneSpec(epochs=2, batch_size=8, replay=0, lr=1e-3, l2sp=beta)
        model, _, _ = finetune(model, config, spec, x[8:], y[8:], x[:8], y[:8], "cpu")
        distances[beta] = float(l2sp_penalty(list(model.parameters()), start))
    assert distances[50.0] < distances[0.0]


@pytest.mark.slow
def test_wise_ft_chooses_its_coefficient_on_every_sites_validation(monkeypatch):
    """The grid is scored on the site's and the source's validation images; the best worst-site
    score wins, and the returned weights are that mix (batch norm re-estimated)."""
    x, y = learnable_site()
    src_val = (x[:6].clone(), y[:6].clone())
    seen = []
    real = ft.validation_scores

    def spy(model, sets, device, intensity):
        seen.append(sorted(sets))
        return real(model, sets, device, intensity)

    monkeypatch.setattr(ft, "validation_scores", spy)
    torch.manual_seed(0)
    model = build_model(None)
    source = {k: v.clone() for k, v in model.state_dict().items()}
    config = make_config("scratch", image_size=SIZE)
    spec = FinetuneSpec(epochs=2, batch_size=8, replay=0, lr=1e-3, wise=True)
    model, history, chosen = finetune(model, config, spec, x[12:], y[12:], x[6:12], y[6:12], "cpu",
                                      source_val=src_val)
    wise = chosen["wise"]
    assert all(s == ["site", "source"] for s in seen) and len(seen) == 2 + len(WISE_GRID)
    assert [g["alpha"] for g in wise["grid"]] == list(WISE_GRID)
    best = max(wise["grid"], key=lambda g: g["score"])
    assert wise["alpha"] == best["alpha"]
    assert all(g["score"] == min(g["val_auc_site"], g["val_auc_source"]) for g in wise["grid"])
    if wise["alpha"] == 0.0:
        assert torch.equal(model.state_dict()["conv1.weight"], source["conv1.weight"])
    else:
        assert not torch.equal(model.state_dict()["conv1.weight"], source["conv1.weight"])


@pytest.mark.slow
def test_wise_ft_at_a_fixed_coefficient_mixes_there_and_chooses_nothing(monkeypatch):
    """--wise-alpha A: the weights are A x fine-tuned + (1 - A) x source (batch norm re-estimated
    afterwards, so the weights alone are compared), the grid is not searched, and the record says so."""
    x, y = learnable_site()
    mixes = []
    real = ft.wise_mix
    monkeypatch.setattr(ft, "wise_mix", lambda s, t, a: mixes.append(a) or real(s, t, a))
    monkeypatch.setattr(ft, "choose_mix", lambda *a, **k: pytest.fail("a fixed coefficient searches no grid"))
    config = make_config("scratch", image_size=SIZE)
    results = {}
    for alpha in (None, 0.3):
        torch.manual_seed(0)
        model = build_model(None)
        source = {k: v.clone() for k, v in model.state_dict().items()}
        spec = FinetuneSpec(epochs=1, batch_size=8, replay=0, lr=1e-3)
        if alpha is not None:
            spec = FinetuneSpec(epochs=1, batch_size=8, replay=0, lr=1e-3, wise=True, wise_alpha=alpha)
        model, _, chosen = finetune(model, config, spec, x[8:], y[8:], x[:8], y[:8], "cpu")
        results[alpha] = (model.state_dict(), chosen)
    tuned, mixed = results[None][0]["conv1.weight"], results[0.3][0]["conv1.weight"]
    assert torch.allclose(mixed, 0.3 * tuned + 0.7 * source["conv1.weight"], atol=1e-6)
    assert mixes == [0.3]
    wise = results[0.3][1]["wise"]
    assert wise["alpha"] == 0.3 and wise["fixed"] and wise["chosen_on"] is None and len(wise["grid"]) == 1
    assert FinetuneSpec(wise=True, wise_alpha=0.5).name == "finetune-all+replay0.5+wise0.5"
    with pytest.raises(ValueError, match="wise_alpha"):
        FinetuneSpec(wise_alpha=0.5)  # without wise
    with pytest.raises(ValueError, match="wise_alpha"):
        FinetuneSpec(wise=True, wise_alpha=1.5)


def test_lp_ft_trains_the_head_alone_first():
    x, y = learnable_site()
    config = make_config("scratch", image_size=SIZE)
    torch.manual_seed(0)
    model = build_model(None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = FinetuneSpec(epochs=2, batch_size=8, replay=0, lp_epochs=1)
    snapshots = []
    real = ft.validation_scores
    ft_scores = lambda m, s, d, i: snapshots.append(m.state_dict()["conv1.weight"].clone()) or real(m, s, d, i)  # noqa: E731
    ft.validation_scores, saved = ft_scores, ft.validation_scores
    try:
        finetune(model, config, spec, x[8:], y[8:], x[:8], y[:8], "cpu")
    finally:
        ft.validation_scores = saved
    assert torch.equal(snapshots[0], before["conv1.weight"])      # epoch 1: the head alone
    assert not torch.equal(snapshots[1], before["conv1.weight"])  # epoch 2: everything
    assert FinetuneSpec(lp_epochs=2, l2sp=0.01, wise=True).name == "finetune-all+replay0.5+l2sp0.01+lp2+wise"


def test_evaluate_measures_each_way_of_keeping_the_first_site_apart_and_fitting_combines_them():
    from cxr.cli import build_parser
    from cxr.commands.adapt import _finetunes

    common = ["adapt", "RUN", "--data", "SITE", "--out", "OUT", "--finetune", "--wise", "--l2sp", "0.01",
              "--lp-epochs", "5"]
    measured = _finetunes(build_parser().parse_args(common + ["--evaluate", "5"]))
    assert [s.name for s in measured] == ["finetune-all", "finetune-all+replay0.5", "finetune-all+replay0.5+wise",
                                          "finetune-all+replay0.5+l2sp0.01", "finetune-all+replay0.5+lp5"]
    (fitted,) = _finetunes(build_parser().parse_args(common))
    assert (fitted.wise, fitted.l2sp, fitted.lp_epochs, fitted.replay) == (True, 0.01, 5, 0.5)
    soups = _finetunes(build_parser().parse_args(["adapt", "RUN", "--data", "SITE", "--out", "OUT", "--finetune",
                                                  "--soup", "3", "--evaluate", "5"]))
    assert [s.name for s in soups] == ["finetune-all", "finetune-all+replay0.5", "finetune-all+replay0.5+soup3"]
    fixed = _finetunes(build_parser().parse_args(["adapt", "RUN", "--data", "SITE", "--out", "OUT", "--finetune",
                                                  "--wise-alpha", "0.5", "--evaluate", "5"]))
    assert [s.name for s in fixed] == ["finetune-all", "finetune-all+replay0.5", "finetune-all+replay0.5+wise0.5"]
    (one,) = _finetunes(build_parser().parse_args(["adapt", "RUN", "--data", "SITE", "--out", "OUT", "--finetune",
                                                   "--wise-alpha", "0.5"]))
    assert (one.wise, one.wise_alpha) == (True, 0.5)
    curve = _finetunes(build_parser().parse_args(["adapt", "RUN", "--data", "SITE", "--out", "OUT", "--finetune",
                                                  "--wise-alpha", "0.6,0.8,0.6", "--l2sp", "0.01", "--evaluate", "5"]))
    assert [s.name for s in curve] == ["finetune-all", "finetune-all+replay0.5", "finetune-all+replay0.5+wise0.6",
                                       "finetune-all+replay0.5+wise0.8", "finetune-all+replay0.5+l2sp0.01"]
    with pytest.raises(CxrError, match="one coefficient"):  # one fitted model mixes at one coefficient
        _finetunes(build_parser().parse_args(["adapt", "RUN", "--data", "SITE", "--out", "OUT", "--finetune",
                                              "--wise-alpha", "0.6,0.8"]))
    for bad in ("1.5", "0.5,x", ","):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["adapt", "RUN", "--data", "SITE", "--out", "OUT", "--finetune", "--wise-alpha", bad])


@pytest.mark.slow
def test_the_soup_averages_its_members_fine_tuned_from_the_source_seeds_apart():
    """A soup of 2 is the mean of the two fine-tunes that finetune() returns alone with the members'
    seeds (each from the source weights), its batch norm then re-estimated on the site's images."""
    x, y = learnable_site()
    config = make_config("scratch", image_size=SIZE)
    base = dict(epochs=2, batch_size=8, replay=0, lr=1e-3)
    members = []
    for k in range(2):
        torch.manual_seed(0)
        model, _, chosen = finetune(build_model(None), config, FinetuneSpec(**base), x[8:], y[8:], x[:8], y[:8], "cpu",
                                    seed=SOUP_SEED_STEP * k)
        assert chosen is None  # a plain fine-tune chose nothing after training
        members.append({k: v.clone() for k, v in model.state_dict().items()})
    assert not torch.equal(members[0]["conv1.weight"], members[1]["conv1.weight"])  # seeds apart: other weights
    torch.manual_seed(0)
    soup, history, chosen = finetune(build_model(None), config, FinetuneSpec(**base, soup=2), x[8:], y[8:], x[:8],
                                     y[:8], "cpu")
    expected = build_model(None)
    expected.load_state_dict(average_states(members))
    adabn(expected, ft.batchnorm_images(x[8:], None, torch.Generator().manual_seed(2)), config.intensity, "cpu")
    for name, tensor in expected.state_dict().items():
        assert torch.allclose(soup.state_dict()[name].float(), tensor.float(), atol=1e-6), name
    assert [r["member"] for r in history] == [1, 1, 2, 2]
    assert chosen["soup"]["members"] == 2 and chosen["soup"]["seeds"] == [0, SOUP_SEED_STEP]
    assert len(chosen["soup"]["kept_epochs"]) == 2 and "val_auc_site" in chosen["soup"]
    mean = average_states(members)["conv1.weight"]
    assert torch.allclose(mean, (members[0]["conv1.weight"] + members[1]["conv1.weight"]) / 2)
    assert FinetuneSpec(soup=3, wise=True).name == "finetune-all+replay0.5+soup3+wise"


@pytest.mark.slow
def test_a_wise_variant_mixes_the_folds_fine_tune_instead_of_training_it_again(monkeypatch):
    """In one fold of `cxr adapt --evaluate`, WiSE-FT at a fixed coefficient of a spec trained
    before mixes that fine-tune: the same model as training it alone, with one training fewer."""
    from dataclasses import replace

    x, y = learnable_site()
    config = make_config("scratch", image_size=SIZE)
    calls = []
    real = ft._train

    def spy(*args, **kwargs):
        calls.append(args[2].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, "_train", spy)
    plain = FinetuneSpec(epochs=2, batch_size=8, replay=0, lr=1e-3)
    wise = replace(plain, wise=True, wise_alpha=0.5)

    def run(spec, trained):
        torch.manual_seed(0)  # the same source model each time
        return finetune(build_model(None), config, spec, x[8:], y[8:], x[:8], y[:8], "cpu", seed=3, trained=trained)

    trained = {}
    first = {k: v.clone() for k, v in run(plain, trained)[0].state_dict().items()}
    reused, history_reused, chosen_reused = run(wise, trained)
    assert calls == [plain.name]  # not trained again
    alone, history_alone, chosen_alone = run(wise, None)
    assert calls == [plain.name, wise.name]
    for key, value in alone.state_dict().items():
        torch.testing.assert_close(reused.state_dict()[key], value, msg=key)
    assert history_reused == history_alone and chosen_reused == chosen_alone
    assert chosen_reused["wise"]["alpha"] == 0.5
    run(replace(plain, l2sp=0.1), trained)  # another training spec trains
    again = run(plain, trained)[0].state_dict()  # and the first is reused again, unchanged by the mix
    for key, value in first.items():
        assert torch.equal(again[key], value), key
    assert calls == [plain.name, wise.name, replace(plain, l2sp=0.1).name]


@pytest.mark.slow
def test_a_soup_in_a_fold_reuses_the_plain_fine_tune_as_its_first_member(monkeypatch):
    """Beside the plain fine-tune of a fold, `--soup 2` trains only its second member: the first
    (same spec, same seed) is the plain one, and the soup equals the soup trained alone."""
    from dataclasses import replace

    x, y = learnable_site()
    config = make_config("scratch", image_size=SIZE)
    calls = []
    real = ft._train

    def spy(*args, **kwargs):
        calls.append((args[2].name, kwargs["seed"]))  # the spec and the seed it trains with
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, "_train", spy)
    plain = FinetuneSpec(epochs=2, batch_size=8, replay=0, lr=1e-3)
    soup = replace(plain, soup=2)

    def run(spec, trained):
        torch.manual_seed(0)
        return finetune(build_model(None), config, spec, x[8:], y[8:], x[:8], y[:8], "cpu", seed=3, trained=trained)

    trained = {}
    run(plain, trained)
    reused, history_reused, chosen_reused = run(soup, trained)
    assert calls == [(plain.name, 3), (soup.name, 3 + SOUP_SEED_STEP)]  # only the second member trained
    alone, history_alone, chosen_alone = run(soup, None)
    assert calls[2:] == [(soup.name, 3), (soup.name, 3 + SOUP_SEED_STEP)]
    for key, value in alone.state_dict().items():
        torch.testing.assert_close(reused.state_dict()[key], value, msg=key)
    assert history_reused == history_alone and chosen_reused == chosen_alone


# --- what the command refuses before training; an operating point per site -------------------------

@pytest.fixture
def source(tmp_path):
    """An untrained scratch run whose data folder is absent, and a site of flat grey images at tmp_path/site."""
    from PIL import Image

    run = make_run_dir(tmp_path / "runs" / "scratch", seed=None, data=tmp_path / "nowhere")
    for i in range(12):
        for cls, level in (("NORMAL", 90), ("PNEUMONIA", 150)):
            p = tmp_path / "site" / cls / (f"IM-{i:04d}-0001.png" if cls == "NORMAL" else f"person{i}_virus_{i}.png")
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((SIZE, SIZE), level + i, np.uint8)).save(p)
    return run

@pytest.mark.parametrize("lr", ["-1", "0", "nan", "inf"])
def test_adapt_refuses_a_learning_rate_that_cannot_train(source, tmp_path, lr, capsys):
    with pytest.raises(SystemExit) as e:
        main(["adapt", str(source), "--data", str(tmp_path / "site"), "--out", str(tmp_path / "new"), "--finetune",
              "--lr", lr])
    assert e.value.code == 2 and "--lr" in capsys.readouterr().err and not (tmp_path / "new").exists()

@pytest.mark.parametrize("extra, says", [(["--tent"], "--tent"), (["--adabn"], "--adabn"),
                                         (["--target-sensitivity", "0.9"], "--site-threshold")])
def test_adapt_refuses_options_finetuning_would_ignore(source, tmp_path, extra, says, capsys, monkeypatch):
    monkeypatch.setattr(methods, "finetune", lambda *a, **k: pytest.fail("trained"))
    assert main(["adapt", str(source), "--data", str(tmp_path / "site"), "--out", str(tmp_path / "new"),
                 "--finetune", "--replay", "0", *extra]) == 2
    assert says in capsys.readouterr().err and not (tmp_path / "new").exists()

def test_adapt_finds_a_bad_external_folder_before_fine_tuning(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(methods, "finetune", lambda *a, **k: pytest.fail("fine-tuned before checking --external"))
    (tmp_path / "empty").mkdir()
    assert main(["adapt", str(source), "--data", str(tmp_path / "site"), "--out", str(tmp_path / "new"),
                 "--finetune", "--replay", "0", "--external", f"half={tmp_path / 'empty'}"]) == 2
    assert str(tmp_path / "empty") in capsys.readouterr().err and not (tmp_path / "new").exists()

def test_estimate_from_refuses_an_evaluation_of_other_settings(tmp_path):
    src, site = tmp_path / "src", tmp_path / "site"
    spec = FinetuneSpec()
    row = {"variant": spec.name, "per_class": None, **{m: {"value": 0.7} for m in
                                                       ("accuracy", "sensitivity", "specificity", "roc_auc")}}
    write_json(tmp_path / "eval" / "adapt_evaluation.json", {
        "source_run": str(src.resolve()), "site": str(site.resolve()), "folds": 5, "finetune": [spec.to_dict()],
        "rows": [row], "settings": estimate_settings(None, 10, None, 0)})
    same = kfold_estimate(tmp_path / "eval", src, site, spec.name, spec=spec,
                          settings=estimate_settings(None, 10, None, 0))
    assert same["folds"] == 5
    for other, named in [(estimate_settings(0.9, 10, None, 0), "target_sensitivity"),
                         (estimate_settings(None, 5, None, 0), "tent_steps"),
                         (estimate_settings(None, 10, None, 1), "seed")]:
        with pytest.raises(CxrError, match=named):
            kfold_estimate(tmp_path / "eval", src, site, spec.name, spec=spec, settings=other)
    table = tmp_path / "patients.csv"
    table.write_text("path,patient\na.png,1\n")
    with pytest.raises(CxrError, match="patients_sha256"):
        kfold_estimate(tmp_path / "eval", src, site, spec.name, spec=spec,
                       settings=estimate_settings(None, 10, table, 0))

@pytest.mark.slow
def test_a_fine_tuned_model_stores_an_operating_point_per_site_and_predict_uses_it(source, tmp_path, capsys):
    import csv

    from cxr.evaluation.metrics import youden_threshold
    from cxr.training.checkpoint import load_checkpoint

    new = tmp_path / "new"
    assert main(["adapt", str(source), "--data", str(tmp_path / "site"), "--out", str(new), "--finetune",
                 "--replay", "0", "--epochs", "2", "--site-name", "nih", "--no-cache"]) == 0
    ck = load_checkpoint(new / "best.pt")
    points = ck["operating_points"]
    assert set(points) == {"nih", "source"} and points["source"]["threshold"] == ck["threshold"]
    with open(new / "site_predictions.csv", newline="") as f:
        val = [r for r in csv.DictReader(f) if r["role"] == "validation"]
    assert points["nih"]["chosen_on"] == f"{len(val)} site validation images"
    # fewer than 20 site validation images: no flag threshold or reference of the site's own (the pooled
    # ones stand; tests/test_site_flags.py: with enough of them)
    assert len(val) < 20 and "ood_threshold" not in points["nih"] and "reference_rows" not in points["nih"]
    assert len(ck["trust"]["reference"]["scores"]) == len(val)  # the source run's data is absent here
    # the site's threshold is Youden's J on the validation images alone, at the site's temperature:
    # site_predictions.csv holds P at the kept (source) temperature; back to the logit margin, then to the site's
    y = np.array([r["true_label"] == "PNEUMONIA" for r in val], dtype=int)
    q = np.array([float(r["prob_pneumonia"]) for r in val])
    margin = np.log(q / (1 - q)) * ck["temperature"]
    p_site = 1 / (1 + np.exp(-margin / points["nih"]["temperature"]))
    assert points["nih"]["threshold"] == pytest.approx(youden_threshold(y, p_site), abs=1e-6)
    capsys.readouterr()
    image = next((tmp_path / "site" / "PNEUMONIA").iterdir())
    assert main(["predict", str(new / "best.pt"), str(image), "--site", "nih", "--output", str(tmp_path / "r.json")]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["threshold"] == pytest.approx(points["nih"]["threshold"])
    assert record["temperature"] == pytest.approx(points["nih"]["temperature"])
    assert record["out_of_distribution"]["threshold"] == pytest.approx(ck["trust"]["threshold"])
    capsys.readouterr()
    assert main(["check", str(new / "best.pt"), str(tmp_path / "site"), "--site", "nih", "--no-cache"]) == 0
    assert f"against the model's {len(val)} validation images" in capsys.readouterr().out
    assert main(["predict", str(new / "best.pt"), str(image), "--site", "elsewhere"]) == 2
    err = capsys.readouterr().err
    assert "--site elsewhere" in err and "nih, source" in err
    assert json.loads((new / "adaptation.json").read_text())["operating_points"]["nih"] == points["nih"]
    assert main(["evaluate", str(new), "--data", str(tmp_path / "site"), "--name", "here", "--site", "nih",
                 "--no-cache"]) == 0
    m = json.loads((new / "metrics_here.json").read_text())
    assert m["threshold"] == pytest.approx(points["nih"]["threshold"]) and m["operating_point"]["site"] == "nih"
