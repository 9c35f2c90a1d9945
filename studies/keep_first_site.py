"""Fine-tuning that keeps the first site (issue 36): today's replay against WiSE-FT at the fixed
coefficient 0.5 (the paper's default; the coefficient chosen on validation took 1, the plain fine-tune, on
fold 0: the source's validation split is saturated), L2-SP and LP-FT (5 head-only epochs of 20) at the
same 5 folds by patient inside nih_half (seed 0), every choice read on the site's validation
patients and the source run's validation split; forgetting on the source test split and
official_test_half. The source is studies/second_site.sh's (scratch-robust, 128 px, 5 epochs,
seed 0). Run from the repository root after the README's install step, once the source exists:
    python studies/keep_first_site.py [SOURCE_RUN] [OUT]
(`cxr adapt SRC --evaluate 5 --finetune --wise-alpha 0.5 --l2sp 0.01 --lp-epochs 5` measures the same plus replay 0, which
this script leaves out to save CPU time: 82 min on 2 CPU cores, the WiSE variant mixing each fold's
plain fine-tune; docs/guide/another-hospital.md, Keeping the first site.)"""

import sys
from pathlib import Path

from cxr.adaptation.kfold import evaluate_adaptation, evaluation_table
from cxr.config import FinetuneSpec

DATA = Path("../shared/data")
src = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/nih/src/scratch-robust")
out = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/nih/eval-keep")
base = dict(train="all", replay=0.5, lr=3e-4, epochs=20)
specs = [FinetuneSpec(**base), FinetuneSpec(**base, wise=True, wise_alpha=0.5), FinetuneSpec(**base, l2sp=0.01),
         FinetuneSpec(**base, lp_epochs=5)]
result = evaluate_adaptation(src, DATA / "nih_half", out, k=5, sizes=[None], finetunes=specs, device="cpu",
                             externals={"official_half": DATA / "official_test_half"}, overwrite=True,
                             cache_dir=out.parent / "cache")
print(evaluation_table(result))
