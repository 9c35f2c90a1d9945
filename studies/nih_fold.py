"""One fold of nih_half by patient (kfold.patient_folds, 5 folds, seed 0) as two folders of symlinks:
OUT/nih_fit (the other four folds, to fit) and OUT/nih_hold (the fold, to score); fold 0 holds 393
and 101 images. Run from the repository root:
    python studies/nih_fold.py [FOLD] [OUT]          (defaults: 0 runs/m)"""
import sys
from pathlib import Path

from cxr.adaptation.kfold import patient_folds
from cxr.adaptation.methods import site_samples

fold = int(sys.argv[1]) if len(sys.argv) > 1 else 0
out = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/m")
site = Path("../shared/data/nih_half").resolve()
s = site_samples(site, False)
f = patient_folds(s, 5, 0)
for name, keep in (("nih_fit", f != fold), ("nih_hold", f == fold)):
    for smp, k in zip(s, keep):
        if not k: continue
        p = Path(smp.path)
        d = out / name / p.parent.name
        d.mkdir(parents=True, exist_ok=True)
        (d / p.name).symlink_to(p)
    print(name, int(keep.sum()))
