"""Decoded-image cache on disk: every image is decoded and resized once, then reused by later
runs and commands (`cxr run` again, `cxr evaluate`, other tasks, other output folders).

The key covers the decoder version, the resolution and, for every file, its absolute path, size
and modification time: any change gives a new key and so a rebuild, never a stale image. An
entry is `<key>.npy` (uint8, (N, 1, S, S)) and `<key>.json` (the unreadable files), both written
atomically. Entries are never pruned automatically: delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write, write_json
from .decode import Bad, decode_all

DECODER_VERSION = 1  # bump when images.load_image changes its pixels


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cxr" / "images"


def cache_key(paths: list[Path], size: int) -> str:
    h = hashlib.sha1(f"cxr-images-v{DECODER_VERSION}|{size}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"|{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _tensor(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only memory map: nothing writes into decoded images
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def cached_decode(paths: list[Path], size: int, workers: int, cache_dir: Path | None,
                  desc: str = "decode", mmap: bool = False, quiet: bool | None = None) -> tuple[torch.Tensor, Bad]:
    """Like `decode.decode_all`, through the cache in `cache_dir` (None: no cache). With `mmap`,
    the images stay on disk: they are decoded straight into the cache file and returned as a
    read-only memory map, so a set larger than RAM trains with only the pages in use resident."""
    if cache_dir is None or not paths:
        if mmap and paths:
            raise ValueError("memory-mapped images need the cache (a cache folder)")
        return decode_all(paths, size, workers, desc, quiet=quiet)
    key = cache_key(paths, size)
    array_file, meta_file = Path(cache_dir) / f"{key}.npy", Path(cache_dir) / f"{key}.json"
    if array_file.is_file() and meta_file.is_file():
        try:
            images = np.load(array_file, mmap_mode="r" if mmap else None)
            bad = [(i, Path(p), why) for i, p, why in json.loads(meta_file.read_text())["bad"]]
            if images.shape == (len(paths), 1, size, size) and images.dtype == np.uint8:
                return _tensor(images), bad
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry is rebuilt below
    if mmap:
        return _decode_to_disk(paths, size, workers, desc, array_file, meta_file, quiet)
    images, bad = decode_all(paths, size, workers, desc, quiet=quiet)

    def save(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, images.numpy())

    try:
        atomic_write(array_file, save)
        write_json(meta_file, {"size": size, "files": len(paths), "bad": [[i, str(p), why] for i, p, why in bad]})
    except OSError:
        pass  # a cache that cannot be written only costs time next run
    return images, bad


def _decode_to_disk(paths: list[Path], size: int, workers: int, desc: str, array_file: Path,
                    meta_file: Path, quiet: bool | None) -> tuple[torch.Tensor, Bad]:
    """Decode into a new .npy file in the cache folder (never all of it in memory), rename it into
    place, and return it memory-mapped read-only."""
    array_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{array_file.name}.", suffix=".tmp", dir=array_file.parent)
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 1, size, size))
        _, bad = decode_all(paths, size, workers, desc, out=torch.from_numpy(out), quiet=quiet)
        out.flush()
        del out
        os.replace(tmp, array_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_json(meta_file, {"size": size, "files": len(paths), "bad": [[i, str(p), why] for i, p, why in bad]})
    return _tensor(np.load(array_file, mmap_mode="r")), bad
