"""Task 1.2 from a backbone (issue 39): the study's frozen-backbone fine-tune (`finetune`: every layer
frozen but fc, Adam 1e-4, batch 32, 10 epochs) started from each given backbone file, fed as its
pretraining normalised images (--intensity, default equalize), scored on the dev-test and
official_test_half. Prints one table row per backbone. Run from the repository root:
    python studies/pretrain_probe.py OUT SIZE BACKBONE.pt [BACKBONE.pt ...]
A random frozen backbone (the floor): torch.manual_seed(0); resnet18(weights=None), fc dropped:
    python -c "import torch; from torchvision.models import resnet18; torch.manual_seed(0); \
torch.save({k: v for k, v in resnet18().state_dict().items() if not k.startswith('fc.')}, 'random.pt')"
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

DATA = Path("../shared/data")
out, size, backbones = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
intensity = "equalize"
rows = []
for i, b in enumerate(backbones):
    run = out / f"probe{i}"
    subprocess.run(["cxr", "run", "--data", str(DATA / "chest_xray"), "--tasks", "finetune", "--weights", b,
                    "--intensity", intensity, "--image-size", size, "--epochs", "10", "--out", str(run),
                    "--external", f"official_half={DATA / 'official_test_half'}", "--overwrite", "--n", "4"],
                   check=True)
    dev = json.loads((run / "finetune" / "metrics.json").read_text())
    off = json.loads((run / "finetune" / "metrics_official_half.json").read_text())
    kept = dev["checkpoint"]["epoch"]
    history = list(csv.DictReader(open(run / "finetune" / "history.csv")))
    val = float(next(r["val_auc"] for r in history if int(r["epoch"]) == kept))
    rows.append(f"| {b} | {val:.3f} | {dev['accuracy']:.1%} / {dev['roc_auc']:.3f} | "
                f"{off['accuracy']:.1%} / {off['roc_auc']:.3f} |")
print(f"| backbone ({size} px, Task 1.2, intensity {intensity}) | validation AUC (kept epoch) | dev-test acc / AUC | "
      "official_test_half acc / AUC |")
print("| --- | --- | --- | --- |")
print("\n".join(rows))
