"""The shift benchmark, the augmentation and the robust recipe's training options."""

import csv
import json

import numpy as np
import pytest
import torch

from cxr.cli import main
from cxr.config import AUGMENT_PRESETS, make_config
from cxr.training.augment import augment
from cxr.training.engine import fit, seed_everything
from cxr.training.model import build_model
from cxr.training.shifts import SHIFTS, apply_shift

from .helpers import cxr


@pytest.fixture(scope="module")
def xrays(shared_data):
    from cxr.data.loading import load_images

    paths = sorted((shared_data / "train" / "NORMAL").iterdir())[:3] + sorted((shared_data / "train" / "PNEUMONIA").iterdir())[:3]
    return load_images(paths, 128, workers=2)


def tv(x):  # total variation: falls when an image is smoothed
    f = x.float()
    return float((f[..., 1:, :] - f[..., :-1, :]).abs().mean() + (f[..., :, 1:] - f[..., :, :-1]).abs().mean())


@pytest.mark.parametrize("name", list(SHIFTS))
def test_each_shift_is_deterministic_and_grows_with_severity(xrays, name):
    a, b = apply_shift(xrays, name, 2, seed=5), apply_shift(xrays, name, 2, seed=5)
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == xrays.shape
    change = [float((apply_shift(xrays, name, s).float() - xrays.float()).abs().mean()) for s in (1, 2, 3)]
    assert 0 < change[0] < change[1] < change[2], change


def test_shifts_change_the_pixels_they_should(xrays):
    mean, std = xrays.float().mean(), xrays.float().std()
    shifted = {n: apply_shift(xrays, n, 3, seed=1).float() for n in SHIFTS}
    assert shifted["brightness+"].mean() > mean + 30 and shifted["brightness-"].mean() < mean - 30
    assert shifted["contrast"].std() < 0.5 * std
    assert shifted["gamma<1"].mean() > mean and shifted["gamma>1"].mean() < mean
    assert shifted["stretch"].std() > std
    assert tv(shifted["blur"]) < 0.7 * tv(xrays) and tv(shifted["downup"]) < tv(xrays)
    noise = shifted["noise"] - xrays.float()
    assert abs(float(noise.mean())) < 1.0 and 10 < float(noise.std()) < 20
    assert not torch.equal(apply_shift(xrays, "noise", 3, seed=1), apply_shift(xrays, "noise", 3, seed=2))
    assert abs(float(shifted["jpeg"].mean() - mean)) < 3 and float((shifted["jpeg"] - xrays.float()).abs().mean()) > 1
    h = xrays.shape[-1]
    corners = (slice(None), slice(None), slice(0, 4), slice(0, 4))
    assert float(shifted["zoom-out"][corners].max()) == 0  # black padding
    assert float(shifted["rotate"][corners].max()) == 0  # black fill where the image turned away
    centre = (slice(None), slice(None), slice(h // 2 - 1, h // 2 + 1), slice(h // 2 - 1, h // 2 + 1))
    assert float((shifted["zoom-in"][centre] - xrays.float()[centre]).abs().mean()) < 20


def test_augmentation_is_seeded_and_none_is_identity(xrays):
    assert augment(xrays, "none", torch.Generator()) is xrays
    a = augment(xrays, "strong", torch.Generator().manual_seed(3))
    b = augment(xrays, "strong", torch.Generator().manual_seed(3))
    c = augment(xrays, "strong", torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, xrays)
    light = augment(xrays, "light", torch.Generator().manual_seed(3))
    assert (light.float() - xrays.float()).abs().mean() > 0


def test_study_presets_keep_their_settings_and_robust_ones_differ():
    for task in ("scratch", "finetune"):
        c = make_config(task)
        assert (c.augment, c.intensity, c.optimizer, c.schedule, c.select_by, c.epochs) == \
            ("none", "none", "adam", "constant", "val_loss", 10)
    for task in ("scratch-robust", "finetune-full-robust"):  # one recipe for both
        robust = make_config(task)
        assert (robust.augment, robust.intensity, robust.class_weights, robust.threshold_rule, robust.select_by,
                robust.schedule) == ("frame", "equalize", "balanced", "0.5", "last", "cosine")
    assert make_config("finetune-full-robust").pretrained and make_config("finetune-full-robust").lr == 1e-4


def test_early_stopping_on_a_flat_metric(tmp_path):
    # Truly flat: only fc trains (on features computed once, the backbone in eval mode) and its
    # learning rate is 0, so every epoch's validation is the same computation.
    config = make_config("finetune", epochs=5, batch_size=8, image_size=32, lr=0.0, patience=2, select_by="val_auc")
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(16) % 2
    history = fit(build_model(None, train_backbone=False), config, x, y, x, y, tmp_path, "cpu", log=lambda s: None)
    assert len({(r["val_auc"], r["val_loss"]) for r in history}) == 1  # flat indeed
    assert len(history) == 3  # epoch 1 is best; 2 and 3 bring nothing better; stop


@pytest.mark.slow
def test_robust_preset_trains_resumably_with_its_schedule(tiny_data, tmp_path):
    out = tmp_path / "out"
    args = ["train", "--data", str(tiny_data), "--out", str(out), "--task", "scratch-robust", "--image-size", "32",
            "--batch-size", "4", "--val-ratio", "0.25"]
    assert main(args + ["--epochs", "2"]) == 0
    with open(out / "scratch-robust" / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["lr"]) < float(rows[1]["lr"])  # linear warm-up over the first epoch
    assert rows[0]["val_auc"] != ""
    assert main(args + ["--epochs", "3", "--resume"]) == 0
    with open(out / "scratch-robust" / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 3


@pytest.mark.parametrize("split", ["val", "test"])
def test_robustness_command(study, split):
    run_dir = study[0] / "scratch"
    result = cxr("robustness", run_dir, "--split", split)
    assert result.returncode == 0, result.stderr[-2000:]
    r = json.loads((run_dir / f"robustness_{split}.json").read_text())
    assert len(r["rows"]) == 3 * len(SHIFTS)
    assert (run_dir / "figures" / f"robustness_{split}.png").is_file()
    for key in ("accuracy", "specificity"):
        assert r["worst"][key] <= r["mean"][key] + 1e-12
    if split == "test":  # clean numbers are those of evaluation, at the same stored threshold
        m = json.loads((run_dir / "metrics.json").read_text())
        assert r["clean"]["accuracy"] == pytest.approx(m["accuracy"])
        assert r["clean"]["specificity"] == pytest.approx(m["per_class"]["NORMAL"]["accuracy"])
    assert np.isfinite([row["accuracy"] for row in r["rows"]]).all()
    # the shifts are really applied: many rows move away from the clean numbers
    moved = [row for row in r["rows"] if any(row[k] != r["clean"][k] for k in ("accuracy", "roc_auc"))]
    assert len(moved) >= 13, moved


def test_intensity_jitter_survives_equalisation_only_when_applied_after_it(xrays):
    from cxr.training.preprocess import normalize

    def gamma(u8):
        return apply_shift(u8, "gamma<1", 2)  # gamma 0.6: a strong exposure change

    plain = normalize(xrays, "cpu", "equalize")
    after = normalize(xrays, "cpu", "equalize", augment=gamma)  # what training does
    before = normalize(gamma(xrays), "cpu", "equalize")  # the order that erases it
    assert float((after - plain).abs().mean()) > 0.3  # in ImageNet-normalised units (1 = ~57 grey levels)
    assert float((before - plain).abs().mean()) < 0.03


def test_training_augments_the_equalised_image(xrays, monkeypatch, tmp_path):
    from torchvision.transforms.v2 import functional as TF

    import cxr.training.engine

    seen = []
    monkeypatch.setattr(cxr.training.engine, "augment", lambda u8, preset, g, rows=None: seen.append(u8.clone()) or u8)
    config = make_config("scratch", intensity="equalize", augment="crop", epochs=1, batch_size=6)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    fit(build_model(None), config, xrays, labels, xrays, labels, tmp_path, "cpu", log=lambda s: None)
    equalised = {float(v.float().sum()) for v in TF.equalize(xrays)}
    assert len(seen) == 1 and {float(v.float().sum()) for v in seen[0]} == equalised


def test_crop_preset_crops_tilts_and_jitters_every_image(xrays):
    from cxr.training.augment import crop_rotate

    g = torch.Generator().manual_seed(0)
    out = augment(xrays, "crop", g)
    assert out.shape == xrays.shape and out.dtype == torch.uint8
    assert all(not torch.equal(o, x) for o, x in zip(out, xrays))  # every image changed (p = 1)
    assert torch.equal(augment(xrays, "crop", torch.Generator().manual_seed(0)), out)
    n = len(xrays)
    same = crop_rotate(xrays, torch.zeros(n), torch.ones(n), torch.ones(n), torch.zeros(n), torch.zeros(n))
    assert float((same.float() - xrays.float()).abs().mean()) < 0.5  # the full window is the identity
    # The left half of the image, stretched back to full width: column 2k comes from column k.
    half = crop_rotate(xrays, torch.zeros(n), torch.full((n,), 0.5), torch.ones(n), torch.full((n,), -0.5), torch.zeros(n))
    h = xrays.shape[-1]
    assert float((half[..., 8:h - 8, 16:h - 16:2].float() - xrays[..., 8:h - 8, 8:h // 2 - 8].float()).abs().mean()) < 6


@pytest.mark.slow
def test_last_epoch_selection_and_the_argmax_threshold(tiny_data, tmp_path):
    out = tmp_path / "out"
    code = main(["train", "--data", str(tiny_data), "--out", str(out), "--task", "scratch", "--image-size", "32",
                 "--batch-size", "4", "--val-ratio", "0.25", "--epochs", "3", "--select-by", "last",
                 "--threshold-rule", "0.5", "--class-weights", "balanced"])
    assert code == 0
    best = torch.load(out / "scratch" / "best.pt", weights_only=True)
    last = torch.load(out / "scratch" / "last.pt", weights_only=True)
    assert best["epoch"] == last["epoch"] == 3
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
    assert best["threshold"] == 0.5 and best["operating_point"]["rule"] == "0.5"
    assert best["operating_point"]["chosen_on"] == "validation"


@pytest.mark.slow
def test_robust_preset_resumed_equals_uninterrupted(xrays, tmp_path):
    from cxr.training.checkpoint import load_checkpoint

    config = make_config("scratch-robust", epochs=3, batch_size=2)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])

    def train(run_dir, resume=None, stop_after=None):
        def log(line):
            if stop_after and f"epoch {stop_after}/" in line:
                raise KeyboardInterrupt  # Ctrl-C just after that epoch's checkpoints were written
        seed_everything(0)
        return fit(build_model(None), config, xrays, labels, xrays, labels, run_dir, "cpu", resume=resume, log=log)

    whole = train(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", stop_after=2)
    resumed = train(tmp_path / "cut", resume=load_checkpoint(tmp_path / "cut" / "last.pt"))
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for a, b in zip(whole, resumed):  # schedule, augmentation RNG and batch order all restored
        assert a["lr"] == b["lr"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


@pytest.mark.parametrize("preset", [p for p in AUGMENT_PRESETS if p != "none"])
def test_an_empty_share_of_a_batch_is_augmented_and_keeps_the_generators_in_step(preset):
    """torchrun: a rank whose share of the last batch is empty draws what the others draw, warps nothing."""
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    g_empty, g_full = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = augment(x[3:], preset, g_empty, rows=(3, 3, 3))
    augment(x, preset, g_full, rows=(0, 3, 3))
    assert out.shape == (0, 1, 32, 32)
    assert torch.equal(g_empty.get_state(), g_full.get_state())
