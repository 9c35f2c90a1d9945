"""Training on several sites at once (`--data kermany=DIR --data nih=DIR`, data/sites.py): one
manifest of both, split by patient within each site, the sites weighed equally in the loss, each
site's validation ROC AUC every epoch and the kept epoch by the worst site, the model card naming
both."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from cxr.cli import main
from cxr.data.manifest import manifest_splits
from cxr.training.engine import per_site_auc, site_weights

from .helpers import make_tiny_data, write_png


def make_site(root: Path, n: int = 10) -> Path:
    """A bare class folder named like NIH's files (patient PPPPPPPP, follow-up FFF), two images a patient."""
    for i in range(n):
        write_png(root / "NORMAL" / f"{10000000 + i // 2:08d}_{i % 2:03d}.png", 500 + i)
        write_png(root / "PNEUMONIA" / f"{20000000 + i // 2:08d}_{i % 2:03d}.png", 700 + i)
    return root


def test_site_weights_give_each_site_the_same_share_times_its_weight():
    sites = ["a"] * 30 + ["b"] * 10
    w = site_weights(sites)
    assert w[:30].sum() == pytest.approx(w[30:].sum()) and w.mean() == pytest.approx(1.0)
    w2 = site_weights(sites, {"b": 2.0})
    assert w2[30:].sum() == pytest.approx(2 * w2[:30].sum())


def test_per_site_auc_and_the_worst():
    import numpy as np

    y = np.array([0, 1, 0, 1, 0, 1])
    p = np.array([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.7, 0.3]])
    out = per_site_auc(y, p, ["a", "a", "a", "a", "b", "b"])
    assert out == {"val_auc_a": 1.0, "val_auc_b": 0.0, "val_auc_worst_site": 0.0}


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sites")
    first, second = make_tiny_data(tmp / "kermany", n_test=3), make_site(tmp / "nih")
    out = tmp / "out"
    assert main(["run", "--data", f"kermany={first}", "--data", f"nih={second}", "--out", str(out), "--tasks",
                 "scratch", "--epochs", "2", "--image-size", "32", "--val-ratio", "0.3", "--no-cache",
                 "--device", "cpu"]) == 0
    return out


@pytest.mark.slow
def test_a_two_site_run_writes_per_site_metrics_and_names_both(two_sites, capsys):
    run = two_sites / "scratch"
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["select_by"] == "worst_site_auc" and config["config"]["site_weights"] == []
    assert set(config["sites"]["train"]) == {"kermany", "nih"} and set(config["sites"]["val"]) == {"kermany", "nih"}
    with open(run / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"val_auc_kermany", "val_auc_nih", "val_auc_worst_site"} <= set(rows[0])
    for r in rows:
        assert float(r["val_auc_worst_site"]) == min(float(r["val_auc_kermany"]), float(r["val_auc_nih"]))
    best = max(rows, key=lambda r: (float(r["val_auc_worst_site"]), -int(r["epoch"])))
    ck = torch.load(run / "best.pt", weights_only=True)
    assert ck["epoch"] == int(best["epoch"])  # kept by the worst site's validation AUC
    assert ck["sites"] == config["sites"]["train"]
    # a point per site: the run's own decision (its few validation images give no flag of a site's own)
    assert set(ck["operating_points"]) == {"kermany", "nih"}
    assert all(p["threshold"] == ck["threshold"] and "ood_threshold" not in p for p in ck["operating_points"].values())
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val_auc_kermany", "val_auc_nih"} <= set(metrics["checkpoint"])
    assert metrics["n"] == 6  # scored on the sources' test/ images only: kermany's
    capsys.readouterr()
    image = next((two_sites.parent / "kermany" / "test" / "NORMAL").iterdir())
    assert main(["predict", str(run / "best.pt"), str(image)]) == 0
    n = config["sites"]["train"]
    assert f"trained on: kermany {n['kermany']} images, nih {n['nih']} images" in capsys.readouterr().out


@pytest.mark.slow
def test_site_stratified_splits_never_put_a_patient_on_both_sides(two_sites):
    for seed in (0, 1, 2):
        train, val, test, _ = manifest_splits(two_sites / "sites.csv", 0.3, seed)
        for site in ("kermany", "nih"):
            tr = {s.patient for s in train if s.site == site}
            va = {s.patient for s in val if s.site == site}
            assert tr and va and not tr & va, (seed, site)
            assert {s.label for s in val if s.site == site} == {0, 1}
        assert {s.site for s in test} == {"kermany"}
        assert all(s.patient.startswith(s.site + ":") for s in train + val + test)


def test_a_small_site_gets_a_validation_share_that_can_rank_epochs():
    """At 10% a site of 494 images (nih_half) leaves ~40 validation images to choose the epoch by; each
    site's rarer class now gets SITE_MIN_VAL_PER_CLASS of them (within SITE_MAX_VAL_RATIO), and a large
    site keeps the asked share."""
    from cxr.data.dataset import Sample
    from cxr.data.manifest import SITE_MAX_VAL_RATIO, SITE_MIN_VAL_PER_CLASS, _per_site, site_val_ratio

    def site(name, normal, pneumonia):  # one image per patient
        return [Sample(Path(f"{name}/{c}/{i}.png"), c, f"{name}:{c}-{i}", site=name)
                for c, n in enumerate((normal, pneumonia)) for i in range(n)]

    big, small, tiny = site("kermany", 1089, 3084), site("nih", 274, 220), site("few", 40, 40)
    assert site_val_ratio(big, 0.1) == 0.1
    assert site_val_ratio(small, 0.1) == pytest.approx(SITE_MIN_VAL_PER_CLASS / 220)
    assert site_val_ratio(tiny, 0.1) == SITE_MAX_VAL_RATIO
    assert site_val_ratio(small, 0.5) == 0.5  # never below the asked share
    train, val = _per_site(big + small + tiny, 0.1, seed=0, small_sites=True)
    for name, members in (("kermany", big), ("nih", small), ("few", tiny)):
        counts = [sum(s.site == name and s.label == c for s in val) for c in (0, 1)]
        assert {s.patient for s in train if s.site == name}.isdisjoint({s.patient for s in val if s.site == name})
        if name == "nih":
            assert min(counts) >= SITE_MIN_VAL_PER_CLASS, counts
        if name == "kermany":
            assert counts[0] == pytest.approx(109, abs=1)  # 10% of its 1,089 normal images, as before
    plain_train, plain_val = _per_site(big + small, 0.1, seed=0)  # the carved test split: the asked share
    assert sum(s.site == "nih" for s in plain_val) == pytest.approx(49, abs=2)


def test_bad_site_options_are_one_line(tmp_path, capsys):
    data = make_tiny_data(tmp_path / "d")
    assert main(["run", "--data", str(data), "--out", str(tmp_path / "o"), "--site-weight", "nih=2"]) == 2
    assert "--site-weight goes with several" in capsys.readouterr().err
    assert main(["run", "--data", f"a={data}", "--data", f"a={data}", "--out", str(tmp_path / "o2")]) == 2
    assert "given twice" in capsys.readouterr().err
    site = make_site(tmp_path / "nih")
    assert main(["run", "--data", f"nih={site}", "--data", f"other={site}", "--out", str(tmp_path / "o3")]) == 2
    assert "no source has a test/ split" in capsys.readouterr().err
    assert main(["run", "--data", f"a={data}", "--data", f"b={site}", "--out", str(tmp_path / "o4"),
                 "--site-weight", "c=2"]) == 2
    assert "no --data source has that name" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_weighs_the_training_sites_and_scores_each_sites_validation(tmp_path, monkeypatch):
    from cxr.config import make_config
    from cxr.training import engine
    from cxr.training.model import build_model

    seen = []
    real = engine.run_epoch

    def spy(*args, **kwargs):
        seen.append(kwargs.get("sample_weight"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "run_epoch", spy)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (24, 1, 32, 32), dtype=torch.uint8)
    y = torch.tensor([i % 2 for i in range(24)])
    sites = ["a"] * 18 + ["b"] * 6
    config = make_config("scratch", image_size=32, epochs=1, batch_size=8, select_by="worst_site_auc",
                         site_weights=(("b", 3.0),))
    history = engine.fit(build_model(None), config, x, y, x[:8], y[:8], tmp_path, "cpu", log=lambda _: None,
                         train_sites=sites, val_sites=["a"] * 4 + ["b"] * 4)
    assert torch.allclose(seen[0], site_weights(sites, {"b": 3.0}))  # training: the sites' weights
    assert seen[1] is None                                            # validation: unweighted by site
    assert {"val_auc_a", "val_auc_b", "val_auc_worst_site"} <= set(history[0])


@pytest.mark.slow
def test_the_report_names_the_sites_and_their_validation(two_sites):
    report = (two_sites / "report.md").read_text()
    line = next(l for l in report.splitlines() if l.startswith("Several training sites"))
    assert "kermany" in line and "nih" in line and "worst_site_auc" in line and "validation ROC AUC" in line
