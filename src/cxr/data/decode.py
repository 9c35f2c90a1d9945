"""Decoding many files at once into one uint8 tensor (`images.load_image` decodes one).

Unreadable files are collected, never raised one by one, so a user sees every bad file in one
message. Progress bars are the caller's choice (`quiet`, tqdm's `disable`): decoding knows
nothing of processes or ranks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import DataError
from .images import DECODE_ERRORS, describe_error, load_image

Bad = list[tuple[int, Path, str]]  # (index, path, reason) of each unreadable file


def _try_load(path: Path, size: int) -> np.ndarray | str:
    try:
        return load_image(path, size)
    except DECODE_ERRORS as e:
        return describe_error(e)


def decode_all(paths: list[Path], size: int, workers: int = 2, desc: str = "decode",
               out: torch.Tensor | None = None, quiet: bool | None = None) -> tuple[torch.Tensor, Bad]:
    """(N, 1, size, size) uint8 tensor of every image, decoded once with `workers` threads
    (Pillow releases the GIL while decoding), and (index, path, reason) of each unreadable one.
    `out`: where to write them (e.g. a memory-mapped file); a new tensor when None. `quiet`:
    tqdm's `disable` (None: a bar only on a terminal)."""
    out = torch.zeros((len(paths), 1, size, size), dtype=torch.uint8) if out is None else out
    bad: Bad = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda p: _try_load(p, size), paths)
        for i, (path, r) in enumerate(tqdm(zip(paths, results), total=len(paths), desc=desc,
                                           unit="img", leave=False, disable=quiet)):
            if isinstance(r, str):
                bad.append((i, path, r))
            else:
                out[i, 0] = torch.from_numpy(r)
    return out, bad


def bad_images_error(bad: Bad) -> DataError:
    listing = "; ".join(f"{p} ({why})" for _, p, why in bad)
    return DataError(f"cannot read {len(bad)} image(s): {listing}; remove or replace them, or pass "
                     "--skip-bad-images to go on without them")
