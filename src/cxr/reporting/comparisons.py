"""The report's paired tests between tasks (comparisons.json) and the conclusions drawn from them."""

from __future__ import annotations

import html
from pathlib import Path

from ..config import CLASSES
from ..errors import CxrError
from .adaptation_section import _markdown_table_cells
from .html_page import _html_table
from .sections import _pct


def paired_comparisons(out: Path, rows: list[dict]) -> tuple[dict, str | None]:
    """{set: compare.compare_runs result} between the tasks, on the test split and on every external
    set all of them were evaluated on; (and why not, when the images cannot be read from here)."""
    from ..evaluation.compare import compare_runs, holm_across

    if len(rows) < 2:
        return {}, None
    sets = [None] + sorted(set.intersection(*(set(r["externals"]) for r in rows)))
    try:
        return holm_across({s or "test": compare_runs([Path(r["dir"]) for r in rows], s) for s in sets}), None
    except CxrError as e:
        return {}, f"Paired tests between the tasks were not computed: {e}"


def _difference_sentence(a: str, b: str, comparisons: dict) -> str | None:
    """What the paired test on the test split says about task a against task b, in one clause."""
    result = comparisons.get("test")
    if not result:
        return None
    n = sum(result["images"].values())
    for pair in result["pairs"]:
        names = (Path(pair["a"]).name, Path(pair["b"]).name)
        if set(names) != {a, b}:
            continue
        t = pair["tests"]["accuracy"]
        sign = 1 if names[0] == a else -1
        d, ci = sign * t["difference"], sorted(sign * c for c in t["ci"])
        verdict = ("a difference" if t["p_holm"] < 0.05 else f"no difference measurable on {n} images")
        return (f"against {b}: {100 * d:+.1f} points (95% CI {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}, McNemar "
                f"p = {t['p']:.2g}, Holm-adjusted {t['p_holm']:.2g}): {verdict}")
    return None


def conclusions(rows: list[dict], comparisons: dict | None = None) -> list[str]:
    """Plain sentences, each computed from the numbers it states; "better" only where the paired,
    Holm-corrected test on the same images says so."""
    out = []
    scored = [r for r in rows if r["metrics"]["accuracy"] is not None]
    if len(scored) > 1:
        best = max(r["metrics"]["accuracy"] for r in scored)
        leaders = [r["task"] for r in scored if r["metrics"]["accuracy"] == best]
        clauses = [_difference_sentence(leaders[0], r["task"], comparisons or {}) for r in scored
                   if r["task"] not in leaders]
        clauses = [c for c in clauses if c]
        out.append(f"Highest test accuracy: {' and '.join(leaders)} ({_pct(best)})"
                   + ("; " + "; ".join(clauses) if clauses else "") + ".")
    for r in rows:
        pc = r["metrics"]["per_class"]
        classes = r.get("classes", CLASSES)
        if classes != CLASSES:
            parts = [f"{_pct(pc[c]['accuracy'])} of {c.lower()} images ({pc[c]['correct']}/{pc[c]['total']})"
                     for c in reversed(classes)] if len(classes) == 2 else \
                [f"{_pct(pc[c]['accuracy'])} of {c.lower()} images ({pc[c]['correct']}/{pc[c]['total']})" for c in classes]
            out.append(f"{r['task']} recognises " + ", ".join(parts[:-1]) + f" and {parts[-1]}.")
            continue
        sens, spec = pc["PNEUMONIA"], pc["NORMAL"]
        out.append(f"{r['task']} recognises {_pct(sens['accuracy'])} of pneumonia images ({sens['correct']}/"
                   f"{sens['total']}) and {_pct(spec['accuracy'])} of normal images ({spec['correct']}/{spec['total']}).")
        if sens["accuracy"] is not None and spec["accuracy"] is not None and spec["accuracy"] < sens["accuracy"] - 0.1:
            gap = 100 * (sens["accuracy"] - spec["accuracy"])
            out.append(f"{r['task']} over-calls pneumonia: its NORMAL accuracy is {gap:.1f} points below its "
                       "PNEUMONIA accuracy.")
    lows = []
    for r in rows:
        losses = [float(h["val_loss"]) for h in r["history"]]
        i = min(range(len(losses)), key=losses.__getitem__)
        lows.append((losses[i], r["task"], int(r["history"][i]["epoch"])))
    if len(lows) > 1:
        lows.sort()
        parts = ", ".join(f"{t} {v:.4f} at epoch {e}" for v, t, e in lows)
        out.append(f"Lowest validation loss, best first: {parts}.")
    return out


def _comparison_markdown(comparisons: dict | None, note: str | None) -> list[str]:
    from ..evaluation.compare import comparison_table

    if note:
        return [note, ""]
    parts = []
    for name, result in (comparisons or {}).items():
        parts += [f"## Is the difference real? Paired tests on {name}", "", comparison_table(result), ""]
    return parts


def _comparison_html(comparisons: dict | None, note: str | None) -> list[str]:
    from ..evaluation.compare import comparison_table

    if note:
        return [f"<p>{html.escape(note)}</p>"]
    parts = []
    for name, result in (comparisons or {}).items():
        head, body, rest = _markdown_table_cells(comparison_table(result))
        parts += [f"<h2>Is the difference real? Paired tests on {html.escape(name)}</h2>",
                  f"<p>{html.escape(rest)} Each task at its own stored threshold; A - B on the same images.</p>",
                  _html_table(head, body)]
    return parts
