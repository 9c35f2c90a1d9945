"""The table of studies/both_hospitals.sh: per seed, the source and the model fitted at nih_half on
each site's sets (accuracy, specificity, sensitivity at the model's own operating point; ROC AUC), then
the mean over seeds. NIH is scored only where it is not trained on: the source on all of nih_half, the
fitted model by its 5-fold estimate (KFOLD=1) and otherwise not at all (the held-back half scores it).

    python studies/both_hospitals_table.py runs/both [--json table.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

SETS = ("nih_half", "official_test_half", "dev-test")


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


def table(out: Path) -> list[dict]:
    """One row per seed and model, then the mean over seeds: (acc, spec, sens, AUC) per set, or None."""
    rows, means = [], {}
    for src in sorted(out.glob("src*/scratch-robust")):
        seed = src.parent.name.removeprefix("src")
        fit = out / f"fit{seed}"
        models = {"source": (cell(src / "metrics_nih_half.json"), cell(src / "metrics_official_test_half.json"),
                             cell(src / "metrics.json")),
                  "fitted (defaults)": (kfold(out / f"eval{seed}", "finetune-all+replay0.5"),
                                        cell(fit / "metrics_official_test_half.json"), cell(fit / "metrics.json"))}
        for model, cells in models.items():
            rows.append({"seed": seed, "model": model, **dict(zip(SETS, cells))})
            means.setdefault(model, []).append(cells)
    for model, runs in means.items():
        cols = []
        for i in range(len(SETS)):
            got = [r[i] for r in runs if r[i] is not None]
            cols.append(None if not got else tuple(statistics.fmean(v) for v in zip(*got)))
        rows.append({"seed": f"mean of {len(runs)}", "model": model, **dict(zip(SETS, cols))})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, nargs="?", default=Path("runs/both"),
                   help="the OUT folder of studies/both_hospitals.sh (default: runs/both)")
    p.add_argument("--json", type=Path, help="also write the rows here (acc / spec / sens in %%, AUC; null: not measured)")
    args = p.parse_args()
    rows = table(args.out)
    print("| seed | model | " + " | ".join(f"{s}: acc / spec / sens / AUC" for s in SETS) + " |")
    print("|---|---|" + "---|" * len(SETS))
    for r in rows:
        print(f"| {r['seed']} | {r['model']} | " + " | ".join(text(r[s]) for s in SETS) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
