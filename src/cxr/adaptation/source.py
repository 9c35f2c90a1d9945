"""The source run an adaptation starts from, and what it brings: its checkpoint, its data folder,
its training images (replayed, or mixed into batch-norm statistics) and its validation split (the
first site's voice in every choice a fine-tuning makes). The source run is only read, never changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..config import CLASSES, FinetuneSpec
from ..data.dataset import labels_of
from ..data.loading import load_images, prepare_splits
from ..errors import CxrError
from ..files import read_run_config
from ..training.checkpoint import load_checkpoint


def source_run(run_dir: Path) -> tuple[Path, dict]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not (run_dir / "best.pt").is_file():
        raise CxrError(f"{run_dir}: not a cxr run folder (no best.pt); pass a task folder such as OUT/scratch")
    checkpoint = load_checkpoint(run_dir / "best.pt")
    if tuple(checkpoint["classes"]) != CLASSES:
        raise CxrError(f"{run_dir}: a {'/'.join(checkpoint['classes'])} model (--labels "
                       f"{checkpoint['config'].get('labels')}); cxr adapt fits pneumonia-vs-normal models to a site "
                       "(its operating point, k-fold evaluation and site folders are NORMAL/PNEUMONIA): adapt a run "
                       "trained with --labels pneumonia")
    return run_dir, checkpoint


def check_out(out: Path, source: Path, overwrite: bool) -> None:
    out, here, src = Path(out), Path(out).resolve(), Path(source).resolve()
    if here == src or src in here.parents or here in src.parents:
        what = "is" if here == src else "is inside" if src in here.parents else "contains"
        raise CxrError(f"{out}: {what} the source run {source}; adaptation writes a folder of its own "
                       "(replacing it with --overwrite): pass an --out outside the source run")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CxrError(f"{out}: exists and is not empty; pass another --out, or --overwrite to replace it")


def source_data(source: Path) -> str | None:
    """The data folder the source run was trained on (its config.json), or None."""
    return read_run_config(source).get("data") if (Path(source) / "config.json").is_file() else None


def replay_images(source: Path, data: str | None, config, *, workers: int, cache_dir: Path | None,
                  log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor]:
    """The source run's own training images (its train split, as it was split: same folder `data`,
    seed and validation ratio), decoded at its image size, for replay."""
    if not data or not Path(data).exists():
        raise CxrError(f"{source / 'config.json'}: the source run's data ({data}) is not here; replay needs the "
                       "images it was trained on: restore that folder, or drop --replay")
    train = prepare_splits(Path(data), config.val_ratio, config.seed, config.limit, config.classes).train
    log(f"replay: {len(train)} training images of the source run ({data})")
    images = load_images([s.path for s in train], config.image_size, workers, desc="decode replay", cache_dir=cache_dir)
    return images, labels_of(train)


def source_training_images(source: Path, data: str | None, specs: list[FinetuneSpec], config, *, workers: int,
                           cache_dir: Path | None, log: Callable[[str], None] = print):
    """The source run's training images when a fine-tune needs them: to replay (a spec with replay),
    or, where its data is here, for batch norm re-estimated on both sites after weights are mixed
    (WiSE-FT, a soup), with or without replay; None otherwise."""
    mixing = any(s.wise or s.soup > 1 for s in specs) and data and Path(data).exists()
    if any(s.replay for s in specs) or mixing:
        return replay_images(source, data, config, workers=workers, cache_dir=cache_dir, log=log)
    return None


def source_validation(data: str | None, config, workers: int, cache_dir: Path | None,
                      log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The source run's validation split (as it was split: same folder, seed and ratio), decoded at
    its image size: the first site's voice in every choice a fine-tuning makes. None (with a note)
    where the source's data is not here."""
    if not data or not Path(data).exists():
        log(f"note: the source run's data ({data}) is not here: choices read the site's validation patients alone")
        return None
    val = prepare_splits(Path(data), config.val_ratio, config.seed, config.limit, config.classes).val
    log(f"source validation: {len(val)} images of the source run's validation split ({data}) join every choice")
    return load_images([s.path for s in val], config.image_size, workers, desc="decode source val",
                       cache_dir=cache_dir), labels_of(val)
