"""What several test modules build: image files, tiny data sets, fake run folders, the CLI in a
subprocess. Test modules import from here, never from each other or from conftest.py (which holds
the fixtures, some of them built on these factories)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "chest_xray"
OFFICIAL_HALF = SHARED_DATA.parent / "official_test_half"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SIZE = 32  # the image size of the fake runs and site images below
HISTORY = "epoch,train_loss,val_loss,seconds\n1,0.7,0.7,1.0\n"  # one epoch, as `cxr train` writes it


# --- processes ------------------------------------------------------------------------------------

def cxr(*args, cwd=None) -> subprocess.CompletedProcess:
    """`python -m cxr ARGS` in a subprocess, as a user runs it (a test that calls it is `slow`)."""
    return subprocess.run([sys.executable, "-m", "cxr", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- files ----------------------------------------------------------------------------------------

def read_history(run: Path) -> list[dict]:
    """RUN/history.csv's rows, as strings."""
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_png(path: Path, seed: int, size: int = 40) -> None:
    """A uniform-noise grey PNG."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(path)


def write_image(path: Path, level: int, seed: int) -> None:
    """A SIZE x SIZE noise image around a mean grey `level`, so that two classes differ a little."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(rng.normal(level, 40, (SIZE, SIZE)), 0, 255).astype(np.uint8), mode="L").save(path)


def write_dicom(path, pixels, photometric="MONOCHROME2", bits=8, slope=None, intercept=None, window=None):
    """A single-frame DICOM of `pixels` (uint8 or uint16) with the given header fields."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


# --- data sets ------------------------------------------------------------------------------------

def make_tiny_data(root: Path, n_test: int = 3) -> Path:
    """ROOT/{train,test}/{NORMAL,PNEUMONIA}: 8 train and `n_test` test noise PNGs per class, named
    like the real files (for module-scoped fixtures, which cannot use `tiny_data`)."""
    k = 0
    for split, n in (("train", 8), ("test", n_test)):
        for i in range(n):
            pid = 100 * (split == "test") + i
            write_png(root / split / "NORMAL" / f"IM-{pid:04d}-0001.png", k := k + 1)
            write_png(root / split / "PNEUMONIA" / f"person{pid}_bacteria_{k}.png", k := k + 1)
    return root


def make_site(root: Path, per_class: int = 12, labelled: bool = True) -> Path:
    """A site's images named like the data set's (two images for some patients), NORMAL darker than
    PNEUMONIA; without classes (one flat folder) when not `labelled`."""
    for i in range(per_class):
        normal = f"IM-{i // 2:04d}-{i % 2 + 1:04d}.png"
        pneumonia = f"person{i // 2}_bacteria_{i}.png"
        write_image(root / ("NORMAL" if labelled else "") / normal, 90, i)
        write_image(root / ("PNEUMONIA" if labelled else "") / pneumonia, 150, 1000 + i)
    return root


def fake_images(n, size=48, seed=0):
    """`n` uint8 images (N, 1, size, size) and labels 0, 1, 0, ...; class 1 has a darker band to learn."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 2
    images[labels == 1, :, size // 4: size // 2] //= 3  # something learnable
    return images, labels


# --- run folders ----------------------------------------------------------------------------------

def make_run_dir(run: Path, *, task: str = "scratch", image_size: int = SIZE, seed: int | None = 0,
                 epoch: int = 1, val_loss: float = 0.7, threshold: float | None = None, rule: str = "youden",
                 temperature: float | None = None, data: str | Path = "data", run_config: dict | None = None,
                 metrics: dict | None = None, history: str | None = None) -> Path:
    """RUN as `cxr train` leaves it, without training: best.pt of an untrained ResNet-18 (drawn after
    torch.manual_seed(seed) unless seed is None) and config.json naming `data`; with `threshold`, an
    operating point chosen on validation by `rule`; metrics.json and history.csv where given."""
    from cxr.config import make_config
    from cxr.files import write_json
    from cxr.training.checkpoint import make_checkpoint, save_checkpoint
    from cxr.training.model import build_model

    if seed is not None:
        torch.manual_seed(seed)
    config = make_config(task, image_size=image_size)
    ck = make_checkpoint(build_model(None), config, epoch, {"val_loss": val_loss}, val_loss)
    if threshold is not None:
        ck["threshold"] = threshold
    if temperature is not None:
        ck["temperature"] = temperature
    if threshold is not None:
        ck["operating_point"] = {"rule": rule, "threshold": threshold, "temperature": 1.0, "chosen_on": "validation"}
    save_checkpoint(run / "best.pt", ck)
    write_json(run / "config.json", {"config": config.to_dict(), "data": str(data), **(run_config or {})})
    if metrics is not None:
        write_json(run / "metrics.json", metrics)
    if history is not None:
        (run / "history.csv").write_text(history)
    return run


def make_report_task(run: Path, *, n_val: int | None = 200, rule: str = "youden",
                     command: list[str] | None = None, cxr_version: str | None = None) -> Path:
    """RUN holding only what the report reads (config.json, metrics.json, history.csv and a
    predictions.csv without scores; no checkpoint): a two-class task of 40 test images decided at
    0.4, its operating point chosen by
    `rule` on `n_val` validation images (None: a record from before the count was kept), and the
    command line and cxr version config.json records, where given."""
    from cxr.config import make_config
    from cxr.files import write_csv, write_json

    run.mkdir(parents=True)
    write_json(run / "config.json", {"config": make_config("scratch", image_size=SIZE).to_dict(), "data": "data",
                                     **({"command": command} if command else {}),
                                     **({"versions": {"cxr": cxr_version}} if cxr_version else {})})
    op = {"rule": rule, "threshold": 0.4, "temperature": 1.0, "chosen_on": "validation",
          **({"n_val": n_val} if n_val is not None else {})}
    write_json(run / "metrics.json", {
        "accuracy": 0.75, "n": 40, "roc_auc": 0.8, "threshold": 0.4, "checkpoint": {"epoch": 1},
        "per_class": {"NORMAL": {"accuracy": 0.7, "correct": 14, "total": 20},
                      "PNEUMONIA": {"accuracy": 0.8, "correct": 16, "total": 20}},
        "operating_point": op, "trust": {"available": False}})
    (run / "history.csv").write_text(HISTORY)
    write_csv(run / "predictions.csv", ["path", "true_label", "predicted_label", "prob_pneumonia", "patient"],
              ([f"{i}.png", c, c, f"{0.2 + 0.6 * (c == 'PNEUMONIA')}", f"p{i}"]
               for i, c in enumerate(["NORMAL", "PNEUMONIA"] * 20)))
    return run


def make_image_files(root: Path, names: list[str]) -> list[Path]:
    """ROOT/set/NAME for each name, each file's bytes its own (runs are compared by file content)."""
    out = []
    for i, n in enumerate(names):
        p = root / "set" / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"image {i}".encode())
        out.append(p)
    return out


def make_predictions_run(root: Path, name: str, paths: list[Path], y, prob, threshold: float = 0.5,
                         patients=None) -> Path:
    """ROOT/NAME holding only what `cxr compare` reads: predictions.csv (with a patient column when
    `patients` is given) and metrics.json's threshold."""
    from cxr.files import write_csv, write_json

    run = root / name
    run.mkdir(parents=True)
    cols = ["path", "true_label", "predicted_label", "prob_pneumonia"] + (["patient"] if patients else [])
    write_csv(run / "predictions.csv", cols,
              ([str(p), ["NORMAL", "PNEUMONIA"][t], "", f"{q:.9f}", *([patients[i]] if patients else [])]
               for i, (p, t, q) in enumerate(zip(paths, y, prob))))
    write_json(run / "metrics.json", {"threshold": threshold})
    return run


_TRUSTED: dict[tuple, Path] = {}  # one fitted run per setting, copied to every caller (the fit is deterministic)


def make_trusted_run(run: Path, n_images: int = 120, n_val: int = 40, threshold: float = 0.5) -> Path:
    """RUN as `make_run_dir` leaves it (an untrained ResNet-18, SIZE px), its best.pt carrying the
    out-of-distribution statistics fitted on `fake_images`: the first n_images - n_val as training
    images, the rest as validation (the reference the shift check and the monitor compare with).
    Fitted once per setting in a session; later calls copy that run folder."""
    import atexit
    import shutil
    import tempfile

    from cxr.trust.fit import store_trust

    key = (n_images, n_val, threshold)
    if key not in _TRUSTED:
        template = Path(tempfile.mkdtemp(prefix="cxr-trusted-")) / "run"
        atexit.register(shutil.rmtree, template.parent, True)
        make_run_dir(template, threshold=threshold)
        images, labels = fake_images(n_images, size=SIZE)
        train = n_images - n_val
        store_trust(template / "best.pt", images[:train], labels[:train], images[train:], labels[train:], "cpu")
        _TRUSTED[key] = template
    shutil.copytree(_TRUSTED[key], run, dirs_exist_ok=True)
    return run


@contextlib.contextmanager
def live_servers():
    """Real uvicorn servers in threads: `start(app)` serves the app on a free port and returns its
    URL once it answers; every server started is stopped on leaving the block."""
    import threading
    import time

    import uvicorn

    servers = []

    def start(app) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        threading.Thread(target=server.run, daemon=True).start()
        servers.append(server)
        for _ in range(200):
            if server.started:
                return f"http://127.0.0.1:{port}"
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    try:
        yield start
    finally:
        for s in servers:
            s.should_exit = True
