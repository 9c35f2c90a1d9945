"""`cxr download`: the full data set from its public source, checked and unpacked where `cxr run`
expects it.

Source: Kermany, Zhang, Goldbaum, Mendeley Data V2, doi:10.17632/rscbjbr9sj.2 (CC BY 4.0), the
archive ChestXRay2017.zip (about 1.2 GB). Mendeley's public API lists each file of the record
with its size, SHA-256 and download address; the download is checked against both, so nothing
here is a constant that can go stale:

    1. GET the file list, find ChestXRay2017.zip: size, sha256_hash, download_url;
    2. download to DEST/.ChestXRay2017.zip.part, continuing a broken download with an HTTP Range
       request (a server that ignores Range is answered by starting over);
    3. check the size and the SHA-256 (a mismatch deletes the file: it cannot be resumed);
    4. extract into a temporary folder inside DEST, check the layout (train/ and test/ with NORMAL/
       and PNEUMONIA/), and rename it to DEST/chest_xray: a failure never leaves half a data set.

Offline, it fails within the timeout with the manual steps; `--archive FILE` checks and
extracts an archive fetched by hand.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from ..config import CLASSES
from ..errors import CxrError

DATASET_PAGE = "https://data.mendeley.com/datasets/rscbjbr9sj/2"
FILE_LIST = "https://data.mendeley.com/public-api/datasets/rscbjbr9sj/files?folder_id=root&version=2"
ARCHIVE = "ChestXRay2017.zip"
FOLDER = "chest_xray"  # what the archive unpacks to, and what `cxr run --data` then takes
HEADERS = {"User-Agent": "cxr-download/0.1 (+https://github.com/; research data set download)"}
CHUNK = 1 << 20


class DownloadError(CxrError):
    """The data set could not be fetched, checked or unpacked."""


def manual_steps(dest: Path) -> str:
    return (f"download {ARCHIVE} by hand from {DATASET_PAGE}, then run `cxr download --dest {dest} --archive "
            f"PATH/{ARCHIVE}` to check and unpack it")


def _open(url: str, timeout: float, start: int = 0):
    headers = dict(HEADERS, **({"Range": f"bytes={start}-"} if start else {}))
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def file_record(file_list: str, timeout: float, dest: Path) -> dict:
    """{"size", "sha256", "url"} of the archive, from the publisher's file list."""
    try:
        with _open(file_list, timeout) as response:
            files = json.load(response)
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"{file_list}: cannot reach the data set's file list ({reason}); offline? "
                            f"{manual_steps(dest)}") from None
    except ValueError:
        raise DownloadError(f"{file_list}: the file list is not JSON; {manual_steps(dest)}") from None
    found = [f for f in files if isinstance(f, dict) and f.get("filename") == ARCHIVE] if isinstance(files, list) else []
    try:
        details = found[0]["content_details"]
        return {"size": int(details["size"]), "sha256": str(details["sha256_hash"]).lower(),
                "url": str(details["download_url"])}
    except (IndexError, KeyError, TypeError, ValueError):
        raise DownloadError(f"{file_list}: lists no {ARCHIVE} with a size, SHA-256 and download address; "
                            f"{manual_steps(dest)}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(record: dict, part: Path, timeout: float, progress: bool = True) -> None:
    """Download record["url"] into `part`, continuing from what `part` already holds, until it
    holds record["size"] bytes. A broken transfer keeps `part` (rerun to continue)."""
    size = record["size"]
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have == size:
        return
    try:
        with _open(record["url"], timeout, have) as response:
            if have and response.status != 206:  # the server sent the whole file: start over
                have = 0
            with open(part, "ab" if have else "wb") as out, \
                    tqdm(total=size, initial=have, unit="B", unit_scale=True, desc=ARCHIVE, disable=not progress) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or type(e).__name__
        got = part.stat().st_size if part.exists() else 0
        raise DownloadError(f"{record['url']}: download broke off at {got:,} of {size:,} bytes ({reason}); rerun "
                            "the same command to continue where it stopped") from None
    got = part.stat().st_size
    if got < size:
        raise DownloadError(f"{record['url']}: the transfer ended at {got:,} of {size:,} bytes; rerun the same "
                            "command to continue where it stopped")


def verify(path: Path, record: dict) -> None:
    """Size and SHA-256 as published; a mismatch deletes the file (it cannot be continued)."""
    size = path.stat().st_size
    if size != record["size"]:
        path.unlink()
        raise DownloadError(f"{path}: {size:,} bytes where the publisher lists {record['size']:,}; deleted, rerun "
                            "to download again")
    digest = sha256_of(path)
    if digest != record["sha256"]:
        path.unlink()
        raise DownloadError(f"{path}: SHA-256 {digest} differs from the published {record['sha256']}; deleted "
                            "(corrupted or changed upstream), rerun to download again")


def _layout_root(folder: Path) -> Path | None:
    """The folder inside an unpacked archive that holds train/ and test/ with both classes."""
    for candidate in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir() and p.name != "__MACOSX")]:
        if "__MACOSX" in candidate.parts:
            continue
        if all((candidate / split / c).is_dir() for split in ("train", "test") for c in CLASSES):
            return candidate
    return None


def extract(archive: Path, dest: Path) -> Path:
    """Unpack `archive` into DEST/chest_xray atomically: everything goes to a temporary folder in
    DEST first, the layout is checked, then one rename. Returns DEST/chest_xray."""
    target = dest / FOLDER
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        try:
            with zipfile.ZipFile(archive) as z:
                for member in z.infolist():
                    name = Path(member.filename)
                    if name.is_absolute() or ".." in name.parts:
                        raise DownloadError(f"{archive}: unsafe path {member.filename!r} in the archive; not unpacked")
                    if "__MACOSX" in name.parts or name.name.startswith("._"):
                        continue  # macOS resource forks, not images
                    z.extract(member, tmp)
        except (zipfile.BadZipFile, EOFError) as e:
            raise DownloadError(f"{archive}: not a readable zip archive ({e}); delete it and download again") from None
        root = _layout_root(tmp)
        if root is None:
            raise DownloadError(f"{archive}: holds no train/ and test/ folders with {' and '.join(CLASSES)}; "
                                "is it the chest X-ray archive?")
        if target.exists():
            raise DownloadError(f"{target}: already exists; remove it (or pass another --dest) to unpack again")
        os.replace(root, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def download(dest: Path, file_list: str = FILE_LIST, archive: Path | None = None, timeout: float = 20,
             keep_archive: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Fetch (or take `archive`), check and unpack the data set into DEST/chest_xray; returns it."""
    dest = Path(dest)
    target = dest / FOLDER
    if target.exists():
        raise DownloadError(f"{target}: already there; use it (cxr run --data {target}), or remove it to download "
                            "again")
    if archive is not None:
        if not Path(archive).is_file():
            raise DownloadError(f"{archive}: file not found; pass the {ARCHIVE} you downloaded")
        log(f"unpacking {archive} (not checked against the publisher's SHA-256: it needs the network)")
        return extract(Path(archive), dest)
    record = file_record(file_list, timeout, dest)
    dest.mkdir(parents=True, exist_ok=True)
    part = dest / f".{ARCHIVE}.part"
    log(f"{ARCHIVE}: {record['size'] / 1e9:.2f} GB from {record['url']}"
        + (f" (continuing after {part.stat().st_size:,} bytes)" if part.exists() else ""))
    fetch(record, part, timeout, progress)
    verify(part, record)
    log(f"checked: {record['size']:,} bytes, SHA-256 {record['sha256']}")
    folder = extract(part, dest)
    if keep_archive:
        os.replace(part, dest / ARCHIVE)
    else:
        part.unlink()
    return folder
