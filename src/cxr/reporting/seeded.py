"""The report of a multi-seed output folder: mean ± sd over seeds, the paired tests on
seed-averaged probabilities, each seed's own tables."""

from __future__ import annotations

import html
from pathlib import Path

from ..config import CLASSES
from ..data.labels import question
from ..errors import CxrError
from ..files import write_json, write_text
from .adaptation_section import _markdown_table_cells
from .comparisons import _comparison_html, _comparison_markdown
from .html_page import _CSS, ZOOM, _html_table, _img
from .provenance import provenance_html, provenance_markdown
from .trust_section import trust_html, trust_markdown
from .sections import (
    _classes,
    _read_json,
    comparison_cells,
    data_check_note,
    evaluation_cells,
    few_validation_note,
    markdown_table,
    sample_note,
    task_figures,
    task_row,
)


def _seed_spread_table(comparisons: dict) -> list[str]:
    """Markdown: per pair and set, the spread of the per-seed differences (A seed K - B seed K)."""
    lines = ["| A | B | set | metric | seeds | mean | sd | min | max |", "|---|---|---|---|---|---|---|---|---|"]
    for name, result in comparisons.items():
        for pair in result["pairs"]:
            d = pair["seed_differences"]
            for metric in ("accuracy", "roc_auc"):
                c, pct = d[metric], 1 if metric == "roc_auc" else 100
                fmt = (lambda x: f"{x:+.3f}") if metric == "roc_auc" else (lambda x: f"{pct * x:+.1f}")
                if c["mean"] is None:  # undefined on this set (one class)
                    lines.append(f"| {pair['a']} | {pair['b']} | {name} | {metric} | {len(d['seeds'])} | n/a | n/a | "
                                 "n/a | n/a |")
                    continue
                lines.append(f"| {pair['a']} | {pair['b']} | {name} | {metric} | {len(d['seeds'])} | {fmt(c['mean'])} | "
                             f"{abs(pct * c['sd']):.3g} | {fmt(c['min'])} | {fmt(c['max'])} |")
    return lines


def write_seeded_report(out: Path, seeded: dict[str, dict[int, Path]]) -> dict:
    """The report of a multi-seed output folder (seeds.py): it leads with mean ± sd over seeds and
    the paired tests on seed-averaged probabilities; each seed's own tables follow, and the
    figures and the trust section of each task's first seed (every seed's files are in its folder)."""
    from ..evaluation.compare import holm_across
    from ..evaluation.seeds import (
        aggregate,
        aggregate_table,
        seed_comparisons,
        seed_sentences,
    )

    out = Path(out)
    rows = []
    for task, by_seed in seeded.items():
        for seed, d in sorted(by_seed.items()):
            row = task_row(d)
            row.update(task=f"{task} seed{seed}", dir=str(d), base=task, first=seed == min(by_seed))
            rows.append(row)
    agg = aggregate(seeded)
    write_json(out / "aggregate.json", agg)
    comparisons, note = {}, None
    if len(seeded) > 1:
        sets = [None] + sorted(set.intersection(*(set(r["externals"]) for r in rows)))
        try:
            comparisons = holm_across({s or "test": seed_comparisons(seeded, s) for s in sets})
            write_json(out / "comparisons.json", comparisons)
        except CxrError as e:
            note = f"Paired tests between the tasks were not computed: {e}"
    seeds = sorted({k for by_seed in seeded.values() for k in by_seed})
    timings = _read_json(out / "timings.json") or {}
    train_s = sum(v for t in timings.values() if isinstance(t, dict) for k, v in t.items() if k.endswith(": train"))
    lead = (f"Every task trained once per seed ({', '.join(map(str, seeds))}); each seed is a complete run in "
            "OUT/<task>/seed<K>/ with its own patient split, init and batch order. Mean ± sd (n - 1) [min-max] "
            "over seeds at each task's stored threshold"
            + (f"; training took {train_s / 60:.1f} min in all" if train_s else "") + ".")
    classes = _classes(rows)
    titles = {} if classes == CLASSES else {"sensitivity": f"sensitivity ({classes[1]} recall)",
                                            "specificity": f"specificity ({classes[0]} recall)"}
    table = aggregate_table(agg, titles=titles) if len(classes) <= 2 else aggregate_table(
        agg, ("accuracy", "balanced_accuracy", "roc_auc", *(f"sensitivity_{c.lower()}" for c in classes),
              *(("pneumonia_accuracy", "pneumonia_roc_auc") if "NORMAL" in classes else ())))
    sentences = seed_sentences(agg, comparisons)
    spread = _seed_spread_table(comparisons) if comparisons else []
    data_summary = rows[0]["config"].get("data_summary", "") if rows else ""
    shown = [r for r in rows if r["first"]]
    md = [f"# cxr report: {question(classes)}, ResNet-18, several seeds", "", provenance_markdown(rows), "",
          *([f"**{sample_note(rows)}**", ""] if sample_note(rows) else []), lead, "", table, "",
          *[f"- {x}" for x in sentences], "", *_comparison_markdown(comparisons, note),
          *(["Per-seed differences (A seed K minus B seed K):", "", *spread, ""] if spread else []),
          "## Each seed", "", markdown_table(*comparison_cells(rows)), "",
          *([f"**{few_validation_note(rows)}**", ""] if few_validation_note(rows) else []),
          markdown_table(*evaluation_cells(rows)), "", data_check_note(rows), "",
          *trust_markdown(shown), "## Data", "", "```", data_summary, "```", "", "## Figures (each task's first seed)", ""]
    for r in shown:
        md += [f"### {r['task']}", ""] + [f"![{title}]({Path(r['dir']).relative_to(out)}/figures/{name})"
                                          for name, title in task_figures(r)
                                          if (Path(r["dir"]) / "figures" / name).is_file()] + [""]
    html_parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>cxr report</title>"
                  f"<style>{_CSS}</style></head><body>",
                  f"<h1>cxr report: {html.escape(question(classes))}, ResNet-18, several seeds</h1>",
                  provenance_html(rows), *([f"<p class='sample'><strong>{html.escape(sample_note(rows))}</strong></p>"]
                                  if sample_note(rows) else []),
                  f"<p>{html.escape(lead)}</p>", _html_table(*_markdown_table_cells(table)[:2]),
                  "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in sentences) + "</ul>",
                  *_comparison_html(comparisons, note)]
    if spread:
        html_parts += ["<p>Per-seed differences (A seed K minus B seed K):</p>",
                       _html_table(*_markdown_table_cells("\n".join(spread))[:2])]
    html_parts += ["<h2>Each seed</h2>", _html_table(*comparison_cells(rows)),
                   *([f"<p class='few'><strong>{html.escape(few_validation_note(rows))}</strong></p>"]
                     if few_validation_note(rows) else []), _html_table(*evaluation_cells(rows)),
                   f"<p class='checks'>{html.escape(data_check_note(rows))}</p>", *trust_html(shown),
                   "<h2>Data</h2>", f"<pre>{html.escape(data_summary)}</pre>"]
    for r in shown:
        html_parts.append(f"<section class='task'><h2>{html.escape(r['task'])}</h2>")
        html_parts += [_img(Path(r["dir"]) / "figures" / name, f"{r['task']}: {title}") for name, title in
                       task_figures(r) if (Path(r["dir"]) / "figures" / name).is_file()]
        html_parts.append("</section>")
    html_parts += [ZOOM, "</body></html>"]
    summary = {"aggregate": agg, "seeds": seeds,
               "runs": {r["task"]: r["metrics"] for r in rows}, **({"timings": timings} if timings else {})}
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", "\n".join(md) + "\n")
    write_text(out / "report.html", "\n".join(html_parts))
    return summary
