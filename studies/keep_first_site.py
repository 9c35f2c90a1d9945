"""Fine-tuning that keeps the first site: replay against WiSE-FT at the fixed coefficient 0.5 (the
paper's default; the coefficient chosen on validation took 1, the plain fine-tune, on fold 0: the
source's validation split is saturated), L2-SP and LP-FT (5 head-only epochs of 20) at the same 5 folds
by patient inside nih_half (seed 0), every choice read on the site's validation patients and the
source run's validation split; forgetting on the source test split and official_test_half. The source
is studies/second_site.sh's (scratch-robust, 128 px, 5 epochs, seed 0). Run from the repository root
after the README's install step, once the source exists:

    python studies/keep_first_site.py runs/nih/src/scratch-robust runs/nih/eval-keep

(`cxr adapt SRC --evaluate 5 --finetune --wise-alpha 0.5 --l2sp 0.01 --lp-epochs 5` measures the same
plus replay 0, which this script leaves out to save CPU time: 82 min on 2 CPU cores, the WiSE variant
mixing each fold's plain fine-tune; Results: Another hospital, Keeping the first site.)"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxr.adaptation.kfold import evaluate_adaptation
from cxr.adaptation.kfold_table import evaluation_table
from cxr.adaptation.settings import AdaptSettings
from cxr.config import FinetuneSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, nargs="?", default=Path("runs/nih/src/scratch-robust"),
                   help="the source run's task folder (default: runs/nih/src/scratch-robust)")
    p.add_argument("out", type=Path, nargs="?", default=Path("runs/nih/eval-keep"),
                   help="the k-fold evaluation's folder, replaced if it exists (default: runs/nih/eval-keep)")
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"),
                   help="holds nih_half and official_test_half (default: ../shared/data)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--wise-alpha", type=float, help="measure only the plain fine-tune and WiSE-FT at this fixed "
                   "coefficient beside it (5 fine-tunes instead of 15; e.g. 0.9, the coefficient the two-fold "
                   "sweeps picked on official_test_half, scored here on NIH folds that chose nothing)")
    p.add_argument("--json", type=Path, help="also write the evaluation's JSON here (OUT/adapt_evaluation.json has it too)")
    args = p.parse_args()
    base = dict(train="all", replay=0.5, lr=3e-4, epochs=20)
    specs = [FinetuneSpec(**base), FinetuneSpec(**base, wise=True, wise_alpha=0.5), FinetuneSpec(**base, l2sp=0.01),
             FinetuneSpec(**base, lp_epochs=5)]
    if args.wise_alpha is not None:
        specs = [FinetuneSpec(**base), FinetuneSpec(**base, wise=True, wise_alpha=args.wise_alpha)]
    settings = AdaptSettings(device=args.device, overwrite=True, cache_dir=args.out.parent / "cache",
                             externals={"official_half": args.data_root / "official_test_half"})
    result = evaluate_adaptation(args.source, args.data_root / "nih_half", args.out, settings=settings, k=5,
                                 sizes=[None], finetunes=specs)
    print(evaluation_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
