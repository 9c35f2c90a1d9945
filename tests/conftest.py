"""Shared fixtures: the shared real data (skipped when absent), weights files made here, and a
tiny synthetic data set in the download's layout for error paths."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import resnet18

# Tests never touch the user's decoded-image cache; subprocesses inherit this too.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="cxr-test-cache-")

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "train").is_dir():
        pytest.skip(f"shared data set not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A torchvision-format resnet18 state dict (random values, ImageNet's keys and shapes)."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(resnet18().state_dict(), path)
    return path


def write_png(path: Path, seed: int, size: int = 40) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(path)


def make_tiny_data(root: Path, n_test: int = 3) -> Path:
    """ROOT/{train,test}/{NORMAL,PNEUMONIA}: 8 train and `n_test` test noise PNGs per class, named
    like the real files (for module-scoped fixtures, which cannot use `tiny_data`)."""
    k = 0
    for split, n in (("train", 8), ("test", n_test)):
        for i in range(n):
            pid = 100 * (split == "test") + i
            write_png(root / split / "NORMAL" / f"IM-{pid:04d}-0001.png", k := k + 1)
            write_png(root / split / "PNEUMONIA" / f"person{pid}_bacteria_{k}.png", k := k + 1)
    return root


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """DIR/{train,test}/{NORMAL,PNEUMONIA} with a few noise PNGs named like the real files."""
    return make_tiny_data(tmp_path / "data")


def cxr(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cxr", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="session")
def study(shared_data, weights_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    result = cxr("run", "--data", shared_data, "--out", out, "--limit", 24, "--image-size", 64,
                 "--epochs", 1, "--weights", weights_file, "--workers", 2)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Debian chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,2000", f"--user-data-dir={tmp_path_factory.mktemp('chrome')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
