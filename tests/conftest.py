"""Fixtures: the shared real data (skipped when absent), weights files made here, a tiny synthetic
data set in the download's layout, the session's canonical `cxr run` on real images and headless
Chromium. Factories and helpers that tests import live in tests/helpers.py.

Tiers: a test is `slow` when it trains for more than a few seconds, starts a process (a subprocess,
torchrun, a uvicorn or MLflow server) or a browser, builds the docs, or takes seconds for another
reason; `python -m pytest -q -m "not slow"` is the everyday loop. Tests that use `study` or `browser`
are marked here, the rest where they are written (`@pytest.mark.slow`)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

# write_png and make_tiny_data stay importable from here for test files that have not moved to helpers
from .helpers import CHROMEDRIVER, CHROMIUM, SHARED_DATA, cxr, make_tiny_data, write_png  # noqa: F401

# Tests never touch the user's decoded-image cache; subprocesses inherit this too. Removed when the
# session ends (every process a test starts has ended by then).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="cxr-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)
# Processes a test compares (a killed run and its resume) must compute with the same threads, so the
# thread count never follows the machine's load here (tests/test_machine.py tests that choice).
os.environ["CXR_IGNORE_LOAD"] = "1"

# Fixtures that make every test using them slow, and the markers they add.
MARKING_FIXTURES = {"study": ("slow",), "browser": ("slow", "browser"), "docs_site": ("slow",)}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, marks in MARKING_FIXTURES.items():
            if fixture in item.fixturenames:
                for mark in marks:
                    item.add_marker(mark)


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


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """DIR/{train,test}/{NORMAL,PNEUMONIA} with a few noise PNGs named like the real files."""
    return make_tiny_data(tmp_path / "data")


@pytest.fixture(scope="session")
def study(shared_data, weights_file, tmp_path_factory):
    """The canonical run: `cxr run` (scratch and finetune) on 24 real images a class at 64 px, one
    epoch, in a subprocess; trained once a session for every test that reads it."""
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


@pytest.fixture(scope="session")
def docs_site(tmp_path_factory) -> Path:
    """The manual built once a session with `mkdocs build --strict` (test_docs and test_docs_links read it)."""
    import subprocess
    import sys

    from .helpers import ROOT

    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return out
