import csv
import gc
import os

import pytest
import torch

from cxr.cli import main
from cxr.data import cache
from cxr.data.cache import cache_key, cached_decode
from cxr.data.decode import decode_all

from .helpers import write_png


def test_cache_hit_gives_the_same_images_without_decoding(tmp_path, monkeypatch):
    paths = []
    for i in range(5):
        write_png(tmp_path / "img" / f"{i}.png", i)
        paths.append(tmp_path / "img" / f"{i}.png")
    (tmp_path / "img" / "bad.png").write_text("no")
    paths.append(tmp_path / "img" / "bad.png")
    first, bad = cached_decode(paths, 32, 2, tmp_path / "cache")
    assert [p.name for _, p, _ in bad] == ["bad.png"]
    calls = []
    monkeypatch.setattr("cxr.data.cache.decode_all", lambda *a, **k: calls.append(a) or decode_all(*a, **k))
    again, bad_again = cached_decode(paths, 32, 2, tmp_path / "cache")
    assert not calls, "a cache hit must not decode"
    assert torch.equal(first, again) and bad_again == bad
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


def test_key_changes_with_content_time_size_and_resolution(tmp_path):
    path = tmp_path / "a.png"
    write_png(path, 0)
    key = cache_key([path], 32)
    assert cache_key([path], 64) != key
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache_key([path], 32) != key
    write_png(path, 1, size=41)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old mtime back: the size alone must tell
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size != st.st_size
    assert cache_key([path], 32) != key


def test_damaged_entry_is_rebuilt(tmp_path):
    path = tmp_path / "a.png"
    write_png(path, 0)
    first, _ = cached_decode([path], 32, 1, tmp_path / "cache")
    entry = next((tmp_path / "cache").glob("*.npy"))
    entry.write_bytes(b"garbage")
    again, _ = cached_decode([path], 32, 1, tmp_path / "cache")
    assert torch.equal(first, again)


def predictions(run):
    with open(run / "scratch" / "predictions.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_cached_and_uncached_runs_predict_the_same(tiny_data, tmp_path):
    common = ["run", "--data", str(tiny_data), "--tasks", "scratch", "--image-size", "32", "--epochs", "2",
              "--n", "2", "--cache-dir", str(tmp_path / "cache")]
    assert main(common + ["--out", str(tmp_path / "build")]) == 0  # fills the cache
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3  # train, val, test
    assert main(common + ["--out", str(tmp_path / "hit")]) == 0
    assert main(common[:-2] + ["--no-cache", "--out", str(tmp_path / "uncached")]) == 0
    assert predictions(tmp_path / "hit") == predictions(tmp_path / "uncached") == predictions(tmp_path / "build")
    assert cache.default_cache_dir().parent.parent == type(cache.default_cache_dir())(os.environ["XDG_CACHE_HOME"])


def _mapped(path) -> bool:
    return str(path) in open("/proc/self/maps").read()


def test_memory_mapped_images_stay_on_disk_and_equal_the_decoded_ones(tmp_path):
    if not os.path.exists("/proc/self/maps"):
        import pytest

        pytest.skip("needs /proc to see what is mapped")
    paths = []
    for i in range(12):
        paths.append(tmp_path / "img" / f"{i}.png")
        write_png(paths[-1], i, size=40)
    paths.append(tmp_path / "img" / "broken.png")
    paths[-1].write_bytes(b"not an image")
    plain, expected_bad = decode_all(paths, 32)
    assert [(i, p) for i, p, _ in expected_bad] == [(12, paths[-1])]
    first, bad = cached_decode(paths, 32, 2, tmp_path / "cache", mmap=True)  # decoded straight to disk
    array_file = tmp_path / "cache" / f"{cache_key(paths, 32)}.npy"
    assert bad == expected_bad and torch.equal(first, plain) and _mapped(array_file)
    again, bad = cached_decode(paths, 32, 2, tmp_path / "cache", mmap=True)  # a hit, mapped again
    assert torch.equal(again, plain) and bad == expected_bad  # the entry keeps its unreadable files
    del first
    gc.collect()
    assert _mapped(array_file)  # what keeps the file mapped now is the hit itself
    assert not list((tmp_path / "cache").glob(".*.tmp"))
    in_memory, bad = cached_decode(paths, 32, 2, tmp_path / "cache")  # the same entry, read into memory
    assert torch.equal(in_memory, plain) and bad == expected_bad
    del again
    gc.collect()
    assert not _mapped(array_file)  # the in-memory read holds no mapping


@pytest.mark.slow
def test_training_on_memory_mapped_images_is_the_same_training(tiny_data, tmp_path, capsys):
    histories = []
    for name, extra in (("ram", []), ("mmap", ["--mmap"])):
        out = tmp_path / name
        assert main(["train", "--data", str(tiny_data), "--out", str(out), "--epochs", "2", "--image-size", "32",
                     "--deterministic", "--device", "cpu", "--cache-dir", str(tmp_path / f"cache-{name}"), *extra]) == 0
        with open(out / "scratch" / "history.csv") as f:
            histories.append([{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)])
    assert histories[0] == histories[1]
    assert main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "x"), "--mmap", "--no-cache"]) == 2
    assert "--mmap" in capsys.readouterr().err
