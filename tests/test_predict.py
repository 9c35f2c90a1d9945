"""`cxr predict`, the Python API and export, on real shared images and on the files users have."""

import csv
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cxr import load_model
from cxr.deploy.predict import expand_inputs
from cxr.errors import CheckpointError

from .helpers import cxr, write_dicom


@pytest.fixture(scope="module")
def checkpoint(study):
    return study[0] / "scratch" / "best.pt"


@pytest.fixture(scope="module")
def real_images(shared_data):
    return sorted((shared_data / "test" / "NORMAL").iterdir())[:3] + sorted((shared_data / "test" / "PNEUMONIA").iterdir())[:3]


def test_dicom_variants_predict_like_the_jpeg(checkpoint, real_images, tmp_path):
    jpeg = real_images[3]
    gray = np.asarray(Image.open(jpeg).convert("L"))
    write_dicom(tmp_path / "plain.dcm", gray)
    write_dicom(tmp_path / "inverted.dcm", 255 - gray, photometric="MONOCHROME1")
    # 12-bit stored values with a modality rescale to 8 * gray and a window mapping that back to [0, 1]
    stored = (gray.astype(np.uint16) * 16 + 100)
    write_dicom(tmp_path / "rescaled.dcm", stored, bits=12, slope=0.5, intercept=-50, window=(1020.5, 2041))
    model = load_model(checkpoint)
    records = model.predict([jpeg, tmp_path / "plain.dcm", tmp_path / "inverted.dcm", tmp_path / "rescaled.dcm"])
    assert all(r["error"] is None for r in records), records
    reference = records[0]["prob_pneumonia"]
    for r in records[1:]:
        assert r["prob_pneumonia"] == pytest.approx(reference, abs=1e-3), r
        assert r["label"] == records[0]["label"]


def test_png_modes_and_sizes_predict_alike(checkpoint, real_images, tmp_path):
    """One radiograph saved as "originals" of three sizes, each as 8-bit PNG, RGB JPEG, RGBA PNG and
    16-bit PNG: what the model sees must agree pixel by pixel, and the probabilities must differ
    far less than those of different images. Resampling from another size costs at most 2 grey
    levels (measured at 64 and 224 px: at most 1 for PNG); a large JPEG is decoded at reduced
    size first (images.py), which at 64 px moved a few edge pixels by up to 12 levels (mean 1.1)."""
    source = Image.open(real_images[0]).convert("L")
    for width, height in ((900, 700), (1400, 1100), (640, 500)):
        gray = source.resize((width, height))
        gray.save(tmp_path / f"l{width}.png")
        gray.convert("RGB").save(tmp_path / f"rgb{width}.jpg", quality=100)
        gray.convert("RGBA").save(tmp_path / f"rgba{width}.PNG")
        Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(tmp_path / f"sixteen{width}.png")
    model = load_model(checkpoint)
    files = sorted(tmp_path.iterdir())
    reference = model.decode(tmp_path / "l900.png").astype(int)
    for f in files:
        diff = np.abs(model.decode(f).astype(int) - reference)
        worst, mean = (16, 1.5) if f.suffix == ".jpg" else (2, 0.5)
        assert diff.max() <= worst and diff.mean() < mean, (f.name, diff.max(), diff.mean())
    probs = [r["prob_pneumonia"] for r in model.predict(files)]
    between_images = [r["prob_pneumonia"] for r in model.predict(real_images)]
    assert max(probs) - min(probs) < 2e-2, probs
    assert max(probs) - min(probs) <= 0.1 * (max(between_images) - min(between_images)), (probs, between_images)


@pytest.mark.slow
def test_bad_files_get_error_rows_and_a_nonzero_exit(checkpoint, real_images, tmp_path):
    (tmp_path / "empty.jpeg").write_bytes(b"")
    (tmp_path / "text.jpeg").write_text("not an image at all")
    (tmp_path / "truncated.jpeg").write_bytes(real_images[0].read_bytes()[:3000])
    (tmp_path / "notes.gif").write_bytes(b"GIF89a")
    Image.new("L", (8100, 8100)).save(tmp_path / "bomb.png")  # 66 MP of zeros: a tiny file
    out = tmp_path / "results.json"
    result = cxr("predict", checkpoint, real_images[0], tmp_path / "*.jpeg", tmp_path / "notes.gif",
                 tmp_path / "bomb.png", tmp_path / "missing.png", "--output", out)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    records = {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(out.read_text())["predictions"]}
    assert records[real_images[0].name]["error"] is None and 0 <= records[real_images[0].name]["prob_pneumonia"] <= 1
    assert "not a readable image" in records["empty.jpeg"]["error"]
    assert "not a readable image" in records["text.jpeg"]["error"]
    assert "cut short" in records["truncated.jpeg"]["error"]  # what happened and what to do, not Pillow's words
    assert "unsupported format" in records["notes.gif"]["error"]
    assert "too large" in records["bomb.png"]["error"]
    assert "no such file" in records["missing.png"]["error"]
    assert "ERROR" in result.stdout and "1 predicted" in result.stdout


@pytest.mark.slow
def test_cli_csv_matches_the_api(checkpoint, real_images, tmp_path):
    out = tmp_path / "r.csv"
    result = cxr("predict", checkpoint, real_images[0].parent, "--output", out, "--cam", tmp_path / "cams")
    assert result.returncode == 0, result.stderr
    with open(out) as f:
        rows = list(csv.DictReader(f))
    folder = sorted(real_images[0].parent.iterdir())
    assert [r["path"] for r in rows] == [str(p) for p in folder]
    api = load_model(checkpoint).predict(str(real_images[0].parent))  # the API takes folders too
    assert [r["path"] for r in api] == [r["path"] for r in rows]
    for row, rec in zip(rows, api):
        assert float(row["prob_pneumonia"]) == pytest.approx(rec["prob_pneumonia"], abs=1e-6)
        assert row["label"] == rec["label"]
    assert len(list((tmp_path / "cams").glob("*.cam.png"))) == len(folder)


def test_api_accepts_images_and_explains(checkpoint, real_images):
    model = load_model(checkpoint)
    pil = Image.open(real_images[1])
    by_path, by_image, by_array = model.predict([real_images[1], pil, np.asarray(pil)])
    assert by_image["prob_pneumonia"] == pytest.approx(by_path["prob_pneumonia"], abs=1e-6)
    assert by_array["prob_pneumonia"] == pytest.approx(by_path["prob_pneumonia"], abs=1e-6)
    maps = model.explain(real_images[:2])
    assert maps.shape == (2, model.image_size, model.image_size) and 0 <= maps.min() and maps.max() <= 1


def test_globs_and_folders_expand(tmp_path):
    for name in ("a/x.png", "a/b/y.JPG", "a/.hidden/z.png", "a/readme.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    names = [i.name for i in expand_inputs([tmp_path / "a", str(tmp_path / "a" / "*.png"), tmp_path / "nope"])]
    assert names == [str(tmp_path / "a/b/y.JPG"), str(tmp_path / "a/x.png"), str(tmp_path / "nope")]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_code_carrying_checkpoint_is_refused_by_predict(real_images, tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "best.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": "cxr-checkpoint-v1", "model": _RunsCode(str(marker))}, f)
    result = cxr("predict", evil, real_images[0])
    assert result.returncode == 2 and "refused" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a cxr checkpoint"):
        load_model(tmp_path / "other.pt")


def export_images(shared_data):
    return sorted((shared_data / "test" / "NORMAL").iterdir())[:4] + sorted((shared_data / "test" / "PNEUMONIA").iterdir())[:4]


@pytest.fixture(scope="module", params=["none", "equalize", "standardize"])
def intensity_checkpoint(request, shared_data, tmp_path_factory):
    """A checkpoint of each intensity normalisation, with a temperature and threshold != defaults,
    and an `fc` that spreads these images' probabilities out, so a preprocessing slip shows."""
    from cxr.config import make_config
    from cxr.data.images import load_image
    from cxr.training.checkpoint import make_checkpoint, save_checkpoint
    from cxr.training.model import backbone, build_model
    from cxr.training.preprocess import normalize

    torch.manual_seed(1)
    model = build_model(None).eval()
    x = torch.from_numpy(np.stack([load_image(p, 96) for p in export_images(shared_data)]))[:, None]
    with torch.no_grad():
        f = backbone(model)(normalize(x, "cpu", request.param))
        direction = f[4:].mean(0) - f[:4].mean(0)
        z = f @ direction
        model.fc.weight.zero_()
        model.fc.weight[1] = direction * 6 / (z.std() + 1e-9)
        model.fc.bias.copy_(torch.tensor([0.0, float(-(z.mean()) * 6 / (z.std() + 1e-9))]))
    config = make_config("scratch", intensity=request.param, image_size=96)
    ck = make_checkpoint(model, config, 1, {"val_loss": 0.5}, 0.5)
    ck.update(threshold=0.42, temperature=1.7)
    path = tmp_path_factory.mktemp(request.param) / "best.pt"
    save_checkpoint(path, ck)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_reproduces_predict_for_every_intensity(intensity_checkpoint, shared_data, tmp_path, fmt):
    from cxr.data.images import load_image

    images = export_images(shared_data)
    out = tmp_path / f"model.{fmt}"
    result = cxr("export", intensity_checkpoint, "--format", fmt, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    model = load_model(intensity_checkpoint)
    assert meta["class_names"] == ["NORMAL", "PNEUMONIA"] and meta["input_size"] == 96
    assert (meta["threshold"], meta["temperature"], meta["intensity"]) == (0.42, 1.7, model.intensity)
    expected = np.array([r["prob_pneumonia"] for r in model.predict(images)])
    assert expected.std() > 0.05  # probabilities spread out, not all saturated
    x = np.stack([load_image(p, 96) for p in images])[:, None]  # uint8, as the sidecar says
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
    else:
        got = torch.jit.load(str(out))(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_predict_labels_as_evaluation_does_and_says_when_nothing_was_chosen(study, checkpoint, tmp_path):
    # The same probabilities and labels as evaluation wrote for the test images (float64 both ways).
    rows = list(csv.DictReader(open(checkpoint.parent / "predictions.csv")))
    records = load_model(checkpoint).predict([r["path"] for r in rows])
    for row, rec in zip(rows, records):
        assert rec["prob_pneumonia"] == pytest.approx(float(row["prob_pneumonia"]), abs=1e-6)
        assert rec["label"] == row["predicted_label"]
    assert "no operating point" not in cxr("predict", checkpoint, rows[0]["path"]).stderr
    result = cxr("predict", checkpoint.parent / "last.pt", rows[0]["path"])
    assert result.returncode == 0 and "holds no operating point chosen on validation" in result.stderr
