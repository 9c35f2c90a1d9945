"""One process against torchrun's N processes (DistributedDataParallel, gloo on the CPU, NCCL on
GPUs): training throughput through cxr's own command line, the same task, data, global batch and
seed. Each epoch's seconds come from the run's history.csv; the first epoch also pays warm-up, so
the table reports the last epoch.

On a CPU the processes share the cores (torchrun gives each one thread, one process alone uses
them all), so this measures what DDP costs there (gradient all-reduce, synchronised BatchNorm)
more than what it gains; across GPUs or machines each process brings its own device.

    python benchmarks/ddp_throughput.py --data ../shared/data/chest_xray --size 128 --epochs 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train(nproc: int, args: argparse.Namespace, out: Path) -> dict:
    cxr = ["-m", "cxr", "train", "--task", args.task, "--data", str(args.data), "--out", str(out),
           "--image-size", str(args.size), "--epochs", str(args.epochs), "--precision", args.precision,
           "--device", args.device] + (["--limit", str(args.limit)] if args.limit else [])
    if nproc == 1:
        cmd = [sys.executable, *cxr]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cxr]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    with open(out / args.task / "history.csv") as f:
        rows = list(csv.DictReader(f))
    n = int(next(line for line in result.stdout.splitlines() if line.startswith("train ")).split()[-1])
    last = float(rows[-1]["seconds"])
    return {"processes": nproc, "train_images": n, "last_epoch_s": last, "images_per_s": round(n / last, 1),
            "wall_s": round(wall, 1), "last_train_loss": round(float(rows[-1]["train_loss"]), 4),
            "last_val_loss": round(float(rows[-1]["val_loss"]), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray"))
    p.add_argument("--task", default="scratch")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int)
    p.add_argument("--nproc", type=int, default=2, help="processes of the torchrun run")
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [train(1, args, Path(tmp) / "one"), train(args.nproc, args, Path(tmp) / "ddp")]
    for row in rows:
        print(row, flush=True)
    print(f"{args.nproc} processes against 1: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x the "
          f"throughput ({args.task}, {args.size} px, {args.precision}, {args.device}, last of {args.epochs} epochs)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
