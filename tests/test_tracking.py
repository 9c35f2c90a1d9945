"""`--log tensorboard` / `--log mlflow`: what was written, read back with each library's own
reader (TensorBoard's event accumulator, MLflow's client on a local store and on a real tracking
server on loopback), a server that is not there (a warning, the run completes), and a missing
package (one line naming the extra)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cxr.cli import main

from .helpers import make_tiny_data, read_history

# the readers are imported by the (slow) tests that read: importing mlflow takes about a second, which
# collecting the fast tier would otherwise pay
if importlib.util.find_spec("tensorboard") is None or importlib.util.find_spec("mlflow") is None:
    pytest.skip("the tracking extra is not installed", allow_module_level=True)

ARGS = ["--tasks", "scratch", "--image-size", "32", "--epochs", "2", "--device", "cpu", "--no-cache", "--n", "2"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One `cxr run` logged to both trackers, MLflow into a SQLite store in the test's folder."""
    tmp = tmp_path_factory.mktemp("tracking")
    root = make_tiny_data(tmp / "data")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.chdir(tmp)  # MLflow's SQLite store keeps artefacts in ./mlruns
    try:
        assert main(["run", "--data", str(root), "--out", str(tmp / "out"), "--log", "tensorboard", "--log", "mlflow",
                     *ARGS]) == 0
    finally:
        mp.undo()
    return tmp / "out", uri


@pytest.mark.slow
def test_tensorboard_holds_every_epoch_the_results_the_figures_and_the_hparams(logged):
    out, _ = logged
    run = out / "scratch"
    config = json.loads((run / "config.json").read_text())
    assert config["tracking"]["tensorboard"] == str(run / "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    rows = read_history(run)
    for column in ("train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr", "seconds"):
        logged_values = [(e.step, e.value) for e in events.Scalars(f"epoch/{column}")]
        assert [s for s, _ in logged_values] == [int(r["epoch"]) for r in rows] == [1, 2]
        assert [v for _, v in logged_values] == pytest.approx([float(r[column]) for r in rows], rel=1e-6), column
    metrics = json.loads((run / "metrics.json").read_text())["at_threshold"]["operating"]
    assert events.Scalars("test/accuracy")[0].value == pytest.approx(metrics["accuracy"]["value"], rel=1e-6)
    assert events.Scalars("test/accuracy_ci_low")[0].value == pytest.approx(metrics["accuracy"]["ci"][0], rel=1e-6)
    images = events.Tags()["images"]
    assert {"figures/loss", "figures/confusion", "figures/roc", "figures/cam_normal"} <= set(images)
    assert events.Images("figures/loss")[0].width > 100
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert b"image_size" in hparams["_hparams_/session_start_info"]


@pytest.mark.slow
def test_mlflow_holds_params_every_epoch_the_results_and_the_artefacts(logged):
    out, uri = logged
    run = out / "scratch"
    run_id = json.loads((run / "config.json").read_text())["tracking"]["mlflow"]["run_id"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_run(run_id)
    assert found.info.status == "FINISHED" and found.info.run_name == "scratch"
    assert found.data.params["image_size"] == "32" and found.data.params["lr"] == "0.001"
    assert found.data.tags["cxr.task"] == "scratch" and len(found.data.tags["cxr.data_digest"]) == 16
    rows = read_history(run)
    for column in ("train_loss", "val_loss", "val_auc", "lr"):
        steps = sorted((m.step, m.value) for m in client.get_metric_history(run_id, column))
        assert steps == [(int(r["epoch"]), float(r[column])) for r in rows], column
    metrics = json.loads((run / "metrics.json").read_text())["at_threshold"]["operating"]
    assert found.data.metrics["test_roc_auc"] == metrics["roc_auc"]["value"]
    assert found.data.metrics["test_accuracy_ci_high"] == metrics["accuracy"]["ci"][1]
    artefacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"best.pt", "config.json", "history.csv", "metrics.json", "report.html", "figures"} <= artefacts
    assert "figures/loss.png" in {a.path for a in client.list_artifacts(run_id, "figures")}


@pytest.mark.slow
def test_an_unreachable_tracking_server_stops_nothing(tiny_data, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    start = time.perf_counter()
    assert main(["run", "--data", str(tiny_data), "--out", str(tmp_path / "out"), "--log", "mlflow", *ARGS]) == 0
    assert time.perf_counter() - start < 120
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: --log mlflow")]
    assert len(warnings) == 1 and "the run goes on without it" in warnings[0]
    run = tmp_path / "out" / "scratch"
    assert (run / "best.pt").is_file() and (run / "metrics.json").is_file() and (tmp_path / "out" / "report.html").is_file()
    assert "tracking" not in json.loads((run / "config.json").read_text())


def test_a_missing_tracking_package_is_one_line_naming_the_extra(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now fails as if not installed
    assert main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "out"), "--log", "mlflow",
                 "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'cxr[tracking]'" in err and "--log mlflow" in err
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_real_tracking_server_on_loopback_receives_the_run(tiny_data, tmp_path, monkeypatch):
    if importlib.util.find_spec("mlflow.server") is None or importlib.util.find_spec("flask") is None:
        pytest.skip("the MLflow tracking server needs the full mlflow package (pip install mlflow)")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--default-artifact-root", str(tmp_path / "artefacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                              start_new_session=True)  # its worker processes go down with it (killpg below)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, "the MLflow server did not start"
            time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        assert main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "out"), "--log", "mlflow",
                     "--image-size", "32", "--epochs", "2", "--device", "cpu", "--no-cache", "--task",
                     "scratch"]) == 0
        run = tmp_path / "out" / "scratch"
        record = json.loads((run / "config.json").read_text())["tracking"]["mlflow"]
        assert record["tracking_uri"] == url
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=url)
        values = sorted((m.step, m.value) for m in client.get_metric_history(record["run_id"], "val_loss"))
        assert values == [(int(r["epoch"]), float(r["val_loss"])) for r in read_history(run)]
        assert client.get_run(record["run_id"]).info.status == "FINISHED"
        assert "best.pt" in {a.path for a in client.list_artifacts(record["run_id"])}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_seed_folders_are_named_with_their_task():
    from cxr.reporting.tracking import run_name

    assert run_name(Path("/o/scratch")) == "scratch"
    assert run_name(Path("/o/scratch-robust/seed2")) == "scratch-robust/seed2"
    assert run_name(Path("/o/seeded/task")) == "task"
