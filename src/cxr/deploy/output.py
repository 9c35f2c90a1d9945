"""What `cxr predict` prints and writes: the table, the summary line, and the CSV or JSON file."""

from __future__ import annotations

from pathlib import Path

from ..config import CLASSES
from ..files import write_csv, write_json
from ..trust.ood import FLAG_WARNING
from .predict import Model


def write_records(path: Path, records: list[dict], model: Model) -> None:
    path = Path(path)
    if path.suffix.lower() == ".json":
        write_json(path, {"checkpoint_task": model.task, "classes": list(model.classes), "threshold": model.threshold,
                          "temperature": model.temperature, "operating_point": model.describe_operating_point(),
                          "adaptation": model.adaptation, "out_of_distribution": model.describe_trust(),
                          "warnings": model.warnings(), "predictions": records})
    else:
        fields = model.fields + (["cam_file"] if any("cam_file" in r for r in records) else [])
        write_csv(path, fields, ([("" if r.get(f) is None else r[f]) for f in fields] for r in records))


def format_table(records: list[dict], keys: list[str] | None = None) -> str:
    """The CLI's table: file, probabilities, the out-of-distribution score (`!` when flagged) and
    the label; a flagged image's warning follows the table."""
    keys = keys or ["prob_pneumonia"]
    width = min(70, max([len(r["path"]) for r in records] + [4]))
    heads = [f"P({k.removeprefix('prob_')})" for k in keys]
    cols = [max(12, len(h)) for h in heads]
    lines = [f"{'file':<{width}}  " + "  ".join(f"{h:>{c}}" for h, c in zip(heads, cols)) + "  ood score  label"]
    flagged = []
    for r in records:
        name = r["path"] if len(r["path"]) <= width else "..." + r["path"][-(width - 3):]
        if r["error"]:
            lines.append(f"{name:<{width}}  " + "  ".join(f"{'-':>{c}}" for c in cols) + f"  {'-':>9}  ERROR: "
                         f"{r['error']}")
            continue
        score = r.get("ood_score")
        shown = "n/a" if score is None else f"{score:.2f}" + ("!" if r.get("in_distribution") is False else " ")
        lines.append(f"{name:<{width}}  " + "  ".join(f"{r[k]:>{c}.4f}" for k, c in zip(keys, cols))
                     + f"  {shown:>9}  {r['label']}")
        if r.get("in_distribution") is False:
            flagged.append(r["path"])
    if flagged:
        lines.append(f"! {len(flagged)} image(s) flagged: {FLAG_WARNING} ({', '.join(flagged[:3])}"
                     + (", ..." if len(flagged) > 3 else "") + ")")
    return "\n".join(lines)


def summary_line(records: list[dict], classes=CLASSES) -> str:
    failed = sum(1 for r in records if r["error"])
    called = [f"{sum(1 for r in records if r['label'] == c)} {c}" for c in classes[1:]] if len(classes) == 2 else \
        [f"{sum(1 for r in records if r['label'] == c)} {c}" for c in classes]
    flagged = sum(1 for r in records if r.get("in_distribution") is False)
    return (f"{len(records) - failed} predicted ({', '.join(called)}), {failed} failed"
            + (f", {flagged} flagged as unlike the training images" if flagged else ""))
