"""What the weights are after WiSE-FT and LP-FT (adaptation/finetune.py): the chosen mix and not the
fine-tuned weights, batch norm re-estimated on both sites after mixing (with or without replay in
the batches), and a frozen backbone's batch-norm statistics left alone while the head trains."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from cxr.adaptation import finetune as ft
from cxr.adaptation.weights import adabn, wise_mix
from cxr.config import FinetuneSpec, make_config
from cxr.training.model import build_model

SIZE = 32


def _site(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([i % 2 for i in range(n)])
    x = (torch.randint(0, 160, (n, 1, SIZE, SIZE), generator=g) + 60 * y.view(-1, 1, 1, 1)).to(torch.uint8)
    return x, y


def _source_and_tuned(seed: int = 0) -> tuple[torch.nn.Module, dict, dict]:
    """A model holding its source weights, and fine-tuned weights apart from them everywhere
    (batch-norm statistics included)."""
    torch.manual_seed(seed)
    model = build_model(None).eval()
    source = copy.deepcopy(model.state_dict())
    tuned = {k: (v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v.clone()) for k, v in source.items()}
    tuned = {k: (v.abs() + 0.5 if k.endswith("running_var") else v) for k, v in tuned.items()}
    return model, source, tuned


def _equal_states(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_choose_mix_leaves_the_model_holding_the_chosen_mix_with_its_batch_norm_re_estimated(monkeypatch):
    """The coefficient scoring best is 0.3 here (scores made up by a stand-in): the model returned
    holds 0.7 x source + 0.3 x fine-tuned, with batch-norm statistics re-estimated on the given
    images; not the fine-tuned weights (the last of the grid), nor the mix's averaged statistics."""
    model, source, tuned = _source_and_tuned()
    bn_images, _ = _site(16, seed=1)
    calls = iter(ft.WISE_GRID)
    monkeypatch.setattr(ft, "validation_scores", lambda m, sets, d, i: {"site": -abs(next(calls) - 0.3)})
    alpha, rows = ft.choose_mix(model, source, tuned, {}, bn_images, "cpu", "none", retrain_bn=True)
    assert alpha == pytest.approx(0.3) and len(rows) == len(ft.WISE_GRID)
    expected = build_model(None)
    expected.load_state_dict(wise_mix(source, tuned, 0.3))
    adabn(expected, bn_images, "none", "cpu")
    assert _equal_states(model.state_dict(), expected.state_dict())


def test_choose_mix_without_batch_norm_re_estimation_holds_the_plain_mix(monkeypatch):
    model, source, tuned = _source_and_tuned()
    calls = iter(ft.WISE_GRID)
    monkeypatch.setattr(ft, "validation_scores", lambda m, sets, d, i: {"site": -abs(next(calls) - 0.0)})
    alpha, _ = ft.choose_mix(model, source, tuned, {}, None, "cpu", "none", retrain_bn=False)
    assert alpha == 0.0 and _equal_states(model.state_dict(), source)


def _fixed_mix(monkeypatch, replay_share: float):
    """finetune at a fixed WiSE coefficient of a fine-tune already made (nothing trains): the
    model, and the images batch norm was re-estimated on."""
    model, source, tuned = _source_and_tuned()
    x, y = _site(24)
    src_x, src_y = _site(20, seed=5)
    seen = []
    real = ft.adabn
    monkeypatch.setattr(ft, "adabn", lambda m, images, *a, **k: seen.append(images.clone()) or real(m, images, *a, **k))
    spec = FinetuneSpec(train="all", epochs=1, batch_size=8, replay=replay_share, wise=True, wise_alpha=0.5)
    trained = {(replace(spec, wise=False, wise_alpha=None), 0): (tuned, [], {})}
    config = make_config("scratch", image_size=SIZE)
    out, _, chosen = ft.finetune(model, config, spec, x[8:], y[8:], x[:8], y[:8], "cpu", seed=0,
                                 replay=(src_x, src_y), trained=trained)
    assert chosen["wise"]["alpha"] == 0.5 and chosen["wise"]["fixed"]
    return out, source, tuned, seen, x[8:], (src_x, src_y)


@pytest.mark.parametrize("replay_share", [0.0, 0.5])
def test_a_fixed_wise_coefficient_re_estimates_batch_norm_on_both_sites(monkeypatch, replay_share):
    """--wise-alpha 0.5: the weights are the mix, its batch norm re-estimated on the site's and the
    source's training images, with --replay 0 as with replay (the help and docstring promise both
    sites; --replay 0 used to re-estimate on the site alone)."""
    model, source, tuned, seen, site_x, replay = _fixed_mix(monkeypatch, replay_share)
    assert len(seen) == 1 and len(seen[0]) == len(site_x) + len(replay[1])
    bn_images = ft.batchnorm_images(site_x, replay, torch.Generator().manual_seed(2))
    assert torch.equal(seen[0], bn_images)
    expected = build_model(None)
    expected.load_state_dict(wise_mix(source, tuned, 0.5))
    adabn(expected, bn_images, "none", "cpu")
    assert _equal_states(model.state_dict(), expected.state_dict())


def test_lp_epochs_leave_the_frozen_backbones_batch_norm_statistics_alone(monkeypatch):
    """LP-FT's head-only epoch trains `fc` with the backbone frozen and in eval mode: at its end the
    backbone's weights and batch-norm running statistics are still the source's (train mode would
    let the statistics drift); the next epoch trains everything."""
    x, y = _site(24)
    config = make_config("scratch", image_size=SIZE)
    torch.manual_seed(0)
    model = build_model(None)
    before = copy.deepcopy(model.state_dict())
    snapshots = []
    real = ft.validation_scores
    monkeypatch.setattr(ft, "validation_scores",
                        lambda m, *a: snapshots.append(copy.deepcopy(m.state_dict())) or real(m, *a))
    spec = FinetuneSpec(train="all", epochs=2, lp_epochs=1, batch_size=8, replay=0, lr=1e-2)
    ft.finetune(model, config, spec, x[8:], y[8:], x[:8], y[:8], "cpu")
    first, second = snapshots[0], snapshots[1]
    backbone = [k for k in first if not k.startswith("fc.")]
    stats = [k for k in backbone if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], first[k]) for k in backbone)
    assert not torch.equal(before["fc.weight"], first["fc.weight"])
    assert not all(torch.equal(before[k], second[k]) for k in stats)
