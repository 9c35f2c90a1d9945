"""MkDocs hook: the command-line reference, generated from cxr's argparse parser at build time, so
that it lists every command and option with its help text and cannot drift from the code.
`reference/cli.md` holds the marker CLI_REFERENCE where the generated text goes."""

from __future__ import annotations

import argparse
import html

MARKER = "<!-- CLI_REFERENCE -->"


def _cell(text: str) -> str:
    # brackets escaped: help text such as "[a,b]" is no Markdown link or cross-reference
    return (html.escape(" ".join(text.split())).replace("|", "\\|").replace("[", "\\[").replace("]", "\\]"))


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    rows = ["| option | what it does |", "| --- | --- |"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            names = ", ".join(f"`{s}`" for s in action.option_strings)
            if action.nargs != 0:
                names += f" `{formatter._format_args(action, formatter._get_default_metavar_for_optional(action))}`"
        else:
            names = f"`{formatter._format_args(action, formatter._get_default_metavar_for_positional(action))}`"
        rows.append(f"| {names} | {_cell(formatter._expand_help(action) if action.help else '')} |")
    return rows


def reference() -> str:
    from cxr.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = ["Every command of `cxr` with its options, generated from the parser (`cxr COMMAND --help` prints "
           "the same).", "", "| command | what it does |", "| --- | --- |"]
    out += [f"| [`cxr {name}`](#cxr-{name}) | {_cell(helps.get(name) or '')} |" for name in sub.choices]
    out += ["", "## cxr", "", "```text", parser.format_usage().strip(), "```", "", *_options_table(parser), ""]
    for name, p in sub.choices.items():
        out += [f"## cxr {name}", ""]
        if p.description:
            out += [_cell(p.description), ""]
        out += ["```text", p.format_usage().strip(), "```", "", *_options_table(p), ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, reference())
    return markdown
