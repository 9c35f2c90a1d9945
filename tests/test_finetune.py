"""`cxr adapt --finetune`: supervised fine-tuning at a site, replay of the source run's images,
and its k-fold evaluation (inner validation by patient, never the scoring fold)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import cxr.adaptation.methods as adapt_module
from cxr.adaptation.finetune import finetune, freeze_for, replay_batches
from cxr.adaptation.kfold import patient_folds
from cxr.adaptation.methods import site_validation_split
from cxr.cli import main
from cxr.config import FinetuneSpec, make_config
from cxr.data.dataset import Sample, patient_id
from cxr.files import read_csv, write_json
from cxr.training.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from cxr.training.model import build_model

from .test_adapt import SIZE, digest, write_image


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
    torch.manual_seed(0)
    config = make_config("scratch-robust", image_size=SIZE)
    ck = make_checkpoint(build_model(None), config, 1, {"val_loss": 0.7}, 0.7)
    ck.update(threshold=0.5, temperature=1.0, operating_point={"rule": "0.5", "threshold": 0.5, "temperature": 1.0,
                                                               "chosen_on": "validation"})
    run = tmp_path / "runs" / "scratch-robust"
    save_checkpoint(run / "best.pt", ck)
    write_json(run / "config.json", {"config": config.to_dict(), "data": str(data.resolve())})
    (run / "history.csv").write_text("epoch,train_loss,train_acc,val_loss,val_acc,val_auc,lr,seconds\n"
                                     "1,0.7,0.5,0.7,0.5,0.5,0.001,1.0\n")
    return run


def test_a_fine_tuned_model_chooses_the_first_sites_point_again_by_the_sources_rule(source_run, tmp_path):
    """A source whose threshold is Youden's J on its validation split: after fine-tuning, the
    stored threshold of that source no longer means what it meant, so the first site's point is
    Youden's J of the fine-tuned model on the same validation split (the default, and --site source)."""
    from cxr.adaptation.adapt import source_validation
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


def test_finetune_trains_only_what_it_is_told_and_replays_in_every_batch(monkeypatch):
    torch.manual_seed(0)
    config = make_config("scratch-robust", image_size=SIZE)
    site_x = torch.randint(0, 256, (12, 1, SIZE, SIZE), dtype=torch.uint8)
    site_y = torch.tensor([0, 1] * 6)
    rep_x = torch.full((10, 1, SIZE, SIZE), 7, dtype=torch.uint8)  # replay images recognisable by their value
    rep_y = torch.tensor([0, 1] * 5)
    seen = []
    real = adapt_module.finetune.__globals__["normalize"]
    monkeypatch.setitem(finetune.__globals__, "normalize",
                        lambda x, *a, **k: (seen.append(x.clone()) if k.get("augment") else None) or real(x, *a, **k))
    model = build_model(None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = FinetuneSpec(train="last", epochs=2, replay=0.5, batch_size=4)
    model, history, _ = finetune(model, config, spec, site_x, site_y, site_x[:4], site_y[:4], "cpu", 0, (rep_x, rep_y))
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


def test_kfold_finetune_validates_inside_the_training_folds(source_run, tmp_path, monkeypatch, capsys):
    site = make_nih_site(tmp_path / "nih", patients=9)
    calls = []
    real = adapt_module._finetune

    def spy(model, config, images, y, patients, device, seed, plan, context):
        fitted = real(model, config, images, y, patients, device, seed, plan, context)
        calls.append((list(patients), fitted.holdout.copy()))
        return fitted

    monkeypatch.setitem(adapt_module.METHODS, "finetune", adapt_module.Method(spy, True, "spy {spec}"))
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
