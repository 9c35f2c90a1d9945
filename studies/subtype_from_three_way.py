"""The subtype question answered by a three-way model: among pneumonia images, P(BACTERIAL |
pneumonia) = P(BACTERIAL) / (P(BACTERIAL) + P(VIRAL)) from each run's predictions files, scored like
a --labels subtype run (ROC AUC, and accuracy, bacterial and viral recall at 0.5), mean over runs.

    python studies/subtype_from_three_way.py runs/threeway/scratch-robust/seed* --set test --set official_half
"""

from __future__ import annotations

import argparse
import json
import csv
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score


def score(path: Path) -> dict[str, float]:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["true_label"] != "NORMAL"]
    y = np.array([r["true_label"] == "BACTERIAL" for r in rows], dtype=int)
    b = np.array([float(r["prob_bacterial"]) for r in rows])
    v = np.array([float(r["prob_viral"]) for r in rows])
    p = b / (b + v)
    called = p >= 0.5
    return {"images": len(y), "roc_auc": roc_auc_score(y, p), "accuracy": float((called == y).mean()),
            "bacterial recall": float(called[y == 1].mean()), "viral recall": float((~called)[y == 0].mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="task folders of --labels three-way runs")
    p.add_argument("--set", action="append", default=None, help="test (the run's own split) or an external set NAME")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    figures = {}
    for name in args.set or ["test"]:
        file = "predictions.csv" if name == "test" else f"predictions_{name}.csv"
        scores = [score(run / file) for run in args.runs]
        cells = ", ".join(f"{k} {np.mean([s[k] for s in scores]):.3f} ± {np.std([s[k] for s in scores], ddof=1):.3f}"
                          for k in scores[0] if k != "images")
        print(f"{name} ({scores[0]['images']} pneumonia images, {len(scores)} runs): {cells}")
        figures[name] = scores
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
