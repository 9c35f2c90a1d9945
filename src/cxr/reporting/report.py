"""Run folders in, `summary.json`, `report.md` and a self-contained `report.html` out.

Reads files only; never trains or evaluates. Every sentence of conclusion is generated from the
numbers in those files, so the text cannot contradict the tables. The sections live beside it:
`provenance` (the first line: version, command, intended use), `sections` (the study's tables and
notes), `comparisons` (paired tests and conclusions), `adaptation_section`, `trust_section` (where
this model can be trusted), `html_page` (the HTML shell) and `seeded` (a multi-seed folder).
"""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path

from ..config import CLASSES
from ..data.labels import question
from ..files import write_json, write_text
from .adaptation_section import _markdown_table_cells, adaptation_note
from .comparisons import (
    _comparison_html,
    _comparison_markdown,
    conclusions,
    paired_comparisons,
)
from .html_page import _CSS, ZOOM, _html_table, _img
from .provenance import provenance_html, provenance_markdown
from .sections import (
    ECE_NOTE,
    ECE_NOTE_MULTICLASS,
    READING_NOTE,
    _classes,
    _config_text,
    _ece_text,
    _pct,
    backbone_note,
    clinical_cells,
    comparison_cells,
    data_check_note,
    evaluation_cells,
    external_note,
    few_validation_note,
    find_tasks,
    markdown_table,
    per_class_cells,
    reading_cells,
    resampled_units,
    robustness_cells,
    sample_note,
    setting,
    sites_note,
    skipped_note,
    task_figures,
    task_row,
)
from .seeded import write_seeded_report
from .trust_section import trust_html, trust_markdown


def build_markdown(rows: list[dict], data_summary: str, comparisons: dict | None = None,
                   comparison_note: str | None = None, skipped: str | None = None) -> str:
    head, body = comparison_cells(rows)
    many = len(_classes(rows)) > 2
    parts = [f"# cxr report: {question(_classes(rows))}, ResNet-18", "", provenance_markdown(rows), "",
             *([f"**{sample_note(rows)}**", ""] if sample_note(rows) else []),
             *([sites_note(rows), ""] if sites_note(rows) else []),
             *([backbone_note(rows), ""] if backbone_note(rows) else []),
             *([f"**{skipped}**", ""] if skipped else []),
             "Test metrics of each task's kept epoch (lowest validation loss, highest validation AUC or the last, "
             "as the task says; validation is split from train by patient). "
             + ("The decision is the class of highest probability." if many else
                f"Decision threshold on P({_classes(rows)[1]}) set by the task's rule (Youden's J on validation, or "
                "0.5) and stored in the checkpoint."), "",
             markdown_table(head, body), "",
             *([f"**{few_validation_note(rows)}**", ""] if few_validation_note(rows) else []),
             *[f"- {s}" for s in conclusions(rows, comparisons)], "",
             *_comparison_markdown(comparisons, comparison_note),
             f"## Every evaluation set (threshold of the task's rule; 95% bootstrap intervals, {resampled_units(rows)})",
             "",
             markdown_table(*evaluation_cells(rows)), "",
             *(["Each class against the rest:", "", markdown_table(*per_class_cells(rows)), ""] if many else []),
             *(["## The pneumonia reading (P(PNEUMONIA) = 1 - P(NORMAL))", "", READING_NOTE, "",
                markdown_table(*reading_cells(rows)), ""] if reading_cells(rows) else []),
             data_check_note(rows), "",
             *([external_note(rows), ""] if external_note(rows) else []),
             *([adaptation_note(rows), ""] if adaptation_note(rows) else []),
             *([f"## Clinical metrics (test, 95% bootstrap intervals, 1,000 resamples: {resampled_units(rows, True)})",
                "", markdown_table(*clinical_cells(rows)), "", ECE_NOTE, ""] if not many else
               [f"Calibration (test): {_ece_text(rows)}. {ECE_NOTE_MULTICLASS}", ""]),
             "![validation loss per task](figures/compare_loss.png)", "",
             *(["## Robustness to acquisition shifts (test split, `cxr robustness`)", "",
                markdown_table(*robustness_cells(rows)), ""] if robustness_cells(rows) else []),
             *trust_markdown(rows),
             "## Data", "", "```", data_summary, "```", "", "## Tasks", ""]
    for r in rows:
        parts += [f"### {r['task']}", "", f"Config: {_config_text(r['config'])}", ""]
        if r.get("kfold_table"):
            parts += ["Fitting at the site, measured by k folds of its patients (`cxr adapt --evaluate`):", "",
                      r["kfold_table"].strip(), ""]
        parts += [f"![{title}]({r['task']}/figures/{name})" for name, title in task_figures(r)
                  if (Path(r["dir"]) / "figures" / name).is_file()]
        parts.append("")
    return "\n".join(parts) + "\n"


def build_html(rows: list[dict], data_summary: str, out: Path, comparisons: dict | None = None,
               comparison_note: str | None = None, skipped: str | None = None) -> str:
    head, body = comparison_cells(rows)
    many = len(_classes(rows)) > 2
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>cxr report</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>cxr report: {html.escape(question(_classes(rows)))}, ResNet-18</h1>", provenance_html(rows),
             *([f"<p class='sample'><strong>{html.escape(sample_note(rows))}</strong></p>"] if sample_note(rows) else []),
             *([f"<p class='sites'>{html.escape(sites_note(rows))}</p>"] if sites_note(rows) else []),
             *([f"<p class='backbone'>{html.escape(backbone_note(rows))}</p>"] if backbone_note(rows) else []),
             *([f"<p class='skipped'><strong>{html.escape(skipped)}</strong></p>"] if skipped else []),
             f"<p>Generated {stamp} from the files in this folder. Test metrics are those of each task's kept "
             "epoch (lowest validation loss, highest validation AUC or the last, as the task says; validation is "
             "split from train by patient), "
             + ("decided by the highest class probability.</p>" if many else "at the decision threshold of the "
                "task's rule (Youden's J on validation, or 0.5).</p>"),
             "<h2>Comparison</h2>", _html_table(head, body),
             *([f"<p class='few'><strong>{html.escape(few_validation_note(rows))}</strong></p>"]
               if few_validation_note(rows) else []),
             "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in conclusions(rows, comparisons)) + "</ul>",
             *_comparison_html(comparisons, comparison_note),
             *([f"<h2>Clinical metrics</h2><p>Test split; 95% bootstrap intervals (1,000 resamples: "
                f"{resampled_units(rows, True)}; a patient's images move together, since they are not independent); "
                "each metric at threshold 0.5 and at the stored threshold.</p>",
                _html_table(*clinical_cells(rows)), f"<p>{html.escape(ECE_NOTE)}</p>"] if not many else []),
             "<h2>Every evaluation set</h2><p>Each task on the test split and every external set, at the "
             f"stored threshold; 95% bootstrap intervals, {resampled_units(rows)}.</p>",
             _html_table(*evaluation_cells(rows))]
    if many:
        parts += ["<h3>Each class against the rest</h3>", _html_table(*per_class_cells(rows)),
                  f"<p>Calibration (test): {html.escape(_ece_text(rows))}. {html.escape(ECE_NOTE_MULTICLASS)}</p>"]
    if reading_cells(rows):
        parts += ["<h2>The pneumonia reading</h2>", f"<p>{html.escape(READING_NOTE)}</p>",
                  _html_table(*reading_cells(rows))]
    parts.append(f"<p class='checks'>{html.escape(data_check_note(rows))}</p>")
    if external_note(rows):
        parts.append(f"<p>{html.escape(external_note(rows))}</p>")
    if adaptation_note(rows):
        parts.append(f"<p class='adaptation'>{html.escape(adaptation_note(rows))}</p>")
    compare = out / "figures" / "compare_loss.png"
    if compare.is_file():
        parts.append(_img(compare, "Validation loss of every task"))
    robust = robustness_cells(rows)
    if robust:
        parts += ["<h2>Robustness to acquisition shifts</h2><p>Test split under brightness, contrast, gamma, "
                  "stretching, blur, noise, JPEG, resampling, zoom and rotation shifts at three severities "
                  "(<code>cxr robustness</code>), at the stored threshold.</p>", _html_table(*robust)]
    parts += trust_html(rows)
    parts += ["<h2>Data</h2>", f"<pre>{html.escape(data_summary)}</pre>"]
    for r in rows:
        m = r["metrics"]
        cfg = r["config"]["config"]
        parts += [f"<section class='task'><h2>{html.escape(r['task'])}</h2>",
                  _html_table(["setting", "value"], [[k.replace("_", " "), setting(v)] for k, v in cfg.items()]),
                  _html_table(["class", "accuracy", "correct", "total"],
                              [[c, _pct(m["per_class"][c]["accuracy"]), str(m["per_class"][c]["correct"]),
                                str(m["per_class"][c]["total"])] for c in r.get("classes", CLASSES)])]
        if r.get("kfold_table"):
            head, body, rest = _markdown_table_cells(r["kfold_table"])
            parts += ["<h3>Fitting at the site, measured by k folds of its patients</h3>", _html_table(head, body),
                      f"<p>{html.escape(rest)}</p>"]
        for name, title in task_figures(r):
            path = Path(r["dir"]) / "figures" / name
            if path.is_file():
                parts.append(_img(path, f"{r['task']}: {title}"))
        parts.append("</section>")
    parts += [ZOOM, "</body></html>"]
    return "\n".join(parts)


def write_report(out: Path, tasks: list[str] | None = None) -> dict:
    """Write OUT/summary.json (task -> metrics.json content, and "external": task -> set name ->
    metrics_NAME.json content when external sets were evaluated; "timings": OUT/timings.json, written
    by `cxr run`), OUT/comparisons.json (paired tests between the tasks, compare.py) when there are
    several tasks, OUT/report.md and OUT/report.html."""
    out = Path(out)
    if tasks is None:
        from ..evaluation.seeds import check_layout, seeded_runs

        check_layout(out, None)

        seeded = seeded_runs(out)
        if seeded and not any((out / t / "metrics.json").is_file() for t in seeded):
            return write_seeded_report(out, seeded)
    tasks = tasks or find_tasks(out)
    rows = []
    for t in tasks:
        row = task_row(out / t)
        row["dir"] = str(out / t)
        rows.append(row)
    summary = {r["task"]: r["metrics"] for r in rows}
    if any(r["externals"] for r in rows):  # "external" is no task name, so it cannot collide
        summary["external"] = {r["task"]: r["externals"] for r in rows}
    if (out / "timings.json").is_file():  # where `cxr run` spent its time
        summary["timings"] = json.loads((out / "timings.json").read_text())
    data_summary = rows[0]["config"].get("data_summary", "") if rows else ""
    comparisons, note = paired_comparisons(out, rows)
    if comparisons:  # what the report's conclusions rest on
        write_json(out / "comparisons.json", comparisons)
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", build_markdown(rows, data_summary, comparisons, note, skipped_note(out)))
    write_text(out / "report.html", build_html(rows, data_summary, out, comparisons, note, skipped_note(out)))
    return summary
