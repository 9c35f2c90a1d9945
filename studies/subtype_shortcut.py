"""Does a subtype model (cxr run --labels subtype) read the lungs, or the image's borders and
corners? Each run's best.pt scored on the same images as they are and with parts hidden: the
corners (where burned-in letters and markers sit), a frame around the image, everything outside a
central ellipse (roughly the lung fields), and only the centre kept and enlarged. ROC AUC of
P(BACTERIAL) per set; the hidden parts are filled with the image's own median grey.

    python studies/subtype_shortcut.py runs/subtype/scratch-robust/seed0 ... \
        --set dev-test=../shared/data/chest_xray/test --set official_half=../shared/data/official_test_half
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxr.data.images import load_image
from cxr.data.labels import subtype_of
from cxr.deploy.predict import load_model


def corners(x: np.ndarray) -> np.ndarray:
    x, k = x.copy(), x.shape[0] // 6
    fill = np.median(x)
    for rows in (slice(0, k), slice(-k, None)):
        for cols in (slice(0, k), slice(-k, None)):
            x[rows, cols] = fill
    return x


def frame(x: np.ndarray) -> np.ndarray:
    x, k = x.copy(), x.shape[0] // 8
    fill = np.median(x)
    x[:k], x[-k:], x[:, :k], x[:, -k:] = fill, fill, fill, fill
    return x


def ellipse(x: np.ndarray) -> np.ndarray:
    s = x.shape[0]
    yy, xx = np.mgrid[:s, :s] / (s - 1) - 0.5
    out = x.copy()
    out[(xx / 0.42) ** 2 + (yy / 0.40) ** 2 > 1] = np.median(x)
    return out


def centre(x: np.ndarray) -> np.ndarray:
    s, k = x.shape[0], x.shape[0] // 6
    return np.asarray(Image.fromarray(x[k:s - k, k:s - k]).resize((s, s), Image.BILINEAR))


VARIANTS = {"as is": lambda x: x, "corners hidden": corners, "frame hidden": frame,
            "outside a central ellipse hidden": ellipse, "centre 2/3 only, enlarged": centre}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="task folders of --labels subtype runs")
    p.add_argument("--set", action="append", required=True, metavar="NAME=DIR", help="DIR/PNEUMONIA holds the images")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    sets = dict(s.split("=", 1) for s in args.set)
    results: dict[tuple[str, str], list[float]] = {}
    for run in args.runs:
        model = load_model(run / "best.pt")
        assert model.classes == ("VIRAL", "BACTERIAL"), f"{run}: not a --labels subtype run"
        for name, folder in sets.items():
            files = sorted((Path(folder) / "PNEUMONIA").iterdir())
            y = np.array([subtype_of(f) == "BACTERIAL" for f in files], dtype=int)
            images = [load_image(f, model.image_size) for f in files]
            for variant, change in VARIANTS.items():
                prob = model.predict_arrays([change(x) for x in images])[0][:, 1]
                results.setdefault((name, variant), []).append(roc_auc_score(y, prob))
    print(f"{'set':<16}{'images shown':<36}{'ROC AUC, mean over runs':>26}  per run")
    for (name, variant), aucs in results.items():
        print(f"{name:<16}{variant:<36}{np.mean(aucs):>26.3f}  " + " ".join(f"{a:.3f}" for a in aucs))
    if args.json:
        rows = [{"set": n, "shown": v, "roc_auc": aucs} for (n, v), aucs in results.items()]
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
