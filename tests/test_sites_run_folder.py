"""OUT/sites.csv, the manifest of several --data sources, and the run folder: written by the run once
its run folders are claimed (never while options are read), checked on --resume, left as it was
by a refused run; one named source is one source; a site in the data set's own numbering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr.cli import main
from cxr.config import make_config
from cxr.data.manifest import manifest_splits
from cxr.data.sites import write_sites_manifest
from cxr.run_folder import claim_run_dir
from cxr.run_options import RunOptions

from .helpers import make_tiny_data, write_png


def make_site(root: Path, n: int = 10, offset: int = 0) -> Path:
    """A bare class folder named like NIH's files (patient PPPPPPPP, follow-up FFF), two images a patient."""
    for i in range(n):
        write_png(root / "NORMAL" / f"{10000000 + offset + i // 2:08d}_{i % 2:03d}.png", 500 + offset + i)
        write_png(root / "PNEUMONIA" / f"{20000000 + offset + i // 2:08d}_{i % 2:03d}.png", 700 + offset + i)
    return root


TINY = ["--epochs", "1", "--image-size", "32", "--val-ratio", "0.3", "--no-cache", "--device", "cpu",
        "--workers", "1"]


def test_a_refused_run_leaves_the_earlier_runs_sites_manifest_as_it_was(tmp_path, capsys):
    """A run whose folder holds a previous run is refused before OUT/sites.csv is touched: the
    earlier run's config.json points at that file, so rewriting it would change its data."""
    first, nih, other = make_tiny_data(tmp_path / "kermany"), make_site(tmp_path / "nih"), \
        make_site(tmp_path / "other", n=6, offset=50)
    out = tmp_path / "out"
    manifest = write_sites_manifest([("kermany", first), ("nih", nih)], out / "sites.csv")
    (out / "scratch").mkdir()
    (out / "scratch" / "best.pt").write_bytes(b"an earlier run")
    (out / "scratch" / "config.json").write_text(json.dumps({"data": str(manifest.resolve())}))
    before = manifest.read_bytes()
    assert main(["train", "--data", f"kermany={first}", "--data", f"nih={other}", "--out", str(out), *TINY]) == 2
    assert "holds a previous run" in capsys.readouterr().err
    assert manifest.read_bytes() == before


def test_options_only_parse_several_sources_write_nothing(tmp_path):
    from cxr.cli import build_parser
    from cxr.commands.options import configs, data_sources

    first, nih = make_tiny_data(tmp_path / "kermany"), make_site(tmp_path / "nih")
    args = build_parser().parse_args(["train", "--data", f"kermany={first}", "--data", f"nih={nih}",
                                      "--out", str(tmp_path / "out"), "--site-weight", "nih=2"])
    root, sites = data_sources(args.data, args.site_weight, args.out)
    assert root == tmp_path / "out" / "sites.csv" and sites == [("kermany", first), ("nih", nih)]
    (config,) = configs([args.task], args, several=True)
    assert config.select_by == "worst_site_auc" and config.site_weights == (("nih", 2.0),)
    assert not (tmp_path / "out").exists()


def test_resume_checks_a_multi_site_runs_settings_as_config_json_holds_them(tmp_path):
    """config.json holds site_weights as a JSON list: --resume of the same run is not 'different settings'."""
    from cxr.files import write_json

    run = tmp_path / "scratch"
    config = make_config("scratch", select_by="worst_site_auc", site_weights=())
    root = tmp_path / "sites.csv"
    write_json(run / "config.json", {"config": config.to_dict(), "data": str(root.resolve())})
    (run / "last.pt").write_bytes(b"")
    assert claim_run_dir(run, config, root, RunOptions(resume=True)) == "resume"
    weighted = make_config("scratch", select_by="worst_site_auc", site_weights=(("nih", 2.0),))
    write_json(run / "config.json", {"config": weighted.to_dict(), "data": str(root.resolve())})
    assert claim_run_dir(run, weighted, root, RunOptions(resume=True)) == "resume"


@pytest.mark.slow
def test_a_multi_site_run_resumes_and_refuses_other_sources(tmp_path, capsys):
    first, nih, other = make_tiny_data(tmp_path / "kermany"), make_site(tmp_path / "nih"), \
        make_site(tmp_path / "other", n=6, offset=50)
    out = tmp_path / "out"
    sources = ["--data", f"kermany={first}", "--data", f"nih={nih}"]
    assert main(["train", *sources, "--out", str(out), *TINY]) == 0
    before = (out / "sites.csv").read_bytes()
    capsys.readouterr()
    assert main(["train", *sources, "--out", str(out), *TINY[2:], "--epochs", "2", "--resume"]) == 0, \
        capsys.readouterr().err
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert main(["train", "--data", f"kermany={first}", "--data", f"nih={other}", "--out", str(out), *TINY[2:],
                 "--epochs", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "sites.csv: lists other images than these --data sources" in err and len(err.strip().splitlines()) == 1
    assert (out / "sites.csv").read_bytes() == before


@pytest.mark.slow
def test_one_named_source_is_one_source(tmp_path, capsys):
    """--data kermany=DIR alone: the folder, chosen by validation loss, no sites manifest."""
    data = make_tiny_data(tmp_path / "kermany")
    out = tmp_path / "out"
    assert main(["train", "--data", f"kermany={data}", "--out", str(out), *TINY]) == 0, capsys.readouterr().err
    config = json.loads((out / "scratch" / "config.json").read_text())
    assert config["config"]["select_by"] == "val_loss" and config["data"] == str(data.resolve())
    assert not (out / "sites.csv").exists()


def test_worst_site_selection_with_one_training_site_is_refused_before_anything_is_written(tmp_path):
    """A config that keeps the epoch by the worst site on data of one site ends in one line before
    training, leaving no config.json (it used to fail with a KeyError after the first epoch)."""
    from cxr.errors import CxrError
    from cxr.pipeline import run_study

    out = tmp_path / "out"
    config = make_config("scratch", image_size=32, epochs=1, select_by="worst_site_auc", site_weights=())
    with pytest.raises(CxrError, match="worst_site_auc needs two training sites"):
        run_study(make_tiny_data(tmp_path / "kermany"), out, [config], RunOptions(workers=1), evaluate=False,
                  log=lambda _: None)
    assert not (out / "scratch" / "config.json").exists()


def test_two_sources_of_which_the_split_keeps_one_are_refused_and_leave_no_sites_manifest(tmp_path, monkeypatch):
    """Two --data sources whose training split keeps one site's images (as a --limit can): refused in
    one line before training; the sites manifest the run wrote for its data steps is removed again."""
    import cxr.data.loading as loading
    from cxr.errors import CxrError
    from cxr.pipeline import run_study

    first, nih = make_tiny_data(tmp_path / "kermany"), make_site(tmp_path / "nih")
    monkeypatch.setattr(loading, "limit_per_class", lambda samples, limit, seed: [s for s in samples if s.site != "nih"])
    out = tmp_path / "out"
    config = make_config("scratch", image_size=32, epochs=1, select_by="worst_site_auc", site_weights=())
    with pytest.raises(CxrError, match="worst_site_auc needs two training sites, and the training split holds kermany"):
        run_study(out / "sites.csv", out, [config], RunOptions(workers=1), evaluate=False, log=lambda _: None,
                  sites=[("kermany", first), ("nih", nih)])
    assert not (out / "sites.csv").exists() and not (out / "scratch" / "config.json").exists()


def test_a_site_in_the_data_sets_own_numbering_is_accepted(tmp_path):
    """The data set's test/ restarts its patient numbers (person1 of test/ is not person1 of train/):
    as a site, as with the plain --data DIR, that is no patient in two splits."""
    first = tmp_path / "official"
    k = 0
    for split, n in (("train", 8), ("test", 4)):
        for i in range(n):
            write_png(first / split / "NORMAL" / f"IM-{i:04d}-0001.png", k := k + 1)
            write_png(first / split / "PNEUMONIA" / f"person{i}_bacteria_{k}.png", k := k + 1)
    manifest = write_sites_manifest([("official", first), ("nih", make_site(tmp_path / "nih"))],
                                    tmp_path / "sites.csv")
    train, val, test, _ = manifest_splits(manifest, 0.3, 0)
    assert len(test) == 8 and len(train) + len(val) == 16 + 20
    assert not {s.patient for s in test} & {s.patient for s in train + val}
