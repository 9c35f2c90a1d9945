"""Run folders in, `summary.json` and `report.md` out. Reads files only: never trains or evaluates."""

from __future__ import annotations

import json
from pathlib import Path

from .config import CLASSES
from .files import read_csv, write_json, write_text


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def task_row(run_dir: Path) -> dict:
    """What the comparison table shows for one task folder."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = read_csv(run_dir / "history.csv")
    return {
        "task": run_dir.name,
        "metrics": metrics,
        "best_epoch": metrics["checkpoint"]["epoch"],
        "epochs": len(history),
        "train_seconds": sum(float(r["seconds"]) for r in history),
    }


def markdown_table(rows: list[dict]) -> str:
    head = ["task", "test accuracy", *(f"{c} accuracy (correct/total)" for c in CLASSES), "ROC AUC",
            "best epoch", "training time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["metrics"]
        per_class = [f"{_pct(m['per_class'][c]['accuracy'])} ({m['per_class'][c]['correct']}/"
                     f"{m['per_class'][c]['total']})" for c in CLASSES]
        auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}"
        lines.append("| " + " | ".join([r["task"], f"{_pct(m['accuracy'])} (n={m['n']})", *per_class, auc,
                                        f"{r['best_epoch']} of {r['epochs']}", f"{r['train_seconds']:.0f} s"]) + " |")
    return "\n".join(lines)


def write_report(out: Path, tasks: list[str]) -> dict:
    """Write OUT/summary.json (task -> metrics.json content) and OUT/report.md; return the summary."""
    out = Path(out)
    rows = [task_row(out / t) for t in tasks]
    summary = {r["task"]: r["metrics"] for r in rows}
    configs = {t: json.loads((out / t / "config.json").read_text()) for t in tasks}
    data_summary = next(iter(configs.values()), {}).get("data_summary", "")
    parts = [
        "# cxr report: pneumonia vs normal, ResNet-18",
        "",
        "Test metrics of each task's best epoch (lowest validation loss; validation is split from "
        "train by patient). Threshold 0.5 on P(PNEUMONIA).",
        "",
        markdown_table(rows),
        "",
        "## Data",
        "",
        "```",
        data_summary,
        "```",
        "",
        "## Configuration",
        "",
    ]
    for t, c in configs.items():
        settings = ", ".join(f"{k}={v}" for k, v in c["config"].items() if k != "task")
        parts.append(f"- **{t}**: {settings}")
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", "\n".join(parts) + "\n")
    return summary
