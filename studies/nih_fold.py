"""One fold of a site folder by patient (kfold.patient_folds, 5 folds, seed 0) as two folders of
symlinks: OUT/nih_fit (the other four folds, to fit) and OUT/nih_hold (the fold, to score); for
nih_half, fold 0 holds 393 and 101 images. Run from the repository root:

    python studies/nih_fold.py --fold 0 --out runs/m --site ../shared/data/nih_half
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cxr.adaptation.kfold import patient_folds
from cxr.adaptation.methods import site_samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fold", type=int, default=0, help="the fold to hold out, 0-4 (default: 0)")
    p.add_argument("--out", type=Path, default=Path("runs/m"), help="where nih_fit/ and nih_hold/ go (default: runs/m)")
    p.add_argument("--site", type=Path, default=Path("../shared/data/nih_half"),
                   help="the labelled site folder, NORMAL/ and PNEUMONIA/ (default: ../shared/data/nih_half)")
    args = p.parse_args()
    samples = site_samples(args.site.resolve(), False)
    folds = patient_folds(samples, 5, 0)
    for name, keep in (("nih_fit", folds != args.fold), ("nih_hold", folds == args.fold)):
        for sample, k in zip(samples, keep):
            if not k:
                continue
            path = Path(sample.path)
            folder = args.out / name / path.parent.name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / path.name).symlink_to(path)
        print(name, int(keep.sum()))


if __name__ == "__main__":
    main()
