"""`cxr adapt`: operating point on a labelled site sample, AdaBN and TENT on unlabelled images,
the k-fold evaluation, and every bad input ending in one line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.adaptation.kfold import patient_folds
from cxr.adaptation.methods import adabn, site_samples, tent
from cxr.adaptation.settings import AdaptSettings
from cxr.cli import main
from cxr.data.dataset import Sample
from cxr.deploy.predict import load_model
from cxr.evaluation.evaluate import pneumonia_probability, predict_logits
from cxr.evaluation.metrics import youden_threshold
from cxr.training.checkpoint import load_checkpoint
from cxr.training.model import build_model

from .helpers import HISTORY, SIZE, digest, make_run_dir, make_site, write_png


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder as `cxr train` leaves it (random weights; adaptation trains nothing)."""
    return make_run_dir(tmp_path / "runs" / "scratch", threshold=0.42, temperature=1.0, data=tmp_path / "data",
                        history=HISTORY)


def test_adabn_changes_the_running_statistics_and_nothing_else():
    torch.manual_seed(0)
    model = build_model(None).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (20, 1, SIZE, SIZE), dtype=torch.uint8)
    adabn(model, images, "none", "cpu", batch_size=8)
    after = model.state_dict()
    stats = [k for k in after if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(not torch.equal(before[k], after[k]) for k in stats if not k.endswith("tracked"))
    assert all(torch.equal(before[k], after[k]) for k in after if k not in stats)
    assert not model.training and all(m.momentum == 0.1 for m in model.modules() if hasattr(m, "momentum"))
    # the first layer's statistics are those of conv1's output over the site images (three equal batches)
    from cxr.training.preprocess import normalize

    with torch.no_grad():
        features = model.conv1(normalize(images, "cpu", "none"))
    mean = torch.stack([c.mean(dim=(0, 2, 3)) for c in torch.tensor_split(features, 3)]).mean(0)
    assert torch.allclose(model.bn1.running_mean, mean, atol=1e-5)


def test_tent_changes_only_batchnorm_affine_parameters():
    torch.manual_seed(0)
    model = build_model(None, train_backbone=False)  # a frozen backbone: flags must come back as they were
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (24, 1, SIZE, SIZE), dtype=torch.uint8)
    tent(model, images, "none", "cpu", steps=3, lr=1e-2, batch_size=8)
    after = model.state_dict()
    bn_affine = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                 for p in ("weight", "bias")}
    params = {n for n, _ in model.named_parameters()}
    changed = {k for k in params if not torch.equal(before[k], after[k])}
    assert changed and changed <= bn_affine
    assert len(changed) > len(bn_affine) // 2
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training


def test_patient_folds_never_split_a_patient():
    samples = [Sample(Path(f"{c}{p}_{i}.png"), c, f"p{c}-{p}") for c in (0, 1) for p in range(13) for i in range(p % 4 + 1)]
    fold = patient_folds(samples, 4, seed=3)
    for patient in {s.patient for s in samples}:
        assert len({int(f) for s, f in zip(samples, fold) if s.patient == patient}) == 1
    for f in range(4):
        assert {s.label for s, g in zip(samples, fold) if g == f} == {0, 1}
    assert (fold == patient_folds(samples, 4, seed=3)).all()
    assert not (fold == patient_folds(samples, 4, seed=4)).all()


@pytest.mark.slow
def test_labelled_site_gives_a_new_run_with_the_site_operating_point(run_dir, tmp_path, capsys):
    site = make_site(tmp_path / "site")
    source = digest(run_dir / "best.pt")
    out = tmp_path / "runs" / "scratch-site"
    assert main(["adapt", str(run_dir), "--data", str(site), "--out", str(out), "--device", "cpu", "--no-cache"]) == 0
    assert digest(run_dir / "best.pt") == source  # the source run is never changed
    assert sorted(p.name for p in out.iterdir()) == ["adaptation.json", "best.pt", "config.json", "history.csv",
                                                     "site_predictions.csv"]
    raw = torch.load(out / "best.pt", weights_only=True)  # plain data only
    ck = load_checkpoint(out / "best.pt")
    assert raw["threshold"] == ck["threshold"] != 0.42
    # the threshold is Youden's J of the (source) model on the site images, at the fitted temperature
    model = build_model(None)
    model.load_state_dict(ck["model"])
    samples = site_samples(site, unlabeled=False)
    images = torch.stack([torch.from_numpy(np.array(Image.open(s.path)))[None] for s in samples])
    y = np.array([s.label for s in samples])
    prob = pneumonia_probability(predict_logits(model, images, 64, "cpu"), ck["temperature"])
    assert ck["threshold"] == pytest.approx(youden_threshold(y, prob))
    a = ck["adaptation"]
    assert a["counts"] == {"NORMAL": 12, "PNEUMONIA": 12} and a["patients"] == 12 and a["labeled"]
    assert a["adapted"] == "threshold" and a["source_operating_point"]["threshold"] == 0.42
    assert ck["operating_point"]["chosen_on"] == "site"
    assert json.loads((out / "adaptation.json").read_text()) == a
    # predict uses the adapted operating point and says so
    capsys.readouterr()
    assert main(["predict", str(out / "best.pt"), str(site / "NORMAL"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"threshold {ck['threshold']:.3f}" in printed and "adapted (threshold) to the site" in printed
    assert load_model(out / "best.pt").adaptation["site"] == str(site.resolve())


def test_unlabelled_site_adapts_batch_norm_and_keeps_the_threshold(run_dir, tmp_path):
    site = make_site(tmp_path / "site", labelled=False)
    out = tmp_path / "adapted"
    assert main(["adapt", str(run_dir), "--data", str(site), "--out", str(out), "--unlabeled", "--tent",
                 "--tent-steps", "2", "--device", "cpu", "--no-cache"]) == 0
    src, new = load_checkpoint(run_dir / "best.pt"), load_checkpoint(out / "best.pt")
    assert new["threshold"] == src["threshold"] == 0.42 and new["operating_point"] == src["operating_point"]
    assert not torch.equal(src["model"]["bn1.running_mean"], new["model"]["bn1.running_mean"])
    assert not torch.equal(src["model"]["bn1.weight"], new["model"]["bn1.weight"])  # TENT
    assert torch.equal(src["model"]["conv1.weight"], new["model"]["conv1.weight"])
    assert new["adaptation"]["adapted"] == "tent" and new["adaptation"]["counts"] == {"images": 24}
    assert not (out / "site_predictions.csv").exists()


def fingerprint(images: torch.Tensor) -> np.ndarray:
    return images.flatten(1).double().sum(1).numpy() / 1e6  # one number per image


def fingerprinted_logits():
    """(index, fake predict_logits): the fake returns each image's fingerprint as its logit, and its
    first call (the source model on every site image) fills index: fingerprint -> site image."""
    index: dict[float, int] = {}

    def fake_logits(model, images, *args, **kwargs):
        key = fingerprint(images)
        if not index:
            index.update({float(v): i for i, v in enumerate(key)})
        return np.stack([key, np.zeros_like(key)], 1)
    return index, fake_logits


@pytest.mark.slow
def test_kfold_choices_see_only_the_other_folds(run_dir, tmp_path, monkeypatch):
    """Spies: every operating point and every fitted model of fold f sees exactly the other
    folds' images, never one of the held fold (identified by a fingerprint in place of logits)."""
    import cxr.adaptation.kfold as ae

    site = make_site(tmp_path / "site", per_class=18)
    fold = ae.patient_folds(site_samples(site, unlabeled=False), 3, 0)
    index, fake_logits = fingerprinted_logits()

    chosen, fitted = [], []
    real_op, real_fit = ae.site_operating_point, ae.fit_model

    def spy_op(logits, y, target):
        chosen.append(sorted(index[float(v)] for v in logits[:, 0]))
        return real_op(logits, y, target)

    def spy_fit(checkpoint, plan, images, *args, **kwargs):
        fitted.append(sorted(index[float(v)] for v in fingerprint(images)))
        return real_fit(checkpoint, plan, images, *args, **kwargs)

    monkeypatch.setattr(ae, "predict_logits", fake_logits)
    monkeypatch.setattr(ae, "site_operating_point", spy_op)
    monkeypatch.setattr(ae, "fit_model", spy_fit)
    ae.evaluate_adaptation(run_dir, site, tmp_path / "eval", k=3,
                           settings=AdaptSettings(device="cpu", log=lambda _: None))
    assert len(index) == 36
    others = [sorted(np.flatnonzero(fold != f).tolist()) for f in range(3)]
    assert chosen == [others[f] for f in range(3) for _ in ("keep", "adabn")]
    assert fitted == others


@pytest.mark.slow
def test_kfold_fine_tuning_thresholds_see_only_its_validation_patients(run_dir, tmp_path, monkeypatch):
    """The "+threshold" variants of fine-tuning choose their operating point on the fitted model's
    validation patients, a part of the other folds, never on an image of the scored fold."""
    import cxr.adaptation.kfold as ae
    from cxr.config import FinetuneSpec

    site = make_site(tmp_path / "site", per_class=18)
    fold = ae.patient_folds(site_samples(site, unlabeled=False), 3, 0)
    index, fake_logits = fingerprinted_logits()

    chosen, holdouts = [], []
    real_op, real_fit = ae.site_operating_point, ae.fit_model

    def spy_op(logits, y, target):
        chosen.append(sorted(index[float(v)] for v in logits[:, 0]))
        return real_op(logits, y, target)

    def spy_fit(checkpoint, plan, images, *args, **kwargs):
        fitted = real_fit(checkpoint, plan, images, *args, **kwargs)
        if fitted.holdout is not None:
            holdouts.append(sorted(index[float(v)] for v in fingerprint(images[fitted.holdout])))
        return fitted

    monkeypatch.setattr(ae, "predict_logits", fake_logits)
    monkeypatch.setattr(ae, "site_operating_point", spy_op)
    monkeypatch.setattr(ae, "fit_model", spy_fit)
    ae.evaluate_adaptation(run_dir, site, tmp_path / "eval", k=3,
                           settings=AdaptSettings(device="cpu", log=lambda _: None),
                           finetunes=[FinetuneSpec(epochs=1, batch_size=8, replay=0)])
    others = [set(np.flatnonzero(fold != f).tolist()) for f in range(3)]
    # per fold: keep, adabn, then the fine-tuning, whose threshold reads its validation patients only
    finetuned = chosen[2::3]
    assert len(finetuned) == 3 and finetuned == holdouts
    for f in range(3):
        assert set(finetuned[f]) < others[f]


@pytest.mark.slow
def test_the_nested_choice_reads_the_training_parts_validation_patients_and_reports_the_chosen(run_dir, tmp_path,
                                                                                                monkeypatch):
    """In each outer fold the variant is chosen on the fine-tunes' own validation patients (part of the
    other folds), and the nested rows are exactly the chosen variant's predictions of the held fold."""
    import cxr.adaptation.kfold as ae
    from cxr.config import FinetuneSpec

    site = make_site(tmp_path / "site", per_class=18)
    inner_sets, holdouts = [], []
    real_split, real_fit = ae.site_validation_split, ae.fit_model

    def spy_split(y, patients, ratio, seed):
        fit, val = real_split(y, patients, ratio, seed)
        inner_sets.append(sorted(val.tolist()))
        return fit, val

    def spy_fit(*args, **kwargs):
        fitted = real_fit(*args, **kwargs)
        if fitted.holdout is not None:
            holdouts.append(sorted(fitted.holdout.tolist()))
        return fitted

    scores = iter([0.5, 0.9, 0.7] * 3)  # per fold: source, adabn, the fine-tune: adabn reads best
    monkeypatch.setattr(ae, "site_validation_split", spy_split)
    monkeypatch.setattr(ae, "fit_model", spy_fit)
    monkeypatch.setattr(ae, "_auc", lambda y, p: next(scores))
    result = ae.evaluate_adaptation(run_dir, site, tmp_path / "eval", k=3,
                                    settings=AdaptSettings(device="cpu", log=lambda _: None),
                                    finetunes=[FinetuneSpec(train="fc", epochs=1, batch_size=8, replay=0)])
    assert len(inner_sets) == 3 and inner_sets == holdouts
    rows = {r["variant"]: r for r in result["rows"]}
    assert [c["chosen"] for c in rows["nested choice"]["nested"]] == ["adabn"] * 3
    for nested, chosen in (("nested choice", "adabn"), ("nested choice+threshold", "adabn+threshold")):
        for key in ("accuracy", "roc_auc", "thresholds"):
            assert rows[nested][key] == rows[chosen][key], (nested, key)
    assert "chosen: adabn 3x" in ae.evaluation_table(result)


@pytest.mark.slow
def test_evaluate_measures_every_variant_on_held_out_patients(run_dir, tmp_path, capsys):
    site = make_site(tmp_path / "site", per_class=18)  # 9 patients per class: 12 images in 2 of 3 folds
    out = tmp_path / "eval"
    assert main(["adapt", str(run_dir), "--data", str(site), "--out", str(out), "--evaluate", "3",
                 "--sizes", "10,all", "--repeats", "2", "--device", "cpu", "--no-cache"]) == 0
    result = json.loads((out / "adapt_evaluation.json").read_text())
    assert [(r["per_class"], r["variant"]) for r in result["rows"]] == [
        (s, v) for s in (10, None) for v in ("source", "threshold", "adabn", "adabn+threshold", "nested choice",
                                             "nested choice+threshold")]
    rows = {(r["per_class"], r["variant"]): r for r in result["rows"]}
    assert rows[(10, "threshold")]["adaptation_images"] == {"NORMAL": [10, 10], "PNEUMONIA": [10, 10]}
    assert rows[(None, "threshold")]["adaptation_images"] == {"NORMAL": [12, 12], "PNEUMONIA": [12, 12]}
    # "source" is the untouched model at its stored threshold: its accuracy is computable directly
    ck = load_checkpoint(run_dir / "best.pt")
    model = build_model(None)
    model.load_state_dict(ck["model"])
    samples = site_samples(site, unlabeled=False)
    images = torch.stack([torch.from_numpy(np.array(Image.open(s.path)))[None] for s in samples])
    y = np.array([s.label for s in samples])
    prob = pneumonia_probability(predict_logits(model, images, 64, "cpu"))
    assert rows[(None, "source")]["accuracy"]["value"] == pytest.approx(((prob >= 0.42) == y).mean())
    assert rows[(None, "source")]["thresholds"] == [0.42, 0.42]
    lo, hi = rows[(None, "threshold")]["thresholds"]
    assert lo < hi  # one threshold per fold
    assert "| 10 (10/10) | adabn+threshold |" in (out / "adapt_evaluation.md").read_text()
    assert "adabn+threshold" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["too_few", "one_class", "classes_with_unlabeled", "no_classes",
                                  "not_a_run", "unreadable", "evaluate_unlabeled", "same_folder"])
def test_bad_input_is_one_line_and_writes_nothing(case, run_dir, tmp_path, capsys):
    site = tmp_path / "site"
    out = tmp_path / "new"
    run = run_dir
    extra = []
    if case == "too_few":
        make_site(site, per_class=6)
        expect = "at least 10 of each class"
    elif case == "one_class":
        make_site(site)
        for f in (site / "PNEUMONIA").iterdir():
            f.unlink()
        (site / "PNEUMONIA").rmdir()
        expect = "PNEUMONIA"
    elif case == "classes_with_unlabeled":
        make_site(site)
        extra = ["--unlabeled"]
        expect = "drop --unlabeled"
    elif case == "no_classes":
        make_site(site, labelled=False)
        expect = "--unlabeled"
    elif case == "not_a_run":
        make_site(site)
        run = tmp_path / "runs"
        expect = "not a cxr run folder"
    elif case == "unreadable":
        make_site(site)
        (site / "NORMAL" / "IM-0099-0001.png").write_bytes(b"not an image")
        expect = "IM-0099-0001.png"
    elif case == "evaluate_unlabeled":
        make_site(site, labelled=False)
        extra = ["--unlabeled", "--evaluate", "3"]
        expect = "--evaluate"
    else:
        make_site(site)
        out = run_dir
        expect = "source run"
    before = sorted(p.name for p in out.parent.iterdir())
    source = digest(run_dir / "best.pt")
    code = main(["adapt", str(run), "--data", str(site), "--out", str(out), "--device", "cpu", "--no-cache", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expect in err, err
    assert sorted(p.name for p in out.parent.iterdir()) == before  # nothing written, no temporary folder
    assert digest(run_dir / "best.pt") == source


def test_a_write_that_fails_midway_leaves_nothing_behind(run_dir, tmp_path, monkeypatch, capsys):
    import cxr.adaptation.adapt

    site = make_site(tmp_path / "site")
    out = tmp_path / "runs" / "scratch-site"
    written = []

    def disk_full(path, *args, **kwargs):  # best.pt, config.json and adaptation.json are written by then
        written.extend(p.name for p in Path(path).parent.iterdir())
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(cxr.adaptation.adapt, "write_csv", disk_full)
    before = sorted(p.name for p in out.parent.iterdir())
    assert main(["adapt", str(run_dir), "--data", str(site), "--out", str(out), "--device", "cpu", "--no-cache"]) == 2
    assert {"best.pt", "config.json", "adaptation.json"} <= set(written)  # it failed midway, not before
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "site_predictions.csv" in err
    assert sorted(p.name for p in out.parent.iterdir()) == before  # no OUT, no temporary folder


def test_an_adapted_run_evaluated_and_reported_says_what_was_adapted(run_dir, tiny_data, tmp_path, capsys):
    # tiny_data is tmp_path/"data", the training folder the source run's config.json names
    site = make_site(tmp_path / "site")
    new = run_dir.parent / "scratch-site"
    args = ["--device", "cpu", "--no-cache"]
    assert main(["adapt", str(run_dir), "--data", str(site), "--out", str(new), *args]) == 0
    made = json.loads((new / "config.json").read_text())  # this run's command, not the source's
    assert made["command"][:3] == ["cxr", "adapt", str(run_dir)] and made["versions"]["cxr"]
    assert main(["evaluate", str(new), *args]) == 0  # dev-test of the training folder
    # the site's images copied under other names and a folder of another name: the same images by content
    copy = tmp_path / "elsewhere"
    for i, path in enumerate(sorted(site.rglob("*.png"))):
        (copy / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy / path.parent.name / f"img{i}.png")
    assert main(["evaluate", str(new), "--data", str(copy), "--name", "site", *args]) == 0
    metrics = json.loads((new / "metrics_site.json").read_text())
    ck = load_checkpoint(new / "best.pt")
    assert metrics["threshold"] == ck["threshold"] and metrics["operating_point"]["chosen_on"] == "site"
    assert metrics["set"]["adaptation_images"] == metrics["n"] == 24
    assert json.loads((new / "metrics.json").read_text())["set"]["adaptation_images"] == 0
    assert main(["report", str(run_dir.parent)]) == 0
    report = (run_dir.parent / "report.md").read_text()
    assert "scratch-site is adapted by cxr adapt" in report
    assert "site (24 of 24 images) holds images the adaptation was fitted on (same file content)" in report
    assert "test (" not in report.split("scratch-site is adapted")[1].split("\n")[0]
    # chosen on the site's 24 images: the report says how few (card.FEW_VALIDATION_IMAGES)
    assert f"{ck['threshold']:.3f} (youden, on site; only 24 validation images)" in report


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
