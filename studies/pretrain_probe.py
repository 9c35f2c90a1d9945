"""Task 1.2 from a backbone: the study's frozen-backbone fine-tune (`finetune`: every layer frozen but
fc, Adam 1e-4, batch 32, 10 epochs) started from each given backbone file, fed as its pretraining
normalised images (--intensity, default equalize), scored on the dev-test and official_test_half.
Prints one table row per backbone. Run from the repository root:

    python studies/pretrain_probe.py OUT SIZE BACKBONE.pt [BACKBONE.pt ...]

A random frozen backbone (the floor): torch.manual_seed(0); resnet18(weights=None), fc dropped:

    python -c "import torch; from torchvision.models import resnet18; torch.manual_seed(0); \\
torch.save({k: v for k, v in resnet18().state_dict().items() if not k.startswith('fc.')}, 'random.pt')"
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
from pathlib import Path


def probe(backbone: str, run: Path, size: int, data_root: Path, intensity: str) -> dict:
    subprocess.run(["cxr", "run", "--data", str(data_root / "chest_xray"), "--tasks", "finetune", "--weights", backbone,
                    "--intensity", intensity, "--image-size", str(size), "--epochs", "10", "--out", str(run),
                    "--external", f"official_half={data_root / 'official_test_half'}", "--overwrite", "--n", "4"],
                   check=True)
    dev = json.loads((run / "finetune" / "metrics.json").read_text())
    off = json.loads((run / "finetune" / "metrics_official_half.json").read_text())
    kept = dev["checkpoint"]["epoch"]
    with open(run / "finetune" / "history.csv", newline="") as f:
        val = float(next(r["val_auc"] for r in csv.DictReader(f) if int(r["epoch"]) == kept))
    return {"backbone": backbone, "val_auc": val, "dev_test": {"accuracy": dev["accuracy"], "roc_auc": dev["roc_auc"]},
            "official_half": {"accuracy": off["accuracy"], "roc_auc": off["roc_auc"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="one run folder per backbone goes here (OUT/probe0, ...)")
    p.add_argument("size", type=int, help="image size in pixels (the backbone's pretraining size)")
    p.add_argument("backbones", nargs="+", help="backbone files written by cxr pretrain")
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"),
                   help="holds chest_xray and official_test_half (default: ../shared/data)")
    p.add_argument("--intensity", default="equalize", help="as the backbones were pretrained (default: equalize)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    rows = [probe(b, args.out / f"probe{i}", args.size, args.data_root, args.intensity)
            for i, b in enumerate(args.backbones)]
    print(f"| backbone ({args.size} px, Task 1.2, intensity {args.intensity}) | validation AUC (kept epoch) | "
          "dev-test acc / AUC | official_test_half acc / AUC |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        dev, off = r["dev_test"], r["official_half"]
        print(f"| {r['backbone']} | {r['val_auc']:.3f} | {dev['accuracy']:.1%} / {dev['roc_auc']:.3f} | "
              f"{off['accuracy']:.1%} / {off['roc_auc']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
