"""Fine-tuning that keeps the first site: WiSE-FT, L2-SP, LP-FT and the model soup
(adaptation/weights.py, finetune.py), each checked against its definition."""

from __future__ import annotations

import pytest
import torch

from cxr.adaptation import finetune as ft
from cxr.adaptation.finetune import SOUP_SEED_STEP, WISE_GRID, average_states, finetune
from cxr.adaptation.weights import adabn, l2sp_penalty, wise_mix
from cxr.config import FinetuneSpec, make_config
from cxr.errors import CxrError
from cxr.training.model import build_model

SIZE = 32


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


def _site(n=24):
    torch.manual_seed(1)
    y = torch.tensor([i % 2 for i in range(n)])
    x = (torch.rand(n, 1, SIZE, SIZE) * 120 + 60 * y.view(-1, 1, 1, 1)).to(torch.uint8)
    return x, y


def test_l2sp_keeps_the_weights_nearer_the_source():
    x, y = _site()
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


def test_wise_ft_chooses_its_coefficient_on_every_sites_validation(monkeypatch):
    """The grid is scored on the site's and the source's validation images; the best worst-site
    score wins, and the returned weights are that mix (batch norm re-estimated)."""
    x, y = _site()
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


def test_wise_ft_at_a_fixed_coefficient_mixes_there_and_chooses_nothing(monkeypatch):
    """--wise-alpha A: the weights are A x fine-tuned + (1 - A) x source (batch norm re-estimated
    afterwards, so the weights alone are compared), the grid is not searched, and the record says so."""
    x, y = _site()
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
    x, y = _site()
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


def test_the_soup_averages_its_members_fine_tuned_from_the_source_seeds_apart():
    """A soup of 2 is the mean of the two fine-tunes that finetune() returns alone with the members'
    seeds (each from the source weights), its batch norm then re-estimated on the site's images."""
    x, y = _site()
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


def test_a_wise_variant_mixes_the_folds_fine_tune_instead_of_training_it_again(monkeypatch):
    """In one fold of `cxr adapt --evaluate`, WiSE-FT at a fixed coefficient of a spec trained
    before mixes that fine-tune: the same model as training it alone, with one training fewer."""
    from dataclasses import replace

    x, y = _site()
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


def test_a_soup_in_a_fold_reuses_the_plain_fine_tune_as_its_first_member(monkeypatch):
    """Beside the plain fine-tune of a fold, `--soup 2` trains only its second member: the first
    (same spec, same seed) is the plain one, and the soup equals the soup trained alone."""
    from dataclasses import replace

    x, y = _site()
    config = make_config("scratch", image_size=SIZE)
    calls = []
    real = ft._train

    def spy(*args, **kwargs):
        calls.append((args[2].name, args[7]))  # the spec and the seed it trains with
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
