"""Fold 0 of nih_half by patient (kfold.patient_folds, 5 folds, seed 0) as two folders of symlinks:
runs/m/nih_fit (393 images, to fit) and runs/m/nih_hold (101, to score). Run from the repository root:
    python benchmarks/nih_fold.py"""
from pathlib import Path

from cxr.adaptation.kfold import patient_folds
from cxr.adaptation.methods import site_samples

site = Path("../shared/data/nih_half").resolve()
s = site_samples(site, False)
f = patient_folds(s, 5, 0)
for name, keep in (("nih_fit", f != 0), ("nih_hold", f == 0)):
    for smp, k in zip(s, keep):
        if not k: continue
        p = Path(smp.path)
        d = Path("runs/m") / name / p.parent.name
        d.mkdir(parents=True, exist_ok=True)
        (d / p.name).symlink_to(p)
    print(name, int(keep.sum()))
