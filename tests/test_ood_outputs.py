"""Every output says whether an image is like the training images: `cxr predict`, the Python API,
`cxr serve` (REST) and `cxr evaluate`'s predictions, all from one function; older checkpoints
still predict, with the score marked unavailable."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch

from cxr.deploy.output import format_table, write_records
from cxr.deploy.predict import NO_SCORE, SAMPLE_WARNING, load_model
from cxr.training.checkpoint import load_checkpoint, save_checkpoint
from cxr.trust.ood import FLAG_WARNING

from .helpers import SIZE, make_site, make_trusted_run


@pytest.fixture(scope="module")
def trusted(tmp_path_factory):
    """A run whose best.pt carries the statistics (an untrained ResNet-18 fitted on noise images),
    and a labelled site of image files."""
    root = tmp_path_factory.mktemp("trusted")
    return make_trusted_run(root / "run", n_images=80, n_val=20), make_site(root / "site", per_class=6)


def site_files(site):
    return sorted(str(p) for p in site.rglob("*.png"))


def test_every_record_has_a_score_and_a_flag(trusted):
    run, site = trusted
    model = load_model(run / "best.pt")
    records = model.predict(site_files(site))
    assert all(isinstance(r["ood_score"], float) and isinstance(r["in_distribution"], bool) for r in records)
    assert {"ood_score", "in_distribution", "warning"} <= set(model.fields)
    flagged = [r for r in records if not r["in_distribution"]]
    assert all(r["warning"] == FLAG_WARNING for r in flagged)
    assert all(r["warning"] is None for r in records if r["in_distribution"])
    assert model.warnings() == [] and model.describe_trust()["available"]


def test_a_far_image_is_flagged_and_said_in_words(trusted, tmp_path):
    """A colour photograph-like image (smooth gradients) next to the noise the model was fitted on."""
    run, _ = trusted
    model = load_model(run / "best.pt")
    yy, xx = np.mgrid[0:64, 0:64]
    photo = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)
    record, = model.predict([photo])
    assert record["in_distribution"] is False and record["warning"] == FLAG_WARNING
    table = format_table([record])
    assert "!" in table and FLAG_WARNING in table
    out = tmp_path / "r.json"
    write_records(out, [record], model)
    saved = json.loads(out.read_text())
    assert saved["predictions"][0]["warning"] == FLAG_WARNING and saved["out_of_distribution"]["available"]


def test_predict_serve_and_evaluate_give_the_same_score(trusted):
    from fastapi.testclient import TestClient

    from cxr.data.folders import get_external_samples
    from cxr.data.loading import load_images
    from cxr.deploy.serve import create_app
    from cxr.evaluation.evaluate import evaluate_model
    from cxr.training.checkpoint import model_from_checkpoint

    run, site = trusted
    files = site_files(site)
    api = {r["path"]: r["ood_score"] for r in load_model(run / "best.pt").predict(files)}
    with TestClient(create_app(run / "best.pt")) as client:
        body = client.post("/predict", files=[("files", (f, open(f, "rb").read(), "image/png")) for f in files[:4]]
                           ).json()
        assert body["out_of_distribution"]["available"]
        card = client.get("/model").json()
    served = {r["path"]: r["ood_score"] for r in body["predictions"]}
    assert served == {f: api[f] for f in files[:4]}
    assert card["out_of_distribution"]["threshold"] == pytest.approx(load_model(run / "best.pt").trust.detector.threshold)
    ck = load_checkpoint(run / "best.pt")
    samples = get_external_samples(site)
    images = load_images([s.path for s in samples], SIZE, workers=1)
    metrics = evaluate_model(model_from_checkpoint(ck)[0], ck, samples, images, run, "cpu", name="site")
    rows = list(csv.DictReader(open(run / "predictions_site.csv")))
    for row in rows:
        assert float(row["ood_score"]) == pytest.approx(api[row["path"]], abs=1e-3)
        assert row["in_distribution"] in ("True", "False")
    assert metrics["trust"]["available"] and metrics["trust"]["n"] == len(rows)
    assert metrics["trust"]["flagged"] == sum(row["in_distribution"] == "False" for row in rows)


def test_an_older_checkpoint_still_predicts_with_the_score_unavailable(trusted, tmp_path):
    run, site = trusted
    ck = load_checkpoint(run / "best.pt")
    del ck["trust"]
    save_checkpoint(tmp_path / "old.pt", ck)
    model = load_model(tmp_path / "old.pt")
    records = model.predict(site_files(site)[:3])
    assert all(r["error"] is None and r["ood_score"] is None and r["in_distribution"] is None for r in records)
    assert model.warnings() == [NO_SCORE] and not model.describe_trust()["available"]
    assert "n/a" in format_table(records)


def test_a_model_of_the_bundled_sample_says_so_in_every_record(trusted, tmp_path):
    run, site = trusted
    ck = load_checkpoint(run / "best.pt")
    ck["bundled_sample"] = True
    save_checkpoint(tmp_path / "sample.pt", ck)
    model = load_model(tmp_path / "sample.pt")
    records = model.predict(site_files(site)[:3])
    assert all(SAMPLE_WARNING in r["warning"] for r in records)
    assert SAMPLE_WARNING in model.warnings()


def test_arrays_and_tensors_follow_the_documented_scales(trusted):
    """uint8 in [0, 255] and floats in [0, 1] are the same image; a tensor (C, H, W) is accepted; a
    float array on another scale is one error record, not a black image."""
    run, _ = trusted
    model = load_model(run / "best.pt")
    u8 = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
    a, b, c, bad = model.predict([u8, u8 / 255.0, torch.from_numpy(u8)[None], u8 * 1.0])
    assert a["prob_pneumonia"] == pytest.approx(b["prob_pneumonia"]) == pytest.approx(c["prob_pneumonia"])
    assert bad["error"] and "[0, 1]" in bad["error"] and bad["prob_pneumonia"] is None


def test_one_bad_file_in_a_rest_batch_is_one_error_record(trusted):
    from fastapi.testclient import TestClient

    from cxr.deploy.serve import create_app

    run, site = trusted
    good = site_files(site)[0]
    with TestClient(create_app(run / "best.pt")) as client:
        r = client.post("/predict", files=[("files", ("a.png", open(good, "rb").read(), "image/png")),
                                           ("files", ("broken.png", b"\x89PNG\r\n\x1a\nnot a png", "image/png"))])
        assert r.status_code == 200, r.text
        first, second = r.json()["predictions"]
        assert first["error"] is None and first["prob_pneumonia"] is not None
        assert second["error"] and second["prob_pneumonia"] is None and second["path"] == "broken.png"
        alone = client.post("/predict", files=[("files", ("broken.png", b"\x89PNG\r\n\x1a\nnot", "image/png"))])
        assert alone.status_code == 400 and "broken.png" in alone.json()["detail"]


def test_the_csv_names_the_score_columns(trusted, tmp_path):
    run, site = trusted
    model = load_model(run / "best.pt")
    records = model.predict(site_files(site)[:2])
    write_records(tmp_path / "r.csv", records, model)
    header = next(csv.reader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert header[-4:] == ["ood_score", "in_distribution", "warning", "error"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_exported_model_carries_the_score(trusted, tmp_path, fmt):
    """The exported graph's second output is the score cxr computes, and its side file the threshold."""
    from cxr.data.images import load_image
    from cxr.deploy.export import export_model

    run, site = trusted
    files = site_files(site)
    model = load_model(run / "best.pt")
    records = model.predict(files)
    out, sidecar = export_model(run / "best.pt", fmt, tmp_path / f"m.{fmt}")
    x = np.stack([load_image(f, SIZE) for f in files])[:, None]
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        prob, score = session.run(None, {session.get_inputs()[0].name: x})
    else:
        prob, score = (t.detach().numpy() for t in torch.jit.load(str(out))(torch.from_numpy(x)))
    np.testing.assert_allclose(prob, [r["prob_pneumonia"] for r in records], atol=1e-4)
    np.testing.assert_allclose(score, [r["ood_score"] for r in records], atol=2e-3, rtol=1e-3)
    meta = json.loads(sidecar.read_text())
    assert meta["ood_score"]["threshold"] == pytest.approx(model.trust.detector.threshold)


def test_the_csv_names_each_cam_overlay_and_output_folders_must_exist(trusted, tmp_path, capsys):
    from cxr.cli import main

    run, site = trusted
    files = site_files(site)[:2]
    out = tmp_path / "r.csv"
    assert main(["predict", str(run / "best.pt"), *files, "--cam", str(tmp_path / "cams"), "--output", str(out),
                 "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert all((tmp_path / "cams").joinpath(r["cam_file"].split("/")[-1]).is_file() for r in rows)
    with pytest.raises(SystemExit):
        main(["predict", str(run / "best.pt"), files[0], "--output", str(tmp_path / "missing" / "r.csv")])
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "missing").exists()
