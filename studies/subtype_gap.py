"""Why bacterial and viral pneumonia separate far better on the official test split than inside the
training images: simple image statistics per subtype and split, and how well each one alone tells
the subtypes apart (ROC AUC of the statistic, direction chosen on train, so 0.5 = no signal).

    python studies/subtype_gap.py [--data ../shared/data]

Statistics of the 224x224 grayscale images as the data set ships them (its resize squashed the
originals, so the original size and aspect ratio are gone): mean and spread of intensity, the
share of near-black and near-white pixels, the mean of a 12-pixel frame (borders, collimation),
the mean of the four 32x32 corners (text markers and burned-in letters sit there), the brightest
corner, edge energy (sharpness, noise), and the file size (JPEG quality / texture).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxr.data.labels import subtype_of


def stats(path: Path) -> dict[str, float]:
    x = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    f, c = 12, 32
    frame = np.concatenate([x[:f].ravel(), x[-f:].ravel(), x[f:-f, :f].ravel(), x[f:-f, -f:].ravel()])
    corners = [x[:c, :c], x[:c, -c:], x[-c:, :c], x[-c:, -c:]]
    gy, gx = np.abs(np.diff(x, axis=0)).mean(), np.abs(np.diff(x, axis=1)).mean()
    centre = x[56:168, 56:168]
    return {"mean": x.mean(), "std": x.std(), "dark share (<20)": (x < 20).mean(), "bright share (>235)": (x > 235).mean(),
            "frame mean": frame.mean(), "corner mean": np.mean([k.mean() for k in corners]),
            "brightest corner p99": max(np.percentile(k, 99) for k in corners),
            "centre mean": centre.mean(), "centre/frame ratio": centre.mean() / (frame.mean() + 1),
            "edge energy": (gx + gy) / 2, "file kB": path.stat().st_size / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data"),
                   help="holds chest_xray and official_test_half (default: ../shared/data)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    splits = {"train": args.data / "chest_xray" / "train" / "PNEUMONIA", "dev-test": args.data / "chest_xray" / "test" /
              "PNEUMONIA", "official_half": args.data / "official_test_half" / "PNEUMONIA"}
    table = {}
    for name, folder in splits.items():
        files = sorted(folder.iterdir())
        y = np.array([subtype_of(f) == "VIRAL" for f in files], dtype=int)
        rows = [stats(f) for f in files]
        table[name] = (y, {k: np.array([r[k] for r in rows]) for k in rows[0]})
    y_train, train = table["train"]
    print(f"{'statistic':<22}" + "".join(f"{n + ' B/V means':>30}" for n in splits) + "".join(
        f"{'AUC ' + n:>20}" for n in splits))
    figures = {}
    for k in train:
        sign = 1 if roc_auc_score(y_train, train[k]) >= 0.5 else -1  # direction from train only
        cells, aucs = [], []
        for n in splits:
            y, s = table[n]
            cells.append(f"{s[k][y == 0].mean():.3g} / {s[k][y == 1].mean():.3g}")
            aucs.append(roc_auc_score(y, sign * s[k]))
        print(f"{k:<22}" + "".join(f"{c:>30}" for c in cells) + "".join(f"{a:>20.3f}" for a in aucs))
        figures[k] = {n: {"bacterial_mean": float(table[n][1][k][table[n][0] == 0].mean()),
                          "viral_mean": float(table[n][1][k][table[n][0] == 1].mean()), "auc_viral": float(a)}
                      for n, a in zip(splits, aucs)}
    print("\nB/V: mean over bacterial / viral images. AUC: the statistic alone as a score for VIRAL, its direction "
          "fixed on train (0.5: no signal; below 0.5: the relation reverses).")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
