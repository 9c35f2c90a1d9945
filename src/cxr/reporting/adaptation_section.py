"""The report's notes on adapted runs: which sets the adaptation was fitted on, and the k-fold
table `cxr adapt --evaluate` wrote (adapt_evaluation.md), read back into cells."""

from __future__ import annotations

from ..training.operating_point import OperatingPoint
from .card import describe_adaptation


def adaptation_note(rows: list[dict]) -> str | None:
    """What `cxr adapt` changed in each adapted task, on which site images, and which evaluation
    sets are those same images (optimistic)."""
    notes = []
    for r in rows:
        a = r.get("adaptation")
        if not a:
            continue
        op = OperatingPoint.from_dict(a["operating_point"])
        sets = [("test", r["metrics"]), *r.get("externals", {}).items()]
        same = [f"{name} ({m['set']['adaptation_images']} of {m['n']} images)" for name, m in sets
                if m.get("set", {}).get("adaptation_images")]
        notes.append(f"{r['task']} is adapted by cxr adapt from {a['source_run']} on {a['date']} (batch norm: "
                     f"{a['batch_norm']}): {describe_adaptation(a)}; threshold {op.threshold:.3f} "
                     f"({op.rule}) and temperature {op.temperature:.3f}"
                     + (f"; {', '.join(same)} holds images the adaptation was fitted on (same file content), so "
                        "its numbers are optimistic" if same else "") + ".")
    return " ".join(notes) or None


def _markdown_table_cells(text: str) -> tuple[list[str], list[list[str]], str]:
    """(head, body, the text after the table) of a markdown table such as adapt_evaluation.md."""
    lines = text.strip().splitlines()
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines if ln.startswith("|")]
    rest = " ".join(ln for ln in lines if ln.strip() and not ln.startswith("|"))
    return rows[0], [r for r in rows[1:] if not set("".join(r)) <= set("-: ")], rest
