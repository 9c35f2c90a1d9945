"""A small study, whole command against whole script: `cxr run` beside the plain script a user
would write for the same study, each a fresh process, wall time from start to exit.

    python benchmarks/small_run.py --data ../shared/data/chest_xray [--per-class 50] [--epochs 10]
        [--size 224] [--runs 3] [--json small.json]

The data: the first PER_CLASS train images of each class and 20 test images of each class of DATA,
linked into a temporary folder in the usual layout. Two tasks, each timed alone, alternating cxr and
plain, median of RUNS:

- scratch: cxr `run --tasks scratch` (it carves its validation patients from those train images,
  decodes into an empty cache, trains, evaluates with bootstrap intervals, fits the
  out-of-distribution score, draws the figures and CAMs, writes the report). The plain script, as the
  original study did: torchvision `ImageFolder` + `Resize`/`ToTensor`/`Normalize`, a `DataLoader`
  with 2 workers, ResNet-18 from scratch, Adam 1e-3, batch 32; the test images as its validation set
  each epoch; test accuracy overall and per class; the loss curves and 8 CAMs drawn with matplotlib.
- finetune: the same with ImageNet-format weights (a random stand-in of the same shape: the same
  cost) and every layer frozen but `fc` (Adam 1e-4); the plain script recomputes the frozen backbone
  every epoch, as the study did.

Ratio: plain seconds / cxr seconds (above 1: cxr is faster). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAIN = r'''
import sys, time
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch, torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.models import resnet18
data, out, size, epochs, weights = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                         transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
train = DataLoader(datasets.ImageFolder(f"{data}/train", tf), batch_size=32, shuffle=True, num_workers=2)
test_set = datasets.ImageFolder(f"{data}/test", tf)
test = DataLoader(test_set, batch_size=32, num_workers=2)
model = resnet18()
if weights != "-":
    model.load_state_dict(torch.load(weights, weights_only=True))
    for p in model.parameters():
        p.requires_grad = False
model.fc = torch.nn.Linear(512, 2)
opt = torch.optim.Adam(model.fc.parameters() if weights != "-" else model.parameters(), 1e-4 if weights != "-" else 1e-3)
losses = {"train": [], "val": []}
for epoch in range(epochs):
    model.train() if weights == "-" else model.eval()
    total = n = 0
    for x, y in train:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        total += loss.item() * len(y); n += len(y)
    losses["train"].append(total / n)
    model.eval(); total = n = 0
    with torch.no_grad():
        for x, y in test:
            total += F.cross_entropy(model(x), y, reduction="sum").item(); n += len(y)
    losses["val"].append(total / n)
model.eval(); correct = torch.zeros(2); count = torch.zeros(2)
with torch.no_grad():
    for x, y in test:
        pred = model(x).argmax(1)
        for c in (0, 1):
            correct[c] += ((pred == y) & (y == c)).sum(); count[c] += (y == c).sum()
print("accuracy", (correct.sum() / count.sum()).item(), "per class", (correct / count).tolist())
plt.figure(); plt.plot(losses["train"]); plt.plot(losses["val"]); plt.savefig(f"{out}/loss.png"); plt.close()
feats = {}
model.layer4.register_forward_hook(lambda m, i, o: feats.__setitem__("f", o))
x = torch.stack([test_set[i][0] for i in range(8)])
with torch.no_grad():
    model(x)
cams = torch.einsum("c,nchw->nhw", model.fc.weight[1], feats["f"]).detach()
fig, axes = plt.subplots(2, 4, figsize=(12, 6))
for ax, img, cam in zip(axes.flat, x, cams):
    ax.imshow(img[0], cmap="gray"); ax.imshow(F.interpolate(cam[None, None], size=(size, size))[0, 0], alpha=0.4)
fig.savefig(f"{out}/cams.png"); plt.close(fig)
'''


def link_subset(data: Path, dest: Path, per_class: int, test_per_class: int) -> None:
    for split, n in (("train", per_class), ("test", test_per_class)):
        for cls in ("NORMAL", "PNEUMONIA"):
            (dest / split / cls).mkdir(parents=True)
            for f in sorted((data / split / cls).iterdir())[:n]:
                (dest / split / cls / f.name).symlink_to(f.resolve())


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a data folder in the usual layout")
    ap.add_argument("--per-class", type=int, default=50, help="train images per class (default 50)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs (default 10, the study's)")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels (default 224, the study's)")
    ap.add_argument("--runs", type=int, default=3, help="processes per row, alternating (default 3)")
    ap.add_argument("--tasks", default="scratch,finetune", help="comma-separated: scratch, finetune")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args()

    import torch
    from torchvision.models import resnet18

    with tempfile.TemporaryDirectory(prefix="cxr-small-") as tmp:
        tmp = Path(tmp)
        link_subset(args.data, tmp / "data", args.per_class, 20)
        torch.save(resnet18().state_dict(), tmp / "standin.pt")
        rows = {}
        for task in args.tasks.split(","):
            weights = ["--weights", str(tmp / "standin.pt")] if task == "finetune" else []
            times = {"cxr": [], "plain": []}
            for k in range(args.runs):
                out = tmp / f"{task}{k}"
                out.mkdir()
                times["cxr"].append(wall([sys.executable, "-m", "cxr", "run", "--data", str(tmp / "data"),
                                          "--tasks", task, "--epochs", str(args.epochs), "--image-size",
                                          str(args.size), "--out", str(out / "cxr"), "--cache-dir",
                                          str(out / "cache"), *weights]))
                times["plain"].append(wall([sys.executable, "-c", PLAIN, str(tmp / "data"), str(out),
                                            str(args.size), str(args.epochs),
                                            str(tmp / "standin.pt") if weights else "-"]))
            rows[task] = {name: statistics.median(t) for name, t in times.items()} | {"all": times}
    print(f"{args.per_class} train images a class, 40 test images, {args.epochs} epochs at {args.size} px; "
          f"median of {args.runs} processes, wall seconds")
    print(f"{'task':10} {'cxr run':>9} {'plain':>9} {'ratio':>7}")
    for task, r in rows.items():
        print(f"{task:10} {r['cxr']:9.1f} {r['plain']:9.1f} {r['plain'] / r['cxr']:6.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"data": str(args.data), "json": str(args.json)},
                                         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
