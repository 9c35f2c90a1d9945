"""How training on several sites weighs its images (engine.site_weights, engine.run_epoch): each site
its share, each class its share within a site when training is class-balanced, and the per-image
weights really in the loss and its gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cxr.config import make_config
from cxr.training import engine
from cxr.training.model import build_model


def _effective(weight: torch.Tensor | None, sample_weight: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """Each training image's weight in the loss: its class weight times its own."""
    w = weight[y].double().cpu() if weight is not None else torch.ones(len(y), dtype=torch.float64)
    return w * (sample_weight.double().cpu() if sample_weight is not None else 1.0)


def test_class_balanced_training_on_two_sites_balances_the_classes_within_each_site(tmp_path, monkeypatch):
    """With class weights "balanced" (the robust presets, which decide at 0.5), the classes weigh
    the same in the loss overall and within each site, each site its equal share: class weights of
    the pooled labels times the site shares left NORMAL at 1.7x PNEUMONIA on shared train + nih_half."""
    seen = []
    real = engine.run_epoch

    def spy(*args, **kwargs):
        if kwargs.get("generator") is not None or len(args) > 5:  # the training pass
            seen.append((kwargs.get("weight"), kwargs.get("sample_weight")))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "run_epoch", spy)
    torch.manual_seed(0)
    y = torch.tensor([0] * 12 + [1] * 6 + [0] * 1 + [1] * 5)  # site a mostly NORMAL, site b mostly PNEUMONIA
    sites = ["a"] * 18 + ["b"] * 6
    x = torch.randint(0, 256, (24, 1, 32, 32), dtype=torch.uint8)
    config = make_config("scratch", image_size=32, epochs=1, batch_size=8, class_weights="balanced",
                         select_by="worst_site_auc", site_weights=())
    engine.fit(build_model(None), config, x, y, x[:8], torch.tensor([0, 1] * 4), tmp_path, "cpu",
               log=lambda _: None, train_sites=sites, val_sites=["a"] * 4 + ["b"] * 4)
    weight, sample_weight = seen[0]
    eff = _effective(weight, sample_weight, y)
    site = torch.tensor([s == "a" for s in sites])
    assert eff[y == 0].sum() == pytest.approx(eff[y == 1].sum().item())
    for mine in (site, ~site):
        assert eff[mine & (y == 0)].sum() == pytest.approx(eff[mine & (y == 1)].sum().item())
    assert eff[site].sum() == pytest.approx(eff[~site].sum().item())


def test_site_weights_without_class_balance_keep_each_sites_class_mix():
    sites, y = ["a"] * 6 + ["b"] * 2, torch.tensor([0, 0, 0, 0, 1, 1, 0, 1])
    w = engine.site_weights(sites)
    assert torch.allclose(w, engine.site_weights(sites, None, None))
    assert w[:6].sum() == pytest.approx(w[6:].sum().item()) and w[0] == w[4]
    balanced = engine.site_weights(sites, {"b": 2.0}, y)
    assert balanced[:4].sum() == pytest.approx(balanced[4:6].sum().item())
    assert balanced[6:].sum() == pytest.approx(2 * balanced[:6].sum().item())


def test_run_epoch_puts_each_images_weight_into_the_loss_and_its_gradient():
    """The returned training loss and the step taken are those of the per-image weighted mean
    (times the class weights), not of the plain mean."""
    torch.manual_seed(0)
    x, y = torch.randn(10, 4), torch.tensor([0, 1] * 5)
    sample_weight = torch.tensor([3.0, 0.2, 1.0, 1.0, 0.1, 2.0, 0.5, 1.5, 0.3, 0.4])
    class_weight = torch.tensor([1.0, 2.0])
    fc = nn.Linear(4, 2)
    start = {k: v.clone() for k, v in fc.state_dict().items()}
    optimizer = torch.optim.SGD(fc.parameters(), lr=1.0)
    out = engine.run_epoch(fc, x, y, 10, "cpu", optimizer, torch.Generator().manual_seed(0), weight=class_weight,
                           sample_weight=sample_weight)

    ref = nn.Linear(4, 2)
    ref.load_state_dict(start)
    w = class_weight[y] * sample_weight
    expected = (F.cross_entropy(ref(x), y, reduction="none") * w).sum() / w.sum()
    expected.backward()
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(fc.weight, start["weight"] - ref.weight.grad, atol=1e-6)
    assert torch.allclose(fc.bias, start["bias"] - ref.bias.grad, atol=1e-6)
