"""`cxr serve`: a web page and a REST API over one trained checkpoint (FastAPI on uvicorn).

HTTP only: every prediction goes through `predict.Model`, so the page, the API and `cxr predict`
give the same numbers. Routes:

    GET  /          the page: drop JPEG, PNG or DICOM files, see P(pneumonia), the label and the CAM
    POST /predict   multipart `files` (one or more; ?cam=true adds the CAM as base64 PNGs)
    GET  /model     the model card (training data, metrics with CIs, operating point, versions)
    GET  /health    liveness (open even with a token, for probes: it says only "ok")
    GET  /monitor   the prediction log in windows: flagged share, shift test, estimated accuracy, alarms
    GET  /monitor.json  the same as JSON (?window=N&last=K)
    GET  /docs      OpenAPI documentation (FastAPI's)

Safety: the model is loaded once with `weights_only=True`; uploads are streamed into a
temporary folder that is removed after each request, and never kept; a file over the size limit
is answered 413, an unsupported type 415, an unreadable, empty, over-64-megapixel or
pixel-less DICOM file 400, each with the file and the reason (never a 500). With `log_db`, every
prediction is logged into SQLite (`monitor.py`: the uploaded bytes' sha256, never the pixels),
committed before the answer leaves. With `token`, every
API call but /health needs `Authorization: Bearer TOKEN` (the page has a field for it). Forward passes are serialised by a lock (decoding
is not): on a CPU, concurrent passes only oversubscribe the cores.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import hmac
import html
import io
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image

from .. import __version__
from ..errors import CxrError
from ..reporting import card
from ..reporting.card import describe_adaptation
from ..training.checkpoint import for_site, load_checkpoint
from ..training.operating_point import OperatingPoint
from .monitor import DEFAULT_LAST, DEFAULT_WINDOW, NO_STATISTICS, Baseline, PredictionLog, model_id, read_log, summarise
from .predict import SUPPORTED, Model

INTENDED_USE = (f"{card.INTENDED_USE} Trained on pediatric chest radiographs from one hospital "
                "(Kermany et al. 2018).")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_FILES = 16           # files per request
CHUNK = 1 << 20
MAGIC = ((b"\xff\xd8\xff", ".jpeg"), (b"\x89PNG\r\n\x1a\n", ".png"))
# The page (HTML, CSS and script in one file, so it can be read and edited as a page)
PAGE = (Path(__file__).resolve().parent / "page.html").read_text(encoding="utf-8")
MONITOR_PAGE = (Path(__file__).resolve().parent / "monitor.html").read_text(encoding="utf-8")


def _suffix(name: str, head: bytes) -> str | None:
    """The file's type: its extension when supported, else its first bytes (JPEG, PNG, DICOM)."""
    suffix = Path(name).suffix.lower()
    if suffix in SUPPORTED:
        return suffix
    for magic, ext in MAGIC:
        if head.startswith(magic):
            return ext
    return ".dcm" if head[128:132] == b"DICM" else None


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def heatmap(cam: np.ndarray) -> np.ndarray:
    """(S, S) map in [0, 1] -> (S, S, 3) uint8 in matplotlib's jet, as the report's overlays."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255).astype(np.uint8)


def colour_scale(stops: int = 11) -> str:
    """The CSS gradient of the CAM's colours (jet), low to high, for the page's scale bar."""
    colours = heatmap(np.linspace(0, 1, stops)[None])[0]
    return "linear-gradient(to right, " + ", ".join(f"rgb({r}, {g}, {b})" for r, g, b in colours) + ")"


def _fitted_at(adaptation: dict | None) -> str | None:
    """Where the model was fitted, on what, and the k-fold estimate there (card.describe_adaptation)."""
    if not adaptation:
        return None
    return describe_adaptation(adaptation)


def _metrics_summary(m: dict) -> dict:
    if "multiclass" in m:  # more than two classes: overall accuracy and macro ROC AUC (per class: the report)
        overall = m["multiclass"]["overall"]
        return {"n": m.get("n"), "threshold": None, "set": m.get("set", {}).get("name", "test"),
                "folder": m.get("set", {}).get("folder"), "accuracy": overall["accuracy"], "sensitivity": None,
                "specificity": None, "roc_auc": overall["macro_roc_auc"]}
    block = m.get("at_threshold", {}).get("operating", {})
    keep = ("accuracy", "sensitivity", "specificity", "roc_auc")
    return {"n": m.get("n"), "threshold": m.get("threshold"), "set": m.get("set", {}).get("name", "test"),
            "folder": m.get("set", {}).get("folder"), **{k: block.get(k) for k in keep}}


def model_card(checkpoint: dict, path: Path) -> dict:
    """What a user of the served model should know, from the checkpoint and its run folder."""
    run = Path(path).parent
    config_file = run / "config.json"
    run_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    evaluations = {}
    for f in sorted(run.glob("metrics*.json")):
        try:
            m = json.loads(f.read_text())
        except ValueError:
            continue
        evaluations[f.stem.removeprefix("metrics").lstrip("_") or "test"] = _metrics_summary(m)
    op = OperatingPoint.from_dict(checkpoint.get("operating_point"))
    return {
        "task": checkpoint["config"]["task"], "checkpoint": str(Path(path).resolve()), "epoch": checkpoint["epoch"],
        "classes": list(checkpoint["classes"]), "input_size": checkpoint["config"]["image_size"],
        "intensity": checkpoint["config"].get("intensity", "none"),
        "threshold": float(checkpoint.get("threshold", 0.5)) if len(checkpoint["classes"]) == 2 else None, "temperature": float(checkpoint.get("temperature", 1.0)),
        "threshold_rule": op.rule or "stored", "threshold_chosen_on": op.chosen_on or "validation",
        "threshold_warning": card.few_validation_warning(op),
        "adaptation": checkpoint.get("adaptation"),
        "fitted_at": _fitted_at(checkpoint.get("adaptation")),
        "training_data": {"folder": run_config.get("data"), "summary": run_config.get("data_summary"),
                          "bundled_sample": run_config.get("sample", False),
                          **({"sites": checkpoint["sites"]} if checkpoint.get("sites") else {})},
        "evaluations": evaluations,
        "evaluation_note": "dev-test ('test') is carved from the training images: expect lower numbers elsewhere; "
                           "intervals are 95% bootstrap intervals over patients",
        "versions": {**checkpoint.get("versions", {}), "server_cxr": __version__},
        "intended_use": INTENDED_USE,
    }


def create_app(checkpoint_path: Path | str, token: str | None = None, max_upload_mb: float = 20,
               device: str = "cpu", serialise: bool = True, log=None, site: str | None = None,
               log_db: Path | str | None = None) -> FastAPI:
    """The app serving one checkpoint (loaded here, once). `serialise=False` lets forward passes
    overlap (measured slower on a 2-core CPU: benchmarks/serve_load.py, README). `log`, when
    given, gets one line per request (method, path, status, milliseconds). `log_db`: the SQLite
    prediction log to append to (None: nothing logged; /monitor says so)."""
    checkpoint_path = Path(checkpoint_path)
    checkpoint = for_site(load_checkpoint(checkpoint_path), site)  # `site`: that site's operating point
    model = Model(checkpoint, device)
    card = model_card(checkpoint, checkpoint_path)
    card["out_of_distribution"] = model.describe_trust()
    served = model_id(checkpoint_path, site)
    predictions_log = None if log_db is None else PredictionLog(log_db, served)
    baseline = Baseline.of(model.trust, model.threshold, model.temperature)
    max_bytes = int(max_upload_mb * 1e6)
    lock = threading.Lock() if serialise else contextlib.nullcontext()
    scale = colour_scale()
    app = FastAPI(title="cxr", version=__version__,
                  description=f"Pneumonia vs normal on chest X-rays with ResNet-18 ({card['task']}). {INTENDED_USE}")

    def authorised(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong token: send the header 'Authorization: Bearer TOKEN'")

    def receive(upload: UploadFile, folder: Path, k: int) -> tuple[Path, str]:
        """Stream one upload into `folder` (size-checked); its type from its name or first bytes.
        Returns the file and the sha256 of its bytes (what the prediction log keeps of it)."""
        name = upload.filename or f"file {k}"
        head = upload.file.read(132)
        sha = hashlib.sha256(head)
        suffix = _suffix(name, head)
        if suffix is None:
            raise HTTPException(415, f"{name}: not a JPEG, PNG or DICOM file")
        target = folder / f"{k}{suffix}"  # the client's name never becomes a path
        size = len(head)
        with open(target, "wb") as out:
            out.write(head)
            for block in iter(lambda: upload.file.read(CHUNK), b""):
                size += len(block)
                if size > max_bytes:
                    raise HTTPException(413, f"{name}: larger than the {max_upload_mb:g} MB limit per file")
                out.write(block)
                sha.update(block)
        if size == 0:
            raise HTTPException(400, f"{name}: empty file")
        return target, sha.hexdigest()

    @app.middleware("http")
    async def limit_request_size(request: Request, call_next):
        start = time.perf_counter()
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_bytes * MAX_FILES + CHUNK:
            response = JSONResponse({"detail": f"request larger than {MAX_FILES} files of {max_upload_mb:g} MB"}, 413)
        else:
            response = await call_next(request)
        if log is not None:
            log(f"{request.method} {request.url.path} {response.status_code} "
                f"{1000 * (time.perf_counter() - start):.0f} ms")
        return response

    @app.get("/health")
    def health() -> dict:  # open to liveness probes; says what it serves only to those who may ask
        return {"status": "ok"} if token else {"status": "ok", "task": card["task"], "checkpoint": card["checkpoint"]}

    @app.get("/model", dependencies=[Depends(authorised)])
    def model_info() -> dict:
        return card

    @app.post("/predict", dependencies=[Depends(authorised)])
    def predict(files: list[UploadFile], cam: bool = Query(False, description="add the CAM of the predicted "
                                                                               "class as base64 PNGs")) -> dict:
        """The records of `cxr predict --output json`. A bad file answers 4xx naming it; nothing is
        kept on disk."""
        if not 1 <= len(files) <= MAX_FILES:
            raise HTTPException(400, f"send between 1 and {MAX_FILES} files in the field 'files'")
        with tempfile.TemporaryDirectory(prefix="cxr-serve-") as tmp:
            decoded = []  # an image, or why the file cannot be read (its record says so; the others are predicted)
            hashes: list[str | None] = [None] * len(files)
            for k, upload in enumerate(files):
                try:
                    target, hashes[k] = receive(upload, Path(tmp), k)
                    decoded.append(model.decode(target))
                except HTTPException as e:
                    if len(files) == 1:
                        raise
                    decoded.append(str(e.detail).removeprefix(f"{upload.filename or f'file {k}'}: "))
        good = [k for k, d in enumerate(decoded) if not isinstance(d, str)]
        if not good:
            k = 0
            raise HTTPException(400, f"{files[k].filename or f'file {k}'}: {decoded[k]}")
        with lock:
            probs, maps, scores = model.predict_arrays([decoded[k] for k in good], "cam" if cam else None)
        records = []
        threshold = model.threshold if len(model.classes) == 2 else None
        row = {k: j for j, k in enumerate(good)}
        for k, upload in enumerate(files):
            name = upload.filename or f"file {k}"
            if k not in row:
                records.append({"path": name, **{key: None for key in model.keys}, "label": None,
                                "threshold": threshold, "probabilities": None, "ood_score": None,
                                "in_distribution": None, "warning": None, "error": decoded[k]})
                continue
            j = row[k]
            record = model.fill({"path": name, "threshold": threshold, "error": None}, probs[j],
                                None if scores is None else scores[j])
            if cam:
                record["image_png"] = _png(decoded[k])
                record["cam_png"] = _png(heatmap(maps[j]))
            records.append(record)
        warnings = model.warnings()
        if predictions_log is not None:  # committed before the answer leaves
            try:
                predictions_log.write(records, hashes, threshold, model.temperature)
            except CxrError as e:  # the answer still goes out, saying it was not logged
                warnings.append(str(e))
                if log is not None:
                    log(f"warning: {e}")
        return {"checkpoint_task": model.task, "classes": list(model.classes), "threshold": threshold, "temperature": model.temperature,
                "operating_point": model.describe_operating_point(), "adaptation": model.adaptation,
                "out_of_distribution": model.describe_trust(), "warnings": warnings,
                "predictions": records}

    @app.get("/monitor.json", dependencies=[Depends(authorised)])
    def monitor_json(window: int = Query(DEFAULT_WINDOW, ge=5, le=10000, description="predictions per window"),
                     last: int = Query(DEFAULT_LAST, ge=1, le=1000, description="windows shown, the latest last")
                     ) -> dict:
        """The prediction log of this model, in windows (`cxr monitor DB` reads the same)."""
        if predictions_log is None:
            return {**summarise(None, None, window, last, ("this server keeps no prediction log (--no-log)",)),
                    "logging": False}
        notes = () if model.trust else (f"the checkpoint {NO_STATISTICS}",)
        return {**summarise(read_log(predictions_log.path, served, window, last), baseline, window, last, notes),
                "logging": True, "db": str(predictions_log.path.resolve())}

    @app.get("/monitor", response_class=HTMLResponse)
    def monitor_page() -> str:
        return MONITOR_PAGE.replace("__TITLE__", html.escape(f"cxr monitor: {card['task']}")).replace(
            "__TOKEN__", "true" if token else "false").replace("__WINDOW__", str(DEFAULT_WINDOW)).replace(
            "__USE__", html.escape(INTENDED_USE))

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("__TITLE__", html.escape(f"cxr: {card['task']}")).replace(
            "__TOKEN__", "true" if token else "false").replace("__MAX__", f"{max_upload_mb:g}").replace(
            "__USE__", html.escape(INTENDED_USE)).replace("__SCALE__", scale)

    app.state.model, app.state.card, app.state.predictions_log = model, card, predictions_log
    return app


def serve(checkpoint_path: Path, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          max_upload_mb: float = 20, device: str = "cpu", serialise: bool = True, site: str | None = None,
          log_db: Path | None = None) -> None:
    import uvicorn

    if host not in LOOPBACK and not token:
        raise CxrError(f"--host {host} exposes the model beyond this machine: pass --token T as well (clients then "
                       "send 'Authorization: Bearer T')")
    check_port(host, port)
    app = create_app(checkpoint_path, token, max_upload_mb, device, serialise, log=lambda line: print(line, flush=True),
                     site=site, log_db=log_db)
    print(f"serving {checkpoint_path} ({app.state.card['task']}) on http://{host}:{port}/  (API docs: /docs; "
          "one line per request below; Ctrl-C stops)", flush=True)
    print(f"logging every prediction to {log_db} (never the pixels); windows at http://{host}:{port}/monitor"
          if log_db else "prediction log off (--no-log): /monitor has nothing to show", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def check_port(host: str, port: int) -> None:
    """Refuse, in one line, a port another program holds (before anything says it is serving)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise CxrError(f"port {port} on {host} is in use (another cxr serve?): pass --port N with a free "
                               "port, e.g. --port 8001") from None
            raise CxrError(f"cannot listen on {host}:{port}: {e.strerror}; check --host and --port") from None
