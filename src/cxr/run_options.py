"""How a study runs (`RunOptions`), as opposed to what it trains (`config.TaskConfig`): the device,
precision, caches, what to do with an earlier run in OUT, where runs are also logged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .training.distributed import SINGLE, Group


@dataclass(frozen=True)
class RunOptions:
    """How to run, as opposed to what to train (TaskConfig): none of these change what is computed
    (bf16 rounds differently from fp32: it is recorded in config.json)."""

    device: torch.device = torch.device("cpu")
    workers: int = 2
    weights: Path | None = None       # offline ImageNet weights file
    overwrite: bool = False           # replace an earlier run in OUT
    resume: bool = False              # continue an earlier run from its last completed epoch
    skip_bad_images: bool = False     # go on without unreadable images instead of stopping
    cam_method: str = "cam"
    n_examples: int = 16              # images per CAM figure
    cache_dir: Path | None = None     # decoded-image cache (None: decode in memory only)
    precision: str = "fp32"           # training arithmetic, "fp32" or "bf16" (accel.py)
    precision_reason: str = ""        # why that precision (machine.py: asked for, or measured here)
    command: tuple[str, ...] = ()     # the command line that started the run (config.json records it)
    compile_model: bool = False       # torch.compile for training
    mmap: bool = False                # decoded images memory-mapped from the cache, not held in RAM
    group: Group = SINGLE             # this process's place among torchrun's processes (distributed.py)
    trackers: tuple[str, ...] = ()    # "tensorboard", "mlflow": where runs are also logged (tracking.py)
    log_dir: Path | None = None       # TensorBoard's folder (None: OUT/<task>/tensorboard)
    seeded: bool = False              # several seeds: each task's run in OUT/<task>/seed<K>/ (seeds.py)
    memo: dict | None = None          # decoded images kept across seeds, by (path, size)
    skipped: tuple = ()               # (task, why) of tasks asked for but left out; the report names them
