"""A threshold chosen on few validation images is said wherever the model answers: every
prediction output's warnings (predict, the Python API, serve) and serve's model card."""

import pytest
import torch

from cxr import load_model
from cxr.deploy.serve import INTENDED_USE, model_card
from cxr.reporting.card import INTENDED_USE as REPORT_INTENDED_USE

from .helpers import make_run_dir


@pytest.mark.parametrize("n_val, warned", [(20, True), (500, False), (None, False)])
def test_the_model_warns_of_a_threshold_chosen_on_few_images(tmp_path, n_val, warned):
    run = make_run_dir(tmp_path / "run", threshold=0.4)
    ck = torch.load(run / "best.pt", weights_only=True)
    if n_val is not None:
        ck["operating_point"]["n_val"] = n_val
    torch.save(ck, run / "best.pt")
    said = [w for w in load_model(run / "best.pt").warnings() if "validation images" in w]
    card = model_card(ck, run / "best.pt")
    assert bool(said) == warned and bool(card["threshold_warning"]) == warned
    if warned:
        assert "only 20 validation images" in said[0] and "only 20 validation images" in card["threshold_warning"]


def test_serve_and_the_report_state_the_same_intended_use():
    assert INTENDED_USE.startswith(REPORT_INTENDED_USE)


@pytest.mark.slow  # the evaluate command end to end, twice
@pytest.mark.parametrize("n_val, warned", [(20, True), (500, False)])
def test_evaluate_warns_of_a_threshold_chosen_on_few_images(tmp_path, tiny_data, capsys, n_val, warned):
    from cxr.cli import main

    run = make_run_dir(tmp_path / "run", threshold=0.4, data=tiny_data)
    ck = torch.load(run / "best.pt", weights_only=True)
    ck["operating_point"]["n_val"] = n_val
    torch.save(ck, run / "best.pt")
    assert main(["evaluate", str(run), "--no-cache"]) == 0
    err = capsys.readouterr().err
    assert ("warning: the threshold was chosen on only 20 validation images" in err) == warned
