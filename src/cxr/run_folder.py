"""A task's run folder, OUT/<task>/ (OUT/<task>/seed<K>/ with several seeds), from claim to
config.json: whether a run starts fresh or resumes, which files a fresh start removes, the
last.pt a resume continues from, and the resolved settings saved beside the results."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch
import torchvision

from . import __version__
from .config import TaskConfig
from .data.folders import is_sample
from .data.sites import site_counts
from .errors import CxrError
from .files import write_json
from .run_options import RunOptions
from .starting_weights import backbone_card
from .study_data import PreparedData
from .training.checkpoint import load_checkpoint

ARTEFACTS = ("config.json", "history.csv", "best.pt", "last.pt", "val_predictions.csv", "metrics.json",
             "predictions.csv")


def task_dir(out: Path, config: TaskConfig, options: RunOptions) -> Path:
    """OUT/<task>/, or OUT/<task>/seed<K>/ when several seeds are trained (seeds.py)."""
    return Path(out) / config.task / f"seed{config.seed}" if options.seeded else Path(out) / config.task


def claim_run_dir(run_dir: Path, config: TaskConfig, root: Path, options: RunOptions) -> str:
    """"fresh" or "resume" for `run_dir`; refuses to mix a new run into an old one."""
    existing = [name for name in ARTEFACTS if (run_dir / name).exists()]
    if not existing or options.overwrite:
        return "fresh"
    if not options.resume:
        raise CxrError(f"{run_dir}: holds a previous run ({', '.join(existing)}); pass --resume to "
                       "continue it, --overwrite to replace it, or choose another --out")
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise CxrError(f"{run_dir / 'config.json'}: missing or unreadable, so --resume cannot check the "
                       "run; pass --overwrite to start again") from None
    new = json.loads(json.dumps(config.to_dict()))  # as config.json holds it: tuples are lists there
    differ = [k for k in new if k != "epochs" and saved.get("config", {}).get(k) != new[k]]
    if saved.get("data") != str(Path(root).resolve()):
        differ.append("data")
    if differ:
        raise CxrError(f"{run_dir}: --resume with different settings ({', '.join(differ)}); repeat the "
                       "original options, or pass --overwrite to start again")
    return "resume"


def start_run_dir(run_dir: Path, mode: str) -> dict | None:
    """Prepare `run_dir`; for a resume, the last.pt to continue from (None if no epoch finished)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if mode == "fresh":
        for name in ARTEFACTS:
            (run_dir / name).unlink(missing_ok=True)
        return None
    for name in ("metrics.json", "predictions.csv", "val_predictions.csv"):  # made again from best.pt
        (run_dir / name).unlink(missing_ok=True)
    for tmp in run_dir.glob(".*.tmp"):  # left by a kill in the middle of an atomic write
        tmp.unlink()
    if not (run_dir / "last.pt").exists():
        return None
    last = load_checkpoint(run_dir / "last.pt")
    if "rng" not in last or last.get("optimizer") is None:
        raise CxrError(f"{run_dir / 'last.pt'}: holds no resume state; pass --overwrite to start again")
    return last


def write_run_config(run_dir: Path, config: TaskConfig, *, data: PreparedData, root: Path,
                     options: RunOptions, tracking: dict | None = None) -> None:
    """OUT/<task>/config.json: the task's settings, the data and its summary, the starting weights,
    how it ran and the library versions (claim_run_dir compares a resume against it)."""
    sites = site_counts(data.splits.train)
    weights = (str(options.weights) if options.weights else "torchvision:IMAGENET1K_V1") \
        if config.pretrained else None
    write_json(run_dir / "config.json", {
        **({"tracking": tracking} if tracking else {}),
        "config": config.to_dict(),
        "data": str(Path(root).resolve()),
        "sample": is_sample(root),
        "data_summary": data.summary,
        **({"sites": {"train": sites, "val": site_counts(data.splits.val)}} if sites else {}),
        "weights": weights,
        **(backbone_card(config, options) or {}),
        "device": str(options.device),
        "precision": options.precision,
        "precision_reason": options.precision_reason,
        "compile": options.compile_model,
        "processes": options.group.world,
        "command": list(options.command) or sys.argv,
        "versions": {"cxr": __version__, "python": platform.python_version(),
                     "torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
    })
