"""Study preset against robust preset on the shift benchmark, over several seeds.

    python studies/robustness_study.py --data ../shared/data/chest_xray --out runs/robust \
        --tasks scratch,scratch-robust --seeds 0,1,2 --image-size 64 --limit 400

For each seed: `cxr run` (train, choose the operating point on validation, evaluate on test),
then `cxr robustness --split val` (what recipes are compared on) and `--split test` (reported).
Prints, per task, mean and standard deviation over seeds of the clean and shifted metrics, and
writes them to OUT/robustness_study.json. Choosing between recipes uses the val rows only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def cxr(*args: str) -> None:
    cmd = [sys.executable, "-m", "cxr", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tasks", default="scratch,scratch-robust")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--image-size", default="64")
    p.add_argument("--limit", default="400")
    p.add_argument("--weights", help="ImageNet weights, for pretrained tasks")
    p.add_argument("--precision", default="auto", help="training precision passed to cxr run (default: auto)")
    args = p.parse_args()
    tasks, seeds = args.tasks.split(","), args.seeds.split(",")
    for seed in seeds:
        out = args.out / f"seed{seed}"
        if not all((out / t / "metrics.json").is_file() for t in tasks):
            cxr("run", "--data", args.data, "--out", str(out), "--tasks", args.tasks, "--seed", seed,
                "--image-size", args.image_size, "--limit", args.limit, "--n", "4", "--overwrite",
                "--precision", args.precision,
                *(["--weights", args.weights] if args.weights else []))
        for t in tasks:
            for split in ("val", "test"):
                if not (out / t / f"robustness_{split}.json").is_file():
                    cxr("robustness", str(out / t), "--split", split)
    table = {}
    for t in tasks:
        per_seed = {s: {split: json.loads((args.out / f"seed{s}" / t / f"robustness_{split}.json").read_text())
                        for split in ("val", "test")} for s in seeds}
        table[t] = {}
        for split in ("val", "test"):
            for part in ("clean", "mean", "worst", "held_out_mean"):
                for metric in ("accuracy", "sensitivity", "specificity", "roc_auc"):
                    values = [per_seed[s][split][part][metric] for s in seeds]
                    table[t][f"{split}.{part}.{metric}"] = {
                        "mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "values": values}
    (args.out / "robustness_study.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                                "table": table}, indent=2))
    print(f"\n{'key':<36}" + "".join(f"{t:>24}" for t in tasks))
    for key in table[tasks[0]]:
        print(f"{key:<36}" + "".join(f"{table[t][key]['mean']:>15.3f} ± {table[t][key]['sd']:.3f}" for t in tasks))


if __name__ == "__main__":
    main()
