"""Monitoring a served model: `cxr serve` logs every prediction into SQLite (the upload's sha256,
never its pixels), `cxr monitor DB` and `/monitor` cut the log into windows with the flagged share,
the shift test, the label-free estimate and an alarm, and a killed server loses no committed row."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.cli import main
from cxr.deploy.monitor import (
    COLUMNS,
    Baseline,
    ModelId,
    PredictionLog,
    default_log_path,
    format_monitor,
    model_id,
    monitor,
    read_log,
    summarise,
)
from cxr.errors import CxrError
from cxr.training.checkpoint import load_checkpoint, save_checkpoint
from cxr.trust.estimate import calibrate

from .helpers import free_port, live_servers, make_run_dir, make_trusted_run

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cxr.deploy.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def trusted(tmp_path_factory) -> Path:
    """best.pt of a run whose checkpoint carries the out-of-distribution statistics."""
    return make_trusted_run(tmp_path_factory.mktemp("monitor") / "run") / "best.pt"


def png_bytes(seed: int, size: int = 48) -> bytes:
    """A noise PNG (unlike the model's fitted images: flagged)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def rows(db: Path) -> list[dict]:
    with sqlite3.connect(db) as con:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM predictions ORDER BY id")]


# --- the log --------------------------------------------------------------------------------------

def test_every_prediction_is_one_row_with_the_uploads_sha256_and_never_its_pixels(trusted, tmp_path):
    db = tmp_path / "log.db"
    uploads = [png_bytes(k) for k in range(3)]
    with TestClient(create_app(trusted, log_db=db)) as client:
        body = client.post("/predict", files=[("files", (f"patient-{k}.png", b, "image/png"))
                                              for k, b in enumerate(uploads)]
                           + [("files", ("broken.png", b"\x89PNG\r\n\x1a\nnot an image", "image/png"))]).json()
    logged = rows(db)
    assert len(logged) == 4
    served = model_id(trusted)
    for row, record, content in zip(logged, body["predictions"], uploads):
        assert row["input_sha256"] == hashlib.sha256(content).hexdigest()
        assert row["probability"] == pytest.approx(record["prob_pneumonia"])
        assert json.loads(row["probabilities"]) == pytest.approx(record["probabilities"])
        assert row["decision"] == record["label"] and row["ood_score"] == pytest.approx(record["ood_score"])
        assert row["in_distribution"] == int(record["in_distribution"]) and row["error"] is None
        assert (row["model"], row["model_digest"], row["site"]) == (served.path, served.digest, None)
        assert row["threshold"] == 0.5 and row["time"].endswith("+00:00")
    assert served.digest == hashlib.sha256(trusted.read_bytes()).hexdigest()[:12]
    broken = logged[3]
    assert broken["error"] and broken["probability"] is None
    assert broken["input_sha256"] == hashlib.sha256(b"\x89PNG\r\n\x1a\nnot an image").hexdigest()
    # never the pixels, nor the file's name: no column holds either, and the file's bytes say so
    assert set(logged[0]) == {"id", *COLUMNS}
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("log.db*"))
    assert b"patient-" not in raw and all(b[60:120] not in raw for b in uploads)
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_serve_logs_into_the_run_folder_unless_told_otherwise(trusted, monkeypatch, tmp_path):
    import cxr.deploy.serve as serve_module

    seen = []
    monkeypatch.setattr(serve_module, "serve", lambda *a, **k: seen.append(k["log_db"]))
    for extra in ([], ["--log-db", str(tmp_path / "x.db")], ["--no-log"]):
        assert main(["serve", str(trusted), *extra]) == 0
    assert seen == [trusted.parent / "predictions.db", tmp_path / "x.db", None]
    assert default_log_path(trusted) == trusted.parent / "predictions.db"
    with pytest.raises(SystemExit):
        main(["serve", str(trusted), "--no-log", "--log-db", "y.db"])


def test_an_unwritable_log_is_refused_in_one_line(trusted, tmp_path):
    with pytest.raises(CxrError, match="cannot write the prediction log there.*--no-log"):
        create_app(trusted, log_db=tmp_path / "missing" / "folder" / "log.db")


# --- windows and alarms on a synthetic log --------------------------------------------------------

def synthetic(rng: np.random.Generator, n: int, shifted: bool = False):
    """Labels, (n, 2) probabilities and out-of-distribution scores: confident and far when shifted."""
    y = rng.integers(0, 2, n)
    p = rng.beta(20, 1, n) if shifted else np.where(y == 1, rng.beta(5, 2, n), rng.beta(2, 5, n))
    scores = rng.normal(4.0 if shifted else 0.0, 1.0, n)
    return y, np.stack([1 - p, p], 1), scores


@pytest.fixture
def synthetic_log(tmp_path):
    """A log of 100 predictions like validation, then 50 shifted ones, and the baseline."""
    rng = np.random.default_rng(0)
    y, ref_probs, ref_scores = synthetic(rng, 400)
    threshold = float(np.quantile(ref_scores, 0.95))
    baseline = Baseline(ref_probs, ref_scores, calibrate(ref_probs, y, 0.5), 0.5)
    log = PredictionLog(tmp_path / "log.db", ModelId("/runs/x/best.pt", "abc123def456"))
    for shifted, n in ((False, 100), (True, 50)):
        _, probs, scores = synthetic(rng, n, shifted)
        records = [{"probabilities": {"NORMAL": q[0], "PNEUMONIA": q[1]}, "label": "PNEUMONIA" if q[1] >= 0.5
                    else "NORMAL", "ood_score": s, "in_distribution": bool(s <= threshold)} for q, s in zip(probs, scores)]
        for start in range(0, n, 10):  # ten predictions a request
            log.write(records[start:start + 10], [f"{k:064x}" for k in range(start, start + 10)], 0.5, 1.0)
    log.close()
    return tmp_path / "log.db", baseline


def test_windows_flag_the_shifted_one_and_only_it(synthetic_log):
    db, baseline = synthetic_log
    logged = read_log(db)
    assert logged.model.digest == "abc123def456" and len(logged.ids) == 150 and logged.errors == 0
    report = summarise(logged, baseline, size=50)
    calm, _, shifted = report["windows"]
    assert [w["alarm"] for w in report["windows"]] == [False, False, True]
    assert calm["flagged_share"] <= 0.2 and calm["shift"]["p_value"] > 0.01 and calm["estimate"]["trusted"]
    assert shifted["flagged_share"] > 0.9 and shifted["shift"]["shifted"] and not shifted["estimate"]["trusted"]
    assert any("shift test fires" in r for r in shifted["reasons"]) and any("flagged" in r for r in shifted["reasons"])
    assert report["alarms"] == 1 and report["verdict"].startswith("ALARM: 1 of the last 3 windows depart; window 2")
    assert (calm["first_id"], calm["last_id"], shifted["first_id"], shifted["last_id"]) == (1, 50, 101, 150)


def test_windows_stay_put_and_a_short_newest_one_is_not_judged(synthetic_log):
    db, baseline = synthetic_log
    logged = read_log(db)
    report = summarise(logged, baseline, size=40, last=2)
    assert report["n_windows"] == 4 and [w["index"] for w in report["windows"]] == [2, 3]
    tail = read_log(db, size=40, last=2)  # only the rows of the windows shown are read
    assert (tail.total, tail.offset, len(tail.ids)) == (150, 80, 70)
    assert summarise(tail, baseline, size=40, last=2)["windows"] == report["windows"]
    newest = report["windows"][-1]
    assert newest["n"] == 30 and not newest["full"] and newest["judged"]  # 30 >= 20: judged though partial
    tiny = summarise(logged, baseline, size=140)["windows"][-1]
    assert tiny["n"] == 10 and not tiny["judged"] and not tiny["alarm"] and "too few" in tiny["reasons"][0]
    # without a baseline (no checkpoint): the flagged share still raises the alarm
    bare = summarise(logged, None, size=50)
    assert [w["alarm"] for w in bare["windows"]] == [False, False, True]
    assert all(w["shift"] is None and w["estimate"] is None for w in bare["windows"])
    gone = monitor(db, 50)  # the checkpoint the log names is not on this machine
    assert len(gone["notes"]) == 1 and "named in the log is gone" in gone["notes"][0]
    assert [w["alarm"] for w in gone["windows"]] == [False, False, True]


def test_an_empty_missing_or_foreign_database_is_said_in_one_line(tmp_path, capsys):
    PredictionLog(tmp_path / "empty.db", ModelId("x", "y")).close()
    assert main(["monitor", str(tmp_path / "empty.db")]) == 0
    assert capsys.readouterr().out.strip() == "no predictions logged yet"
    assert main(["monitor", str(tmp_path / "none.db")]) == 2
    assert "no prediction log here" in capsys.readouterr().err
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.close()
    assert main(["monitor", str(tmp_path / "other.db")]) == 2
    err = capsys.readouterr().err
    assert "not a prediction log of cxr serve" in err and len(err.strip().splitlines()) == 1


# --- the command and the route --------------------------------------------------------------------

@pytest.fixture(scope="module")
def served_log(trusted, tmp_path_factory) -> Path:
    """A log of 24 noise images predicted by the trusted model (every one flagged) and 2 unreadable files."""
    db = tmp_path_factory.mktemp("served") / "predictions.db"
    with TestClient(create_app(trusted, log_db=db)) as client:
        for k in range(0, 24, 12):
            files = [("files", (f"{j}.png", png_bytes(j), "image/png")) for j in range(k, k + 12)]
            assert client.post("/predict", files=files + [("files", ("b.png", b"\x89PNG\r\n\x1a\n", "image/png"))]
                               ).status_code == 200
    return db


def test_cxr_monitor_prints_the_windows_and_exits_1_on_an_alarm(served_log, trusted, capsys):
    assert main(["monitor", str(served_log), "--window", "10"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"24 predictions of {trusted.resolve()} (digest {model_id(trusted).digest}), "
                             "2 unreadable files; windows of 10, the last 3 of 3 shown")
    header, first, second, third = out[1:5]
    assert header.split()[:6] == ["window", "rows", "n", "positive", "flagged", "shift"]
    assert "100%" in first and "ALARM: shift, flagged > 20%" in first and "ALARM" in second
    assert "too few predictions to judge yet (4 of 10)" in third
    assert out[-1].startswith("ALARM: 2 of the last 3 windows depart; window 1:")
    assert main(["monitor", str(served_log), "--window", "10", "--json", "--last", "1"]) == 0  # the one shown is calm
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 24 and [w["index"] for w in report["windows"]] == [2]
    with pytest.raises(SystemExit):
        main(["monitor", str(served_log), "--window", "4"])
    assert "at least 5" in capsys.readouterr().err


def test_a_checkpoint_without_statistics_says_so_and_shows_the_rest(tmp_path, capsys):
    old = make_run_dir(tmp_path / "old") / "best.pt"
    with TestClient(create_app(old, log_db=tmp_path / "p.db")) as client:
        for k in range(6):
            client.post("/predict", files=[("files", (f"{k}.png", png_bytes(k), "image/png"))])
        page = client.get("/monitor.json?window=5").json()
    assert main(["monitor", str(tmp_path / "p.db"), "--window", "5"]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "holds no out-of-distribution statistics" in notes[0]
    assert "6 predictions of" in out and out.strip().endswith("no alarm in the last 2 window(s)")
    assert page["n"] == 6 and "holds no out-of-distribution statistics" in page["notes"][0]
    assert page["windows"][0]["flagged_share"] is None and page["windows"][0]["positive_share"] is not None


def test_a_changed_checkpoint_is_not_taken_for_the_one_that_answered(served_log, trusted, tmp_path):
    moved = tmp_path / "copy.pt"
    moved.write_bytes(trusted.read_bytes() + b"")  # the same bytes elsewhere: the same model
    assert monitor(served_log, 10, moved)["notes"] == []
    other = tmp_path / "other.pt"  # the same statistics in a checkpoint saved again: another digest
    save_checkpoint(other, {**load_checkpoint(trusted), "epoch": 99})
    report = monitor(served_log, 10, other)
    assert "is not the checkpoint that answered" in report["notes"][0] and report["windows"][0]["shift"]


def test_the_monitor_route_reads_the_servers_own_log(trusted, served_log, tmp_path):
    with TestClient(create_app(trusted, log_db=served_log, token="t")) as client:
        assert client.get("/monitor.json").status_code == 401
        body = client.get("/monitor.json?window=12", headers={"Authorization": "Bearer t"}).json()
        page = client.get("/monitor")
    assert body["logging"] and body["n"] == 24 and body["alarms"] == 2 and len(body["windows"]) == 2
    assert page.status_code == 200 and 'id="windows"' in page.text and "const TOKEN_REQUIRED = true" in page.text
    with TestClient(create_app(trusted)) as client:
        body = client.get("/monitor.json").json()
    assert not body["logging"] and "keeps no prediction log" in body["notes"][0]
    assert format_monitor(body).endswith("no predictions logged yet")


# --- a real server --------------------------------------------------------------------------------

@pytest.fixture
def live_server():
    """A real uvicorn server in a thread, serving the checkpoint the test names."""
    with live_servers() as start:
        yield lambda checkpoint, log_db: start(create_app(checkpoint, log_db=log_db))


def test_the_monitor_page_in_a_browser_shows_the_alarm(browser, trusted, tmp_path, live_server):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = live_server(trusted, tmp_path / "p.db")
    files = [("files", (f"{k}.png", png_bytes(k), "image/png")) for k in range(12)]
    assert httpx.post(url + "/predict", files=files, timeout=120).status_code == 200
    browser.get_log("browser")  # drained: only this page's messages count below
    browser.get(url + "/monitor")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "verdict").text.startswith("no alarm"))
    box = browser.find_element(By.ID, "window")  # 12 of 50: too few to judge; windows of 5 are judged
    box.clear()
    box.send_keys("5")
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", box)
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "verdict").text.startswith("ALARM"))
    assert browser.find_element(By.ID, "verdict").get_attribute("class") == "alarm"
    table = browser.find_elements(By.CSS_SELECTOR, "#windows tbody tr")
    assert [r.get_attribute("class") for r in table] == ["alarm", "alarm", "pending"]
    assert "100%" in table[0].text and "shift test fires" in table[0].text
    assert "12 predictions of" in browser.find_element(By.ID, "about").text
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    browser.get("about:blank")  # the page polls its server, which stops with this test
    assert errors == []


@pytest.mark.slow
def test_the_sqlite_log_survives_a_server_kill(trusted, tmp_path):
    """`cxr serve` in a process, ten answered requests, SIGKILL: every answered request's rows are there."""
    import httpx

    db, port = tmp_path / "p.db", free_port()
    server = subprocess.Popen([sys.executable, "-m", "cxr", "serve", str(trusted), "--port", str(port),
                               "--log-db", str(db), "--device", "cpu"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
            assert server.poll() is None, server.stdout.read()
        sent = []
        for k in range(10):
            uploads = [png_bytes(100 + 2 * k + j) for j in range(2)]
            r = httpx.post(url + "/predict", files=[("files", (f"{j}.png", b, "image/png")) for j, b in
                                                    enumerate(uploads)], timeout=120)
            assert r.status_code == 200, r.text
            sent += uploads
    finally:
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    assert server.returncode == -signal.SIGKILL
    assert [r["input_sha256"] for r in rows(db)] == [hashlib.sha256(b).hexdigest() for b in sent]
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert read_log(db).probs.shape == (20, 2)  # the monitor reads it as the server left it
