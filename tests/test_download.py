"""`cxr download` against a real HTTP server on 127.0.0.1 (no internet here) serving a file list
in Mendeley's format and a small archive made in the test: a good archive, a truncated transfer,
a resumed one, a wrong checksum, a server that is not there, and archives fetched by hand."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cxr.cli import main
from cxr.data.folders import list_split

from .helpers import write_png


def make_archive(tmp_path: Path) -> bytes:
    """A zip laid out like ChestXRay2017.zip: chest_xray/{train,test}/{NORMAL,PNEUMONIA}, plus
    macOS resource forks that must not be unpacked."""
    images = tmp_path / "src"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        k = 0
        for split in ("train", "test"):
            for cls in ("NORMAL", "PNEUMONIA"):
                for i in range(3):
                    k += 1
                    name = f"IM-{k:04d}-0001.png" if cls == "NORMAL" else f"person{k}_bacteria_{k}.png"
                    write_png(images / name, k, size=64)
                    z.write(images / name, f"chest_xray/{split}/{cls}/{name}")
                    z.writestr(f"__MACOSX/chest_xray/{split}/{cls}/._{name}", b"resource fork")
    return buffer.getvalue()


class Server:
    """Serves /files.json and /archive.zip, with Range, optionally cutting the transfer short."""

    def __init__(self, archive: bytes, sha256: str | None = None):
        self.archive, self.cut, self.ranges, self.ignore_range = archive, None, [], False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/files.json":
                    body = json.dumps([
                        {"filename": "OCT2017.tar.gz", "content_details": {"size": 1, "sha256_hash": "0" * 64,
                                                                           "download_url": "http://nowhere"}},
                        {"filename": "ChestXRay2017.zip", "content_details": {
                            "size": len(server.archive),
                            "sha256_hash": sha256 or hashlib.sha256(server.archive).hexdigest(),
                            "download_url": f"http://127.0.0.1:{server.port}/archive.zip"}}]).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                start = 0
                if self.headers.get("Range") and not server.ignore_range:
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                server.ranges.append(start)
                payload = server.archive[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.archive) - 1}/{len(server.archive)}")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload[:server.cut] if server.cut else payload)
                self.wfile.flush()
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def file_list(self) -> str:
        return f"http://127.0.0.1:{self.port}/files.json"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def archive(tmp_path) -> bytes:
    return make_archive(tmp_path)


def run(dest: Path, *extra) -> int:
    return main(["download", "--dest", str(dest), "--timeout", "5", *map(str, extra)])


def error_line(err: str) -> str:
    """The one error line (the progress bar may sit above it on stderr), and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("cxr: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_good_archive_is_checked_and_unpacked_where_cxr_run_expects_it(archive, tmp_path, capsys):
    server = Server(archive)
    try:
        assert run(tmp_path / "data", "--file-list", server.file_list) == 0
    finally:
        server.close()
    root = tmp_path / "data" / "chest_xray"
    assert len(list_split(root, "train")) == 6 and len(list_split(root, "test")) == 6
    assert not list(root.rglob("._*")) and not (root / "__MACOSX").exists()
    assert leftovers(tmp_path / "data") == ["chest_xray"]  # no .part, no temporary folder
    out = capsys.readouterr().out
    assert f"SHA-256 {hashlib.sha256(archive).hexdigest()}" in out and "cxr run --data" in out


def test_a_truncated_transfer_is_kept_and_resumed_with_a_range_request(archive, tmp_path, capsys):
    server = Server(archive)
    dest = tmp_path / "data"
    try:
        server.cut = len(archive) // 2
        assert run(dest, "--file-list", server.file_list) == 2
        assert "rerun the same command to continue" in error_line(capsys.readouterr().err)
        part = dest / ".ChestXRay2017.zip.part"
        assert part.stat().st_size == len(archive) // 2 and not (dest / "chest_xray").exists()
        server.cut = None
        assert run(dest, "--file-list", server.file_list) == 0
        assert server.ranges == [0, len(archive) // 2]  # the second request asked only for the rest
    finally:
        server.close()
    assert leftovers(dest) == ["chest_xray"]
    assert len(list_split(dest / "chest_xray", "train")) == 6


def test_a_server_that_ignores_range_gets_the_download_started_over(archive, tmp_path, capsys):
    server = Server(archive)
    dest = tmp_path / "data"
    try:
        server.cut = len(archive) // 2
        assert run(dest, "--file-list", server.file_list) == 2
        server.cut, server.ignore_range = None, True  # answers 200 with the whole file to a Range request
        assert run(dest, "--file-list", server.file_list) == 0
    finally:
        server.close()
    assert server.ranges == [0, 0]
    out = capsys.readouterr().out
    assert f"SHA-256 {hashlib.sha256(archive).hexdigest()}" in out  # the whole file, not half + whole
    assert leftovers(dest) == ["chest_xray"] and len(list_split(dest / "chest_xray", "train")) == 6


def test_an_archive_with_a_path_outside_is_refused_and_nothing_written_outside(archive, tmp_path, capsys):
    evil = tmp_path / "in" / "evil.zip"
    evil.parent.mkdir()
    buffer = io.BytesIO(archive)
    with zipfile.ZipFile(buffer, "a") as z:  # a good layout, plus one member that climbs out
        z.writestr("../evil.txt", b"outside")
    evil.write_bytes(buffer.getvalue())
    dest = tmp_path / "deep" / "data"
    assert run(dest, "--archive", evil) == 2
    assert "unsafe path '../evil.txt'" in error_line(capsys.readouterr().err)
    assert not list(tmp_path.rglob("evil.txt")) and leftovers(dest) == []


@pytest.mark.slow
def test_a_server_that_never_answers_times_out(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as silent:  # accepts connections (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/files.json"
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "cxr", "download", "--dest", str(tmp_path / "data"),
                                 "--file-list", url, "--timeout", "2"], capture_output=True, text=True, timeout=60)
        elapsed = time.perf_counter() - start
    assert result.returncode == 2 and "timed out" in error_line(result.stderr) and "--archive" in result.stderr
    assert elapsed < 30  # 2 s of waiting plus the interpreter's start
    assert leftovers(tmp_path / "data") == []


def test_a_wrong_checksum_deletes_the_download_and_unpacks_nothing(archive, tmp_path, capsys):
    server = Server(archive, sha256="ab" * 32)
    try:
        assert run(tmp_path / "data", "--file-list", server.file_list) == 2
    finally:
        server.close()
    assert "differs from the published" in error_line(capsys.readouterr().err)
    assert leftovers(tmp_path / "data") == []


def test_offline_fails_in_seconds_with_the_manual_steps(tmp_path, capsys):
    start = time.perf_counter()
    assert run(tmp_path / "data", "--file-list", "http://127.0.0.1:9/files.json") == 2  # nothing listens on 9
    assert time.perf_counter() - start < 10
    err = error_line(capsys.readouterr().err)
    assert "data.mendeley.com/datasets/rscbjbr9sj/2" in err and "--archive" in err
    assert leftovers(tmp_path / "data") == []


def test_an_archive_fetched_by_hand_is_unpacked_and_a_wrong_one_refused(archive, tmp_path, capsys):
    good = tmp_path / "ChestXRay2017.zip"
    good.write_bytes(archive)
    assert run(tmp_path / "data", "--archive", good) == 0
    assert len(list_split(tmp_path / "data" / "chest_xray", "test")) == 6
    assert run(tmp_path / "data", "--archive", good) == 2  # already there: never overwritten
    assert "already there" in capsys.readouterr().err
    for name, content in (("broken.zip", archive[: len(archive) // 3]), ("other.zip", None)):
        bad = tmp_path / name
        if content is None:
            with zipfile.ZipFile(bad, "w") as z:
                z.writestr("photos/cat.png", b"x")
        else:
            bad.write_bytes(content)
        assert run(tmp_path / "other", "--archive", bad) == 2
        assert name in error_line(capsys.readouterr().err)
        assert leftovers(tmp_path / "other") == []
