"""A model that serves several sites flags each site's images at that site's own threshold: the
share of validation images the pooled threshold accepts overall, taken of the site's alone."""

import numpy as np
import pytest
import torch

from cxr import load_model
from cxr.adaptation.refit import flag_thresholds
from cxr.training.checkpoint import for_site, site_reference
from cxr.training.operating_point import OperatingPoint
from cxr.trust.fit import Trust, part_thresholds

from .helpers import make_trusted_run


@pytest.fixture(scope="module")
def trusted(tmp_path_factory):
    run = make_trusted_run(tmp_path_factory.mktemp("flags") / "run", n_images=120, n_val=40)
    return run, torch.load(run / "best.pt", weights_only=True)


def test_each_part_of_the_reference_gets_the_same_share_accepted(trusted):
    _, ck = trusted
    trust = Trust.from_checkpoint(ck)
    scores = trust.reference.scores.numpy()
    got = part_thresholds(trust, {"site": 25, "source": 14, "tiny": 1})
    assert got["site"] == (np.quantile(scores[:25], 0.95, method="higher"), [0, 25])
    assert got["source"] == (np.quantile(scores[25:39], 0.95, method="higher"), [25, 39])
    assert "tiny" not in got  # one image sets no threshold
    assert np.mean(scores[:25] <= got["site"][0]) >= 0.95 and got["site"][0] != got["source"][0]
    with pytest.raises(ValueError, match="the reference holds 40"):
        part_thresholds(trust, {"site": 25})


def test_flag_thresholds_sets_each_sites_point_where_it_has_enough_images(trusted):
    _, ck = trusted
    trust = Trust.from_checkpoint(ck)
    points = {"nih": OperatingPoint(rule="youden", threshold=0.4, temperature=1.0),
              "source": OperatingPoint(rule="youden", threshold=0.6, temperature=1.0)}
    out = flag_thresholds(points, trust, {"site": 20, "source": 20}, "nih")
    expected = part_thresholds(trust, {"nih": 20, "source": 20})
    assert (out["nih"].ood_threshold, out["nih"].reference_rows) == expected["nih"]
    assert (out["source"].ood_threshold, out["source"].reference_rows) == expected["source"] == (
        expected["source"][0], [20, 40])
    assert out["nih"].threshold == 0.4 and OperatingPoint.from_dict(out["nih"].to_dict()) == out["nih"]
    # fewer than FEW_VALIDATION (20) of a site's images set no flag of its own: the pooled one stays
    few = flag_thresholds(points, trust, {"site": 30, "source": 10}, "nih")
    assert few["nih"].ood_threshold is not None and few["source"] == points["source"]


def test_the_reference_holds_the_sites_validation_images_first_then_the_sources():
    """refit_trust's parts say which rows are whose: the site's threshold is the quantile of the
    detector's scores on the site's validation images, computed here apart from the reference."""
    from cxr.adaptation.refit import refit_trust
    from cxr.config import make_config
    from cxr.training.model import build_model
    from cxr.trust.features import forward_with_features

    from .helpers import fake_images

    torch.manual_seed(0)
    model = build_model(None).eval()
    site, y = fake_images(60, size=32, seed=1)
    source, source_y = fake_images(40, size=32, seed=2)
    source //= 4  # darker: the two sites score apart
    holdout = list(range(0, 60, 2))  # 30 of the site's images
    trust, _, parts = refit_trust({}, model, config=make_config("scratch", image_size=32), bn="finetune",
                                  images=site, y=y.numpy(), holdout=holdout, replay=(source, source_y),
                                  source_val=(source[:25], source_y[:25]), device="cpu", seed=0)
    assert parts == {"site": 30, "source": 25}
    points = flag_thresholds({"nih": OperatingPoint(threshold=0.5), "source": OperatingPoint(threshold=0.5)},
                             trust, parts, "nih")
    for name, images in (("nih", site[holdout]), ("source", source[:25])):
        _, features = forward_with_features(model, images, "cpu")
        scores = trust.detector.score(features)
        assert points[name].ood_threshold == pytest.approx(np.quantile(scores, 0.95, method="higher"), rel=1e-5)
    assert points["nih"].ood_threshold != pytest.approx(points["source"].ood_threshold, rel=1e-3)


def test_a_site_decides_and_flags_at_its_own_point(trusted, tmp_path):
    run, ck = trusted
    pooled = ck["trust"]["threshold"]
    ck["operating_points"] = {"nih": {"rule": "youden", "threshold": 0.3, "temperature": 1.0,
                                      "ood_threshold": pooled + 1.5},
                              "old": {"rule": "youden", "threshold": 0.7, "temperature": 1.0}}
    torch.save(ck, tmp_path / "best.pt")
    assert for_site(ck, "nih")["trust"]["threshold"] == pooled + 1.5
    assert for_site(ck, "old")["trust"]["threshold"] == pooled  # a point stored without one: the pooled flag
    assert ck["trust"]["threshold"] == pooled  # the stored checkpoint is not changed
    at_nih = load_model(tmp_path / "best.pt", site="nih")
    assert at_nih.trust.detector.threshold == pytest.approx(pooled + 1.5) and at_nih.threshold == 0.3
    assert at_nih.describe_trust()["threshold_chosen_on"] == "nih's validation: 95% of its 40 images accepted"
    assert load_model(tmp_path / "best.pt").trust.detector.threshold == pytest.approx(pooled)


def test_the_model_card_names_each_sites_flag_threshold():
    from cxr.reporting.card import describe_adaptation

    record = {"counts": {"NORMAL": 224, "PNEUMONIA": 169}, "adapted": "finetune", "site": "nih_fit", "patients": 275,
              "operating_point": {"chosen_on": "the source run's rule"},
              "operating_points": {"nih": {"threshold": 0.45, "chosen_on": "80 site validation images",
                                           "ood_threshold": 4.5388},
                                   "old": {"threshold": 0.5, "chosen_on": "the source run"}}}
    text = describe_adaptation(record)
    assert "nih threshold 0.450 (80 site validation images; out-of-distribution flag above 4.54)" in text
    assert "old threshold 0.500 (the source run)" in text


def test_a_site_compares_with_its_own_validation_images(trusted, tmp_path):
    from cxr.evaluation.check import check_images

    run, ck = trusted
    ref = ck["trust"]["reference"]
    assert ref["feature_rows"].tolist() == list(range(40))  # 40 validation images: all features kept
    ck["operating_points"] = {"nih": {"rule": "youden", "threshold": 0.3, "temperature": 1.0, "ood_threshold": 2.0,
                                      "reference_rows": [10, 40]}}
    at_nih = for_site(ck, "nih")["trust"]["reference"]
    for key in ("logits", "labels", "scores", "features"):
        assert torch.equal(at_nih[key], ref[key][10:40])
    assert at_nih["feature_rows"].tolist() == list(range(30)) and len(ref["scores"]) == 40  # the stored one is whole
    # a reference that kept the features of only some rows: those of the site's rows, renumbered
    sparse = {**ref, "features": ref["features"][::4], "feature_rows": ref["feature_rows"][::4]}
    cut = site_reference(sparse, 10, 40)
    assert cut["feature_rows"].tolist() == [2, 6, 10, 14, 18, 22, 26] and torch.equal(cut["features"], ref["features"][12:40:4])
    images = (torch.rand(12, 1, 32, 32) * 255).to(torch.uint8)
    torch.save(ck, tmp_path / "best.pt")
    said = load_model(tmp_path / "best.pt", site="nih").describe_trust()["threshold_chosen_on"]
    assert said == "nih's validation: 95% of its 30 images accepted"  # the site's rows, not all 40
    assert check_images(for_site(ck, "nih"), images)["shift"]["n_reference"] == 30
    assert check_images(ck, images)["shift"]["n_reference"] == 40
    assert Trust.from_checkpoint(for_site(ck, "nih")).reference.features.shape[0] == 30


@pytest.mark.slow  # two TorchScript traces of ResNet-18
def test_export_at_a_site_carries_its_temperature_threshold_and_flag(trusted, tmp_path):
    import json

    from cxr.cli import main

    _, ck = trusted
    ck["operating_points"] = {"nih": {"rule": "youden", "threshold": 0.3, "temperature": 2.0, "ood_threshold": 9.5,
                                      "reference_rows": [10, 40]}}
    torch.save(ck, tmp_path / "best.pt")
    for site, out in ((["--site", "nih"], "nih.pt"), ([], "own.pt")):
        assert main(["export", str(tmp_path / "best.pt"), "--format", "torchscript", "--out", str(tmp_path / out),
                     *site]) == 0
    nih, own = (json.loads((tmp_path / f"{n}.pt.json").read_text()) for n in ("nih", "own"))
    assert (nih["site"], nih["threshold"], nih["temperature"], nih["ood_score"]["threshold"]) == ("nih", 0.3, 2.0, 9.5)
    assert nih["ood_score"]["threshold_chosen_on"] == "nih's validation: 95% of its 30 images accepted"
    assert own["site"] is None and own["temperature"] == ck.get("temperature", 1.0)
    assert own["ood_score"]["threshold"] == pytest.approx(ck["trust"]["threshold"])
    images = (torch.rand(4, 1, 32, 32) * 255).to(torch.uint8)
    with torch.no_grad():
        p_nih, p_own = (torch.jit.load(str(tmp_path / n))(images)[0] for n in ("nih.pt", "own.pt"))
    expected = load_model(tmp_path / "best.pt", site="nih").predict_arrays(list(images[:, 0].numpy()))[0][:, 1]
    assert np.allclose(p_nih.numpy(), expected, atol=1e-5) and not np.allclose(p_nih.numpy(), p_own.numpy())


def test_a_pooled_check_of_a_model_with_site_references_says_how_to_check_at_one_site(trusted, tmp_path):
    from cxr.evaluation.check import check_folder, format_check

    from .helpers import write_png

    _, ck = trusted
    ck["operating_points"] = {"nih": {"rule": "youden", "threshold": 0.3, "temperature": 1.0, "ood_threshold": 9.5,
                                      "reference_rows": [10, 40]},
                              "old": {"rule": "youden", "threshold": 0.5, "temperature": 1.0}}
    torch.save(ck, tmp_path / "best.pt")
    for i in range(6):
        write_png(tmp_path / "site" / f"scan{i}.png", 500 + i)
    pooled = check_folder(tmp_path / "best.pt", tmp_path / "site", log=lambda _: None)
    assert "pass --site NAME" in pooled["note"] and "(nih)" in pooled["note"]
    assert "note: this model keeps each site's own" in format_check(pooled)
    at_nih = check_folder(tmp_path / "best.pt", tmp_path / "site", site="nih", log=lambda _: None)
    assert "note" not in at_nih and at_nih["shift"]["n_reference"] == 30


def test_a_model_trained_on_several_sites_keeps_each_sites_flag_and_reference(tmp_path):
    """`cxr run --data a=DIR --data b=DIR`: store_trust puts each site's validation images together
    and stores a point per site: the run's own decision, the site's own flag and reference rows."""
    from cxr.training.checkpoint import load_checkpoint
    from cxr.trust.features import forward_with_features
    from cxr.trust.fit import store_trust

    from .helpers import fake_images, make_run_dir

    run = make_run_dir(tmp_path / "run", threshold=0.4, temperature=1.3)
    train, train_y = fake_images(60, size=32, seed=3)
    val, val_y = fake_images(50, size=32, seed=4)
    val[1::2] //= 4  # site b's images are darker: the sites score apart
    sites = ["a", "b"] * 25
    trust = store_trust(run / "best.pt", train, train_y, val, val_y, "cpu", val_sites=sites)
    ck = load_checkpoint(run / "best.pt")
    points = ck["operating_points"]
    assert set(points) == {"a", "b"} and points["a"]["reference_rows"] == [0, 25] and points["b"]["reference_rows"] == [25, 50]
    assert all(p["threshold"] == 0.4 and p["temperature"] == 1.3 and p["rule"] == "youden" for p in points.values())
    assert torch.equal(trust.reference.labels, torch.cat([val_y[0::2], val_y[1::2]]))
    net = load_model(run / "best.pt").net
    for site, rows in (("a", slice(0, None, 2)), ("b", slice(1, None, 2))):
        _, features = forward_with_features(net, val[rows], "cpu")
        expected = np.quantile(trust.detector.score(features), 0.95, method="higher")
        assert points[site]["ood_threshold"] == pytest.approx(expected, rel=1e-6)
    assert points["a"]["ood_threshold"] != pytest.approx(points["b"]["ood_threshold"], rel=1e-3)
    at_b = load_model(run / "best.pt", site="b")
    assert at_b.threshold == 0.4 and len(at_b.trust.reference.labels) == 25
