import csv

import pytest
import torch
from torchvision.transforms import v2

from cxr.config import make_config
from cxr.training.checkpoint import load_checkpoint
from cxr.training.engine import HISTORY_COLUMNS, fit, run_epoch, seed_everything
from cxr.training.model import build_model, imagenet_state_dict
from cxr.training.preprocess import normalize

from .helpers import fake_images


def test_normalize_matches_torchvision_on_replicated_channels():
    images, _ = fake_images(3, 16)
    ours = normalize(images, "cpu")
    reference = v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(
        images.expand(-1, 3, -1, -1).float() / 255)
    assert ours.shape == (3, 3, 16, 16)
    torch.testing.assert_close(ours, reference)


def read_history(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == HISTORY_COLUMNS
    return rows


def train_frozen(tmp_path, weights_file, precompute):
    config = make_config("finetune", epochs=3, batch_size=8, image_size=48, lr=1e-3, seed=3)
    seed_everything(config.seed)
    model = build_model(imagenet_state_dict(weights_file), train_backbone=False)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    (xt, yt), (xv, yv) = fake_images(40, seed=1), fake_images(16, seed=2)
    history = fit(model, config, xt, yt, xv, yv, tmp_path, "cpu", precompute_features=precompute,
                  log=lambda s: None)
    after = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    return history, before, after


@pytest.mark.slow
def test_precomputed_features_give_the_plain_loop_history(tmp_path, weights_file):
    fast, _, _ = train_frozen(tmp_path / "fast", weights_file, precompute=True)
    plain, before, after = train_frozen(tmp_path / "plain", weights_file, precompute=False)
    for a, b in zip(fast, plain):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["epoch"], key)
    assert fast[0]["train_loss"] != fast[-1]["train_loss"]  # fc did learn
    # the frozen backbone ran in eval mode: batch-norm statistics and weights untouched
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


@pytest.mark.slow
def test_fit_writes_history_and_keeps_the_best_epoch(tmp_path):
    config = make_config("scratch", epochs=3, batch_size=8, image_size=48, seed=0)
    seed_everything(config.seed)
    model = build_model(None)
    (xt, yt), (xv, yv) = fake_images(32, seed=1), fake_images(16, seed=2)
    fit(model, config, xt, yt, xv, yv, tmp_path, "cpu", log=lambda s: None)
    rows = read_history(tmp_path / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    val_losses = [float(r["val_loss"]) for r in rows]
    best = load_checkpoint(tmp_path / "best.pt")
    last = load_checkpoint(tmp_path / "last.pt")
    assert best["epoch"] == 1 + val_losses.index(min(val_losses))
    assert best["best_val_loss"] == pytest.approx(min(val_losses))
    assert last["epoch"] == 3 and last["optimizer"] is not None and best["optimizer"] is None
    assert all(float(r["seconds"]) > 0 for r in rows)


def test_balanced_class_weights():
    from cxr.training.engine import class_weights

    w = class_weights(torch.tensor([0, 1, 1, 1]), "balanced")
    torch.testing.assert_close(w, torch.tensor([2.0, 2 / 3]))
    assert class_weights(torch.tensor([0, 1]), "none") is None


def test_finetune_full_preset_trains_every_layer():
    config = make_config("finetune-full")
    assert config.pretrained and config.train_backbone and config.lr == 1e-4 and config.epochs == 10
    study = make_config("finetune")
    assert study.class_weights == "none" and study.target_sensitivity is None and not study.calibrate


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
