"""The manual: the site builds with `mkdocs build --strict` (broken links, missing pages and
anchors fail it), its CLI reference lists every command and option of the parser, the README is
the short front door whose two commands are the ones CI runs, and the pictures stay small."""

from __future__ import annotations

import argparse
import html
import re
from pathlib import Path

import pytest

from cxr.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def site(docs_site) -> Path:
    """The manual as built once a session (conftest.docs_site)."""
    return docs_site


def parser_options() -> dict[str, list[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    # what --help shows: an option hidden from it (argparse.SUPPRESS, e.g. serve's benchmark-only --no-lock)
    # is hidden from the reference too
    return {name: [s for a in p._actions if a.help != argparse.SUPPRESS for s in a.option_strings]
            for name, p in sub.choices.items()}


@pytest.mark.slow
def test_the_site_builds_strictly_and_has_every_page(site):
    for page in ("index.html", "getting-started/index.html", "guide/another-hospital/index.html",
                 "results/index.html", "reference/cli/index.html", "reference/api/index.html"):
        assert (site / page).is_file(), page
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "load_model" in api and "One record per image" in api  # docstrings rendered by mkdocstrings


@pytest.mark.slow
def test_the_cli_reference_lists_every_command_and_option(site):
    page = html.unescape(re.sub(r"<[^>]+>", " ", (site / "reference" / "cli" / "index.html").read_text()))
    sections = re.split(r"\bcxr (\w+)\s*¶", page)
    found = {sections[i]: sections[i + 1] for i in range(1, len(sections) - 1, 2)}
    for command, options in parser_options().items():
        assert command in found, command
        missing = [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", found[command])]
        assert missing == [], (command, missing)


def test_the_readme_is_short_and_its_commands_are_cis():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    ci = (ROOT / ".ci" / "run").read_text()
    # the run command's install is the lean one; the test command brings the test extra
    install = "python -m pip install torch==2.14.1 torchvision==0.29.1 -e .\n"
    tests = "python -m pip install -e \".[test]\""
    assert install in readme and install in ci and tests in readme and tests in ci
    assert ci.index(install) < ci.index(tests) < ci.index("python -m pytest -q")
    assert "\n    python -m pytest -q\n" in readme and "\npython -m pytest -q\n" in ci
    first_screen = "\n".join(readme.splitlines()[:40])
    assert "pip install" in first_screen and "cxr demo" in first_screen and "pytest" in readme
    assert "mkdocs serve" in readme


def test_the_pictures_are_small_and_linked():
    images = sorted((ROOT / "docs" / "images").glob("*.png"))
    assert images and all(p.stat().st_size < 300_000 for p in images), [(p.name, p.stat().st_size) for p in images]
    text = "".join(p.read_text() for p in (ROOT / "docs").rglob("*.md")) + (ROOT / "README.md").read_text()
    assert all(p.name in text for p in images)
