"""Where the command line and the manual point: every page a `--help` text names exists (a
`docs/...md` path, with its anchor when it gives one, or a `README: Section` heading), and the built
site renders what the Markdown means: no table cell showing a literal `\\|`, no list run into a
paragraph because its blank line was missing."""

from __future__ import annotations

import argparse
import html
import re
from pathlib import Path

import pytest

from cxr.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS_PATH = re.compile(r"docs/[\w./-]+\.md(?:#[\w-]+)?")


def help_texts(parser: argparse.ArgumentParser | None = None) -> list[str]:
    """Every text --help can print: descriptions, epilogs, group titles and option help, of every command."""
    parser = parser or build_parser()
    texts = [parser.description or "", parser.epilog or ""]
    texts += [t for g in parser._action_groups for t in (g.title or "", g.description or "")]
    for action in parser._actions:
        if isinstance(action.help, str) and action.help != argparse.SUPPRESS:
            texts.append(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                texts += help_texts(sub)
    return [" ".join(t.split()) for t in texts if t]  # joined as argparse wraps them


def slug(heading: str) -> str:
    """Python-Markdown's toc slug (what mkdocs makes an anchor of)."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+\s+(.+?)\s*$", page.read_text(), re.M)}


def test_every_page_a_help_text_names_exists():
    texts = help_texts()
    named = sorted({m for t in texts for m in DOCS_PATH.findall(t)})
    assert named, "no --help text names a docs page: the pattern is stale"
    missing = []
    for ref in named:
        path, _, anchor = ref.partition("#")
        if not (ROOT / path).is_file() or (anchor and anchor not in anchors(ROOT / path)):
            missing.append(ref)
    assert missing == [], f"--help names pages that do not exist: {missing}"


def test_every_readme_section_a_help_text_names_exists():
    headings = {h.strip() for h in re.findall(r"^#+\s+(.+)$", (ROOT / "README.md").read_text(), re.M)}
    texts = help_texts()
    named = {m.strip() for t in texts for m in re.findall(r"README: ([A-Z][\w ]+?)(?=[),.;]|$| says)", t)}
    assert sorted(named - headings) == []
    bare = [t for t in texts if re.search(r"\bREADME\b(?!: )", t)]
    assert bare == [], f"--help points at the README without naming a section: {bare}"


@pytest.fixture
def site(docs_site) -> Path:
    """The manual as built once a session (conftest.docs_site)."""
    return docs_site


def pages(site: Path) -> dict[str, str]:
    return {p.relative_to(site).as_posix(): p.read_text() for p in site.rglob("*.html")
            if not p.relative_to(site).as_posix().startswith(("assets/", "search/")) and p.name != "404.html"}


@pytest.mark.slow
def test_no_table_cell_shows_an_escaped_bar(site):
    bad = {name: cells for name, text in pages(site).items()
           if (cells := [c for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", text, re.S) if "\\|" in c])}
    assert bad == {}, "write a bar in a table cell as &#124; (or reword): " + repr(bad)[:2000]


@pytest.mark.slow
def test_no_list_runs_into_a_paragraph(site):
    bad = {}
    for name, text in pages(site).items():
        for para in re.findall(r"<p>(.*?)</p>", text, re.S):
            plain = html.unescape(re.sub(r"<[^>]+>", "", para))
            if re.search(r"(^|\n)\s*(?:[-*+]|\d+\.) \S", plain):
                bad.setdefault(name, []).append(plain[:120])
    assert bad == {}, "a list needs a blank line before it: " + repr(bad)[:3000]
