"""`cxr serve`: every route through FastAPI's test client, every bad file answered 4xx with its
reason, the token, uploads never left on disk, concurrent requests on a real uvicorn server, and
the page in headless Chromium with a real radiograph."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.cli import main
from cxr.deploy.predict import load_model

from .helpers import SHARED_DATA, SIZE, live_servers, make_run_dir

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cxr.deploy.serve import create_app  # noqa: E402

ORIGINALS = SHARED_DATA.parent / "chest_xray_originals"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A run folder with best.pt, config.json and metrics.json (random weights: serving is tested,
    not skill)."""
    block = {"value": 0.9, "ci": [0.85, 0.95]}
    run = make_run_dir(tmp_path_factory.mktemp("serve") / "scratch", epoch=3, val_loss=0.5, threshold=0.37,
                       data="/data/chest_xray", run_config={"data_summary": "split  NORMAL  PNEUMONIA\ntrain  10  10"},
                       metrics={"n": 20, "threshold": 0.37, "set": {"name": "test"},
                                "at_threshold": {"operating": {k: block for k in
                                                               ("accuracy", "sensitivity", "specificity", "roc_auc")}}})
    return run / "best.pt"


def png_bytes(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def client(checkpoint, tmp_path, monkeypatch):
    # every temporary file of the request (uploads spooled by the framework, our folder) lands here
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with TestClient(create_app(checkpoint, max_upload_mb=0.5)) as c:
        yield c
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing left behind, good request or bad


def test_health_model_card_and_docs(client):
    assert client.get("/health").json()["status"] == "ok"
    card = client.get("/model").json()
    assert card["task"] == "scratch" and card["threshold"] == 0.37 and card["threshold_rule"] == "youden"
    assert card["evaluations"]["test"]["accuracy"] == {"value": 0.9, "ci": [0.85, 0.95]}
    assert "not a medical device" in card["intended_use"] and card["versions"]["torch"]
    assert card["training_data"]["summary"].startswith("split")
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/predict", "/model", "/health"}
    page = client.get("/")
    assert page.status_code == 200 and "Drop JPEG, PNG or DICOM" in page.text


def test_predict_gives_the_records_of_cxr_predict(client, checkpoint, tmp_path):
    files = [png_bytes(1), png_bytes(2)]
    r = client.post("/predict", files=[("files", (f"x{k}.png", b, "image/png")) for k, b in enumerate(files)])
    assert r.status_code == 200, r.text
    body = r.json()
    for k, b in enumerate(files):
        (tmp_path / f"x{k}.png").write_bytes(b)
    expected = load_model(checkpoint).predict([str(tmp_path / f"x{k}.png") for k in range(2)])
    assert [p["path"] for p in body["predictions"]] == ["x0.png", "x1.png"]
    for got, want in zip(body["predictions"], expected):
        assert got["prob_pneumonia"] == pytest.approx(want["prob_pneumonia"], abs=1e-6)
        assert got["label"] == want["label"] and got["threshold"] == 0.37 and got["error"] is None
    assert body["threshold"] == 0.37 and "youden" in body["operating_point"]


def test_cam_comes_back_as_png_images(client):
    r = client.post("/predict?cam=true", files={"files": ("a.png", png_bytes(3), "image/png")})
    rec = r.json()["predictions"][0]
    image = Image.open(io.BytesIO(base64.b64decode(rec["image_png"])))
    cam = np.asarray(Image.open(io.BytesIO(base64.b64decode(rec["cam_png"]))))
    assert image.size == (SIZE, SIZE) and cam.shape == (SIZE, SIZE, 3) and cam.std() > 0


def test_type_is_read_from_the_bytes_when_the_name_has_no_extension(client):
    r = client.post("/predict", files={"files": ("upload", png_bytes(4), "application/octet-stream")})
    assert r.status_code == 200 and r.json()["predictions"][0]["path"] == "upload"


def dicom_without_pixels() -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.PatientID = "x"
    ds.Modality = "DX"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def huge_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8100, 8000)).save(buffer, format="PNG", compress_level=1)  # 64.8 MP of zeros: small file
    return buffer.getvalue()


@pytest.mark.parametrize("name, content, status, reason", [
    ("empty.png", b"", 400, "empty"),
    ("notes.png", b"this is text, not an image" * 10, 400, "notes.png"),
    ("notes.txt", b"this is text, not an image" * 10, 415, "not a JPEG, PNG or DICOM"),
    ("big.png", b"\x89PNG\r\n\x1a\n" + bytes(600_000), 413, "0.5 MB limit"),
    ("huge.png", None, 400, "pixels"),
    ("nopixels.dcm", None, 400, "nopixels.dcm"),
])
def test_bad_files_are_answered_4xx_with_the_reason(client, name, content, status, reason):
    content = {"huge.png": huge_png, "nopixels.dcm": dicom_without_pixels}.get(name, lambda: content)()
    r = client.post("/predict", files={"files": (name, content, "application/octet-stream")})
    assert r.status_code == status, r.text
    assert name in r.json()["detail"] and reason in r.json()["detail"]


def test_no_files_and_too_many_files_are_refused(client):
    assert client.post("/predict").status_code == 422
    many = [("files", (f"{k}.png", png_bytes(k), "image/png")) for k in range(17)]
    assert client.post("/predict", files=many).status_code == 400


def test_token_is_checked_on_every_api_call_but_health(checkpoint):
    with TestClient(create_app(checkpoint, token="s3cret")) as c:
        files = {"files": ("a.png", png_bytes(5), "image/png")}
        for method, url, kw in (("get", "/model", {}), ("post", "/predict", {"files": files})):
            assert getattr(c, method)(url, **kw).status_code == 401
            assert getattr(c, method)(url, headers={"Authorization": "Bearer wrong"}, **kw).status_code == 401
            assert getattr(c, method)(url, headers={"Authorization": "Bearer s3cret"}, **kw).status_code == 200
        page = c.get("/")
        assert page.status_code == 200 and "not a medical device" in page.text  # the banner needs no token
        assert c.get("/health").json() == {"status": "ok"}  # liveness probes carry no token; it says nothing more


def test_a_request_body_over_the_limit_is_refused_before_it_is_parsed(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with TestClient(create_app(checkpoint, max_upload_mb=0.5)) as c:  # 16 files x 0.5 MB: 8 MB at most
        r = c.post("/predict", files={"files": ("big.png", b"\x89PNG\r\n\x1a\n" + bytes(10_000_000), "image/png")})
    assert r.status_code == 413 and r.json()["detail"] == "request larger than 16 files of 0.5 MB"
    assert list(tmp_path.iterdir()) == []  # not even spooled


def test_an_upload_name_never_becomes_a_path(client, tmp_path):
    r = client.post("/predict", files={"files": ("../../escape.png", png_bytes(3), "image/png")})
    assert r.status_code == 200 and r.json()["predictions"][0]["path"] == "../../escape.png"
    assert not list(tmp_path.rglob("escape.png")) and not (tmp_path.parent / "escape.png").exists()


def test_each_request_is_logged_in_one_line(checkpoint):
    lines = []
    with TestClient(create_app(checkpoint, log=lines.append)) as c:
        c.get("/health")
        c.post("/predict", files={"files": ("a.txt", b"text", "text/plain")})
    assert [line.rsplit(" ", 2)[0] for line in lines] == ["GET /health 200", "POST /predict 415"]
    assert all(line.endswith(" ms") for line in lines)


@pytest.fixture
def no_uvicorn(monkeypatch):
    """uvicorn.run fails at once: a guard that breaks can never leave a real server listening."""
    import uvicorn

    def refuse(*args, **kwargs):
        raise AssertionError("uvicorn.run reached: the guard let it through")

    monkeypatch.setattr(uvicorn, "run", refuse)


@pytest.mark.slow
def test_the_page_script_parses(checkpoint):
    """The page's JavaScript as served, checked by node when it is installed (the browser test
    checks it in Chromium; this catches a broken quote without a browser)."""
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; the browser test covers the script")
    with TestClient(create_app(checkpoint, token="t")) as c:
        page = c.get("/").text
    script = tempfile.NamedTemporaryFile("w", suffix=".js", delete=False)
    script.write(page.split("<script>")[1].split("</script>")[0])
    script.close()
    result = subprocess.run([node, "--check", script.name], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_another_host_needs_a_token(checkpoint, capsys, no_uvicorn):
    assert main(["serve", str(checkpoint), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--token" in err


def test_a_port_in_use_is_refused_with_advice(checkpoint, capsys, no_uvicorn):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(checkpoint), "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and f"port {port} on 127.0.0.1 is in use" in captured.err
    assert "--port" in captured.err and "serving" not in captured.out


@pytest.fixture
def live_server(request):
    """A real uvicorn server in a thread, serving the checkpoint the test names."""
    with live_servers() as start:
        yield lambda checkpoint, token=None: start(create_app(checkpoint, token))


@pytest.mark.slow
def test_concurrent_requests_on_a_real_server_all_succeed_alike(checkpoint, live_server):
    import httpx

    url = live_server(checkpoint)
    content = png_bytes(7)

    def one(_):
        return httpx.post(f"{url}/predict", files={"files": ("a.png", content, "image/png")}, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(24)))
    assert [r.status_code for r in responses] == [200] * 24
    assert len({r.json()["predictions"][0]["prob_pneumonia"] for r in responses}) == 1


@pytest.fixture
def originals():
    if not ORIGINALS.is_dir():
        pytest.skip(f"{ORIGINALS} not found")
    return ORIGINALS


def test_the_page_in_a_browser_predicts_a_real_radiograph_with_a_token(browser, originals, study, live_server):
    # browser and originals first: a missing Chromium or image folder skips before the study is trained
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out, _ = study
    url = live_server(out / "scratch" / "best.pt", token="s3cret")
    image = sorted((ORIGINALS / "PNEUMONIA").glob("*.jpeg"))[0]
    browser.get(url + "/")
    browser.execute_script("localStorage.removeItem('cxr-token')")
    browser.get(url + "/")
    assert "not a medical device" in browser.find_element(By.ID, "use").text  # no token needed for the banner
    WebDriverWait(browser, 30).until(lambda d: "Token field" in d.find_element(By.ID, "card").text)
    field = browser.find_element(By.ID, "token")
    field.send_keys("s3cret")
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)
    WebDriverWait(browser, 30).until(lambda d: "evaluation: test" in d.find_element(By.ID, "card").text)
    browser.find_element(By.ID, "files").send_keys(str(image))
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result .prob")
                                     or d.find_elements(By.CSS_SELECTOR, ".result .error"))
    assert not browser.find_elements(By.CSS_SELECTOR, ".result .error")
    text = browser.find_element(By.CSS_SELECTOR, ".result .prob").text  # "P(pneumonia) = 0.875 < threshold 0.897"
    shown, side, threshold = float(text.split()[2]), text.split()[3], float(text.split()[-1])
    record = load_model(out / "scratch" / "best.pt").predict(str(image))[0]
    assert shown == pytest.approx(record["prob_pneumonia"], abs=5e-4)
    assert threshold == pytest.approx(record["threshold"], abs=5e-4) and side == ("\u2265" if shown >= threshold else "<")
    assert browser.find_element(By.CSS_SELECTOR, ".result .label").text == record["label"]
    assert not browser.find_elements(By.CSS_SELECTOR, ".result .warn")  # not trained on the bundled sample
    assert browser.find_element(By.CSS_SELECTOR, ".result .name").text == image.name
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(
        "const c = document.querySelector('.result img.cam'); return c.complete && c.naturalWidth > 0;"))
    browser.execute_script("const s = document.querySelector('.result input.opacity'); s.value = 80; "
                           "s.dispatchEvent(new Event('input'));")
    assert browser.execute_script("return document.querySelector('.result img.cam').style.opacity") == "0.8"
    with Image.open(image) as im:
        width, height = im.size
    WebDriverWait(browser, 10).until(lambda d: "shown at the aspect" in d.find_element(By.CSS_SELECTOR, ".result .seen").text)
    assert f"({width} x {height} px); the model sees the whole image resized to 64 x 64 px" in browser.find_element(
        By.CSS_SELECTOR, ".result .seen").text  # the study fixture trains at 64 px
    shown = browser.execute_script("const c = document.querySelector('.result img.cam'); return [c.width, c.height];")
    assert shown == [224, round(224 * height / width)] and width != height  # the file's aspect, not a square
    bar = browser.execute_script("return getComputedStyle(document.querySelector('.result .scale .bar')).backgroundImage")
    assert bar.startswith("linear-gradient(to right, rgb(0, 0, 127)") and bar.endswith("rgb(127, 0, 0))")  # jet
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    shot = out.parent / "serve_screenshot.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
