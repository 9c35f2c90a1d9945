"""The table of studies/both_hospitals.sh: per seed, the source and the model fitted at nih_half on
each site's sets (accuracy, specificity, sensitivity at the model's own operating point; ROC AUC), then
the mean over seeds. NIH is scored only where it is not trained on: the source on all of nih_half, the
fitted model by its 5-fold estimate (KFOLD=1) and otherwise not at all (the held-back half scores it).
    python studies/both_hospitals_table.py OUT"""

import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/both")


def cell(path: Path) -> tuple[float, ...] | None:
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    per = m["per_class"]
    return (100 * m["accuracy"], 100 * per["NORMAL"]["accuracy"], 100 * per["PNEUMONIA"]["accuracy"], m["roc_auc"])


def text(values) -> str:
    return "-" if values is None else "{:.1f} / {:.1f} / {:.1f} / {:.3f}".format(*values)


def kfold(folder: Path, variant: str) -> tuple[float, ...] | None:
    path = folder / "adapt_evaluation.json"
    if not path.is_file():
        return None
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    r = rows.get(variant)
    if r is None:
        return None
    return tuple(f * r[k]["value"] for f, k in ((100, "accuracy"), (100, "specificity"), (100, "sensitivity"), (1, "roc_auc")))


sets = ("nih_half", "official_test_half", "dev-test")
print("| seed | model | " + " | ".join(f"{s}: acc / spec / sens / AUC" for s in sets) + " |")
print("|---|---|" + "---|" * len(sets))
means: dict[str, list] = {}
for src in sorted(out.glob("src*/scratch-robust")):
    seed = src.parent.name.removeprefix("src")
    fit = out / f"fit{seed}"
    rows = {"source": (cell(src / "metrics_nih_half.json"), cell(src / "metrics_official_test_half.json"),
                       cell(src / "metrics.json")),
            "fitted (defaults)": (kfold(out / f"eval{seed}", "finetune-all+replay0.5"),
                                  cell(fit / "metrics_official_test_half.json"), cell(fit / "metrics.json"))}
    for model, cells in rows.items():
        print(f"| {seed} | {model} | " + " | ".join(text(c) for c in cells) + " |")
        means.setdefault(model, []).append(cells)
for model, runs in means.items():
    cols = []
    for i in range(len(sets)):
        got = [r[i] for r in runs if r[i] is not None]
        cols.append(None if not got else tuple(statistics.fmean(v) for v in zip(*got)))
    print(f"| mean of {len(runs)} | {model} | " + " | ".join(text(c) for c in cols) + " |")
