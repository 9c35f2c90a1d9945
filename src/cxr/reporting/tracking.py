"""Runs where researchers already look: TensorBoard event files and MLflow runs (`--log`).

The run folder stays the record (history.csv, metrics.json, report.html); a tracker copies it,
as it happens, into the tool the user follows runs in:

- per epoch, every history.csv column, with the epoch as the step;
- once a task is trained (and, with `cxr run`, evaluated): the test and external metrics with
  their 95% intervals, the config (TensorBoard: text and the hparams plugin's table; MLflow:
  params), the key figures as images (TensorBoard) or artefacts (MLflow), and for MLflow best.pt,
  the metrics files and the report.

TensorBoard writes under OUT/<task>/tensorboard/ (or LOG_DIR/<task>/), so `tensorboard --logdir
OUT` shows every task. MLflow follows its own conventions: MLFLOW_TRACKING_URI when set, else
`sqlite:///mlflow.db` in the working directory; experiment MLFLOW_EXPERIMENT_NAME or "cxr"; one
MLflow run per task, its id kept in config.json so that a resumed run logs into the same one.

A tracker never stops a run: the first error it raises (a tracking server that is down or
refuses) prints one warning line and the tracker is dropped; the run folder is complete either
way. Each package is imported only when asked for; `check_trackers` turns a missing one into a
one-line error naming the extra (pip install 'cxr[tracking]').
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..errors import CxrError

TRACKERS = ("tensorboard", "mlflow")
FIGURES = ("loss.png", "confusion.png", "roc.png", "cam_normal.png", "cam_pneumonia.png", "misclassified.png")
RESULT_KEYS = ("accuracy", "sensitivity", "specificity", "roc_auc", "pr_auc", "balanced_accuracy")


def run_name(run_dir: Path) -> str:
    """"scratch", or "scratch/seed1" for a seed's folder of `cxr run --seeds` (OUT/<task>/seed<K>/)."""
    run_dir = Path(run_dir)
    return f"{run_dir.parent.name}/{run_dir.name}" if re.fullmatch(r"seed\d+", run_dir.name) else run_dir.name


def check_trackers(kinds: list[str]) -> None:
    """One line naming the extra when a tracker's package is missing (before anything trains)."""
    needs = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
    for kind in kinds:
        try:
            __import__(needs[kind])
        except ImportError:
            raise CxrError(f"--log {kind} needs the {needs[kind]} package: pip install 'cxr[tracking]'") from None


def data_digest(paths: list[Path]) -> str:
    """A short digest of the training images (names and sizes): two runs on the same data share it."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(f"{p.parent.name}/{p.name}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def flat(config: dict, prefix: str = "") -> dict[str, str | float | int | bool]:
    """A nested config as one level of scalars (lists and None as text)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
    return out


def _multiclass_cells(m: dict) -> dict:
    """A model of more than two classes: its overall cells and each class's one-vs-rest cells."""
    mc = m.get("multiclass")
    if not mc:
        return {}
    return {**mc["overall"], **{f"{c.lower()}_{k}": v for c, cells in mc["per_class"].items()
                                for k, v in cells.items()}}


def results(run_dir: Path) -> dict[str, float]:
    """Final scalars of a run folder: SET/METRIC and SET/METRIC_ci_low/_ci_high at the stored
    threshold, for the test split and every external set evaluated."""
    out = {}
    for path in sorted(Path(run_dir).glob("metrics*.json")):
        m = json.loads(path.read_text())
        name = m.get("set", {}).get("name", "test")
        block = m.get("at_threshold", {}).get("operating") or _multiclass_cells(m)
        for key in (RESULT_KEYS if "at_threshold" in m else block):
            cell = block.get(key)
            if cell and cell.get("value") is not None:
                out[f"{name}/{key}"] = float(cell["value"])
                if cell.get("ci"):
                    out[f"{name}/{key}_ci_low"], out[f"{name}/{key}_ci_high"] = map(float, cell["ci"])
    return out


class TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, log_dir: Path | None, config: dict, tags: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(log_dir) / run_name(run_dir) if log_dir else Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(str(self.dir))
        self.config, self.tags = config, tags

    def epoch(self, row: dict) -> None:
        for key, value in row.items():
            if key != "epoch" and value not in ("", None):
                self.writer.add_scalar(f"epoch/{key}", float(value), int(row["epoch"]))
        self.writer.flush()

    def finish(self, run_dir: Path) -> None:
        from PIL import Image

        final = results(run_dir)
        for key, value in final.items():
            self.writer.add_scalar(key, value, 0)
        self.writer.add_text("config", "```\n" + json.dumps({**self.config, **self.tags}, indent=2) + "\n```")
        for name in FIGURES:
            path = Path(run_dir) / "figures" / name
            if path.is_file():
                with Image.open(path) as im:
                    self.writer.add_image(f"figures/{path.stem}", np.asarray(im.convert("RGB")), 0, dataformats="HWC")
        metrics = {f"hparam/{k}": v for k, v in final.items() if "_ci_" not in k} or {"hparam/none": 0.0}
        self.writer.add_hparams(flat(self.config), metrics, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, log_dir: Path | None, config: dict, tags: dict, run_id: str | None = None):
        # a tracking server that is down should cost seconds, not MLflow's default minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "cxr")
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            run = self.client.create_run(experiment, tags=tags, run_name=run_name(run_dir))
            run_id = run.info.run_id
            params = [Param(k[:250], str(v)[:6000]) for k, v in flat(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=params[start:start + 100])
        self.run_id = run_id

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k.replace("/", "_"), float(v), stamp, step)
                                                    for k, v in values.items()])

    def epoch(self, row: dict) -> None:
        self._metrics({k: v for k, v in row.items() if k != "epoch" and v not in ("", None)}, int(row["epoch"]))

    def finish(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        final = results(run_dir)
        if final:
            self._metrics(final, 0)
        for name in ("best.pt", "config.json", "history.csv", *sorted(p.name for p in run_dir.glob("metrics*.json"))):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if (run_dir / "figures").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "figures"), "figures")
        for name in ("report.html", "report.md"):
            if (run_dir.parent / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir.parent / name))
        self.client.set_terminated(self.run_id)

    def close(self) -> None:
        pass


class Trackers:
    """The trackers of one task; each call is guarded: the first error drops that tracker with
    one warning line, and the run goes on."""

    def __init__(self, log: Callable[[str], None] = print):
        self.active: list = []
        self.log = log

    def _warn(self, kind: str, e: Exception) -> None:
        first = str(e).splitlines()[0][:300] if str(e) else ""
        self.log(f"warning: --log {kind}: {type(e).__name__}: {first}; the run goes on without it (its folder is "
                 "complete)")

    def guard(self, tracker, what: str, *args) -> None:
        try:
            getattr(tracker, what)(*args)
        except Exception as e:  # noqa: BLE001 - a tracker must never stop a run
            self._warn(tracker.name, e)
            self.active.remove(tracker)

    def open(self, kind: str, *args, **kwargs) -> None:
        try:
            self.active.append({"tensorboard": TensorBoard, "mlflow": MLflow}[kind](*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - a tracker must never stop a run
            self._warn(kind, e)

    def epoch(self, row: dict) -> None:
        for t in list(self.active):
            self.guard(t, "epoch", row)

    def finish(self, run_dir: Path) -> None:
        for t in list(self.active):
            self.guard(t, "finish", run_dir)
        self.close()

    def close(self) -> None:
        for t in list(self.active):
            self.guard(t, "close")

    def record(self) -> dict:
        """What config.json keeps: where each tracker writes (and MLflow's run id)."""
        out = {}
        for t in self.active:
            if t.name == "tensorboard":
                out["tensorboard"] = str(t.dir)
            else:
                out["mlflow"] = {"run_id": t.run_id, "tracking_uri": t.uri}
        return out


def open_trackers(kinds: list[str], run_dir: Path, log_dir: Path | None, config: dict, data: str,
                  log: Callable[[str], None] = print, previous: dict | None = None) -> Trackers:
    """The trackers `kinds` for the task folder `run_dir`; `previous` is config.json's "tracking"
    of an interrupted run, whose MLflow run a resumed one continues."""
    trackers = Trackers(log)
    name = run_name(run_dir)
    tags = {"cxr.version": __version__, "cxr.task": name.split("/")[0], "cxr.data_digest": data,
            **({"cxr.seed": name.split("seed")[-1]} if "/" in name else {})}
    for kind in kinds:
        if kind == "mlflow":
            trackers.open(kind, run_dir, log_dir, config, tags, ((previous or {}).get("mlflow") or {}).get("run_id"))
        else:
            trackers.open(kind, run_dir, log_dir, config, tags)
    return trackers
