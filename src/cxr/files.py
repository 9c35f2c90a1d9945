"""Atomic file writes: every artefact is written to a temporary file and renamed into place.

A crash or kill mid-write leaves the previous file (or none), never a truncated one.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .errors import CxrError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary path in the same folder, fsync it, rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results should read like any other
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(folder: Path | str) -> Iterator[Path]:
    """Build a folder in a temporary one beside it (the `with` block's value) and, when the block ends
    without error, put it in place of `folder` (replacing what was there); an error removes it and
    leaves `folder` as it was, so no half-written folder is ever seen."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; results should read like any other
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the old folder is renamed aside (one step), the new one renamed in (one step), and only then is
    # the old one deleted: a kill between steps leaves a whole folder under one name or the other
    old = folder.with_name(f".{folder.name}.old-{tmp.name}") if folder.exists() else None
    if old is not None:
        os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        if old is not None:
            os.replace(old, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: Path | str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: Path | str, header: list[str], rows: Iterable[Iterable]) -> None:
    def write(p: Path) -> None:
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    atomic_write(path, write)


def read_csv(path: Path | str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def save_torch(path: Path | str, obj) -> None:
    def write(p: Path) -> None:
        try:
            torch.save(obj, p)
        except RuntimeError as e:  # torch reports a failed write (disk full, file too large) this way
            raise OSError(errno.EIO, f"writing failed ({str(e).splitlines()[0][:120]}); is the disk full?",
                          str(path)) from None

    atomic_write(path, write)


def folder_hint(path: Path) -> str:
    """Advice for a folder given where another kind was expected: an output folder (OUT) where a
    task folder was meant, a task folder where its best.pt or its OUT was meant. "" when neither."""
    path = Path(path)
    if not path.is_dir():
        return ""
    if (path / "best.pt").is_file():
        return f" ({path} is a task folder: its checkpoint is {path / 'best.pt'}, its output folder {path.parent})"
    tasks = sorted(p for p in path.iterdir() if (p / "best.pt").is_file() or (p / "history.csv").is_file())
    if tasks:
        return f" ({path} is an output folder: pass one of its task folders, e.g. {tasks[0]})"
    return ""


def read_run_config(run_dir: Path) -> dict:
    """A run folder's config.json, or one line saying what is wrong with the folder."""
    path = Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        hint = folder_hint(Path(run_dir))
        raise CxrError(f"{path}: missing or unreadable" + (hint if "output folder" in hint else
                                                          "; pass --data DIR, or a run folder made by cxr")) from None
