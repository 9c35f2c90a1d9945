"""The operating point as a named record (training/operating_point.py): every kind of point cxr
chooses goes into best.pt and metrics.json as the plain dict it always was and comes back the same;
a dict written before a field existed reads with that field None."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cxr.config import FinetuneSpec, make_config
from cxr.data.dataset import Sample
from cxr.reporting.card import few_validation_warning
from cxr.training.checkpoint import for_site, load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from cxr.training.model import build_model
from cxr.training.operating_point import OperatingPoint

from .helpers import SIZE, fake_images, make_run_dir

VALIDATION = ["chosen_on", "n_val", "val_ece", "val_ece_calibrated", "val_nll", "val_nll_calibrated"]


def round_trip(d: dict) -> OperatingPoint:
    """The record of a stored dict, checked to give back the same dict, keys in the same order."""
    point = OperatingPoint.from_dict(d)
    assert point.to_dict() == d and list(point.to_dict()) == list(d)
    assert OperatingPoint.from_dict(point.to_dict()) == point
    return point


def _val(n: int = 16):
    images, labels = fake_images(n, size=SIZE)
    samples = [Sample(Path(f"{i}.png"), int(y), f"p{i}") for i, y in enumerate(labels)]
    return samples, images, labels


@pytest.mark.parametrize("overrides, rule", [({}, "youden"), ({"target_sensitivity": 0.9}, "sensitivity>=0.9"),
                                             ({"threshold_rule": "0.5"}, "0.5")])
def test_a_binary_point_chosen_on_validation_round_trips_through_best_pt(tmp_path, overrides, rule):
    from cxr.evaluation.evaluate import choose_operating_point

    run = make_run_dir(tmp_path / "run")
    samples, images, _ = _val()
    config = make_config("scratch", image_size=SIZE, calibrate=True, **overrides)
    chosen = choose_operating_point(run, config, samples, images, "cpu")
    stored = torch.load(run / "best.pt", weights_only=True)["operating_point"]  # plain types only
    assert list(stored) == ["rule", "threshold", "temperature", *VALIDATION]
    assert round_trip(stored) == chosen and chosen.rule == rule and chosen.n_val == 16 and chosen.extra == {}


def test_a_multiclass_point_is_the_argmax_and_round_trips(tmp_path):
    from cxr.evaluation.evaluate import choose_operating_point

    config = make_config("scratch", image_size=SIZE, labels="three-way")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "best.pt", make_checkpoint(build_model(None, n_classes=3), config, 1, {}, 0.7))
    samples, images, _ = _val(12)
    samples = [Sample(s.path, i % 3, s.patient) for i, s in enumerate(samples)]
    chosen = choose_operating_point(tmp_path, config, samples, images, "cpu")
    stored = torch.load(tmp_path / "best.pt", weights_only=True)["operating_point"]
    assert list(stored) == ["rule", "threshold", "temperature", "chosen_on", "n_val", "decision", *VALIDATION[2:]]
    assert round_trip(stored) == chosen and chosen.rule == "argmax" and chosen.threshold == 0.5


def test_the_points_of_a_checkpoint_without_one_keep_their_keys():
    """metrics.json of a checkpoint that chose nothing (a last.pt): as evaluate writes them."""
    fixed = round_trip({"rule": "fixed", "threshold": 0.5, "temperature": 1.0})
    argmax = round_trip({"rule": "argmax", "temperature": 1.0})
    assert argmax.threshold is None and few_validation_warning(fixed) is None


def _fine_tuned(tmp_path: Path):
    """What `cxr adapt --finetune` chooses, without the fine-tune: the source model stands in for the
    fitted one (choose_points reads its predictions only). 16 source validation images, 10 of the
    site's 24 images held out as its validation."""
    from cxr.adaptation.adapt import AdaptPlan, SiteInputs, choose_points
    from cxr.adaptation.methods import Adapted, Context, Fitted, Plan, first_site_operating_point
    from cxr.adaptation.settings import AdaptSettings

    run = make_run_dir(tmp_path / "run", threshold=0.37)
    checkpoint = load_checkpoint(run / "best.pt")
    model, config = model_from_checkpoint(checkpoint)
    _, images, labels = _val()
    source_val = (images, labels)
    plan = Plan(operating_point=False, bn="finetune", finetune=FinetuneSpec())
    job = AdaptPlan(run, checkpoint, config, tmp_path / "site", "nih", [], False, plan, None, None)
    y = np.arange(24) % 2
    inputs = SiteInputs(images, y, None, None, Context(source_val=source_val))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(24, 2)) + np.stack([1 - y, y], 1)
    kept = first_site_operating_point(model, checkpoint, source_val, "cpu")
    adapted = Adapted(Fitted(model.eval(), holdout=np.arange(10)), kept, logits)
    return run, checkpoint, choose_points(job, inputs, adapted, AdaptSettings(device="cpu", log=lambda _: None))


def test_the_points_of_a_fine_tuned_model_round_trip_and_count_their_images(tmp_path):
    _, _, points = _fine_tuned(tmp_path)
    site = round_trip(points.per_site["nih"].to_dict())
    first = round_trip(points.per_site["source"].to_dict())
    assert list(site.to_dict()) == list(first.to_dict()) == ["rule", "threshold", "temperature", "chosen_on", "n_val"]
    assert site.chosen_on == "10 site validation images" and site.n_val == 10 and site.rule == "youden"
    assert first.rule == "youden" and first.n_val == 16 and "validation split (16 images)" in first.chosen_on
    # the model's own point: the source's rule chosen again, with its count, so predict warns as --site source would
    model = round_trip(points.model.to_dict())
    assert model.chosen_on == first.chosen_on and model.n_val == first.n_val == 16


def test_a_site_point_chosen_on_few_images_is_warned_about_with_site(tmp_path):
    """--site NAME decides by a point chosen on that site's few validation images: predict, serve and
    evaluate say so, as they do for a run's own point."""
    from cxr import load_model
    from cxr.deploy.serve import model_card

    run, checkpoint, points = _fine_tuned(tmp_path)
    checkpoint["operating_points"] = {name: p.to_dict() for name, p in points.per_site.items()}
    save_checkpoint(run / "best.pt", checkpoint)
    at_site = for_site(load_checkpoint(run / "best.pt"), "nih")
    assert at_site["operating_point"] == {**checkpoint["operating_points"]["nih"], "site": "nih"}
    assert round_trip(at_site["operating_point"]).site == "nih"
    said = [w for w in load_model(run / "best.pt", site="nih").warnings() if "validation images" in w]
    assert len(said) == 1 and "only 10 validation images" in said[0]
    assert "only 10 validation images" in model_card(at_site, run / "best.pt")["threshold_warning"]
    assert any("only 16 validation images" in w for w in load_model(run / "best.pt", site="source").warnings())
    assert not any("validation images" in w for w in load_model(run / "best.pt").warnings())  # counted nowhere


def test_an_adapted_site_point_round_trips_with_its_site():
    from cxr.adaptation.methods import site_operating_point

    y = np.arange(20) % 2
    logits = np.random.default_rng(1).normal(size=(20, 2)) + np.stack([1 - y, y], 1)
    point = site_operating_point(logits, y, 0.9)
    stored = {**point.to_dict(), "chosen_on": "site", "site": "/data/nih", "n_site": 20}  # as adapt writes it
    assert round_trip(stored).rule == "sensitivity>=0.9" and round_trip(stored).n_site == 20


def test_an_older_record_reads_with_the_newer_fields_none_and_unknown_keys_kept():
    old = {"rule": "youden", "threshold": 0.37, "temperature": 1.0, "chosen_on": "validation"}
    point = round_trip(old)
    assert point.n_val is None and point.val_ece is None and point.site is None
    assert few_validation_warning(point) is None  # the record predates the count
    site = round_trip({"rule": "youden", "threshold": 0.4, "temperature": 1.2,
                       "chosen_on": "12 site validation images"})
    assert site.n_val is None and few_validation_warning(site) is None
    later = round_trip({**old, "n_val": 20, "chosen_by": "a later cxr"})
    assert later.extra == {"chosen_by": "a later cxr"} and few_validation_warning(later)
    assert OperatingPoint.from_dict(None) == OperatingPoint.from_dict({}) == OperatingPoint()
    assert OperatingPoint().to_dict() == {}
