"""The report's first line: which cxr wrote it, the command lines that made its runs (as each
run's config.json records them) and what the tool is for."""

from __future__ import annotations

import html
import shlex
from pathlib import Path

from .card import INTENDED_USE


def provenance(rows: list[dict]) -> tuple[str, list[str], str]:
    """The report's header: which cxr wrote it (and the runs, where config.json records another
    version), each distinct command line that made the runs, and what the tool is for."""
    from .. import __version__

    made = sorted({r["config"].get("versions", {}).get("cxr") for r in rows} - {None, __version__})
    version = f"cxr {__version__}" if not made else f"report by cxr {__version__}, runs by cxr {', '.join(made)}"
    commands = [_command_line(r["config"]["command"]) for r in rows if r["config"].get("command")]
    return version, list(dict.fromkeys(commands)), INTENDED_USE


def provenance_markdown(rows: list[dict]) -> str:
    version, commands, use = provenance(rows)
    return f"{version}. " + ("Made by " + "; ".join(f"`{c}`" for c in commands) if commands else
                             "Command not recorded in config.json") + f". {use}"


def provenance_html(rows: list[dict]) -> str:
    version, commands, use = provenance(rows)
    made = ("Made by " + "; ".join(f"<code>{html.escape(c)}</code>" for c in commands) if commands else
            "Command not recorded in config.json")
    return f"<p class='provenance'>{html.escape(version)}. {made}. {html.escape(use)}</p>"


def _command_line(argv: list[str]) -> str:
    """config.json's sys.argv as a shell would take it, the entry point's path shortened to `cxr`."""
    entry = Path(argv[0]).name in ("cxr", "__main__.py")
    return shlex.join(["cxr", *argv[1:]] if entry else argv)
