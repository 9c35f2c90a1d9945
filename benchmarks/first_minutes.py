"""The first five minutes, timed: median wall seconds of 5 cold processes each.

    python benchmarks/first_minutes.py --data ../shared/data/chest_xray --image IMG.jpeg

Rows: `cxr --help`, `cxr run --help`, `cxr --version`; `cxr predict CKPT IMG` (a checkpoint it
trains first, 1 epoch at 64 px); and the parts of a small `cxr run` (both study tasks' settings
without ImageNet: scratch and scratch-robust, --limit 20 --image-size 64 --epochs 1, warm cache)
that are not training: process wall time minus the "train" rows of OUT/timings.json, with the
in-process split of the rest. Run it alone on the machine: it measures wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CXR = [sys.executable, "-m", "cxr"]


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def median_of(argv: list[str], runs: int) -> float:
    return statistics.median(wall(argv) for _ in range(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a data folder in the usual layout")
    ap.add_argument("--image", type=Path, required=True, help="one radiograph to predict")
    ap.add_argument("--runs", type=int, default=5, help="cold processes per row (default: 5)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cxr-first-"))
    cache = ["--cache-dir", str(tmp / "cache")]
    small = ["--data", str(args.data), "--tasks", "scratch,scratch-robust", "--limit", "20", "--image-size", "64",
             "--epochs", "1", *cache]
    try:
        subprocess.run([*CXR, "run", *small, "--out", str(tmp / "warm")], check=True, stdout=subprocess.DEVNULL)
        rows = [("cxr --help", median_of([*CXR, "--help"], args.runs)),
                ("cxr run --help", median_of([*CXR, "run", "--help"], args.runs)),
                ("cxr --version", median_of([*CXR, "--version"], args.runs)),
                ("cxr predict CKPT one.jpeg (cold)",
                 median_of([*CXR, "predict", str(tmp / "warm" / "scratch" / "best.pt"), str(args.image)], args.runs))]
        not_training, inside = [], []
        for k in range(args.runs):
            out = tmp / f"run{k}"
            seconds = wall([*CXR, "run", *small, "--out", str(out)])
            timings = json.loads((out / "timings.json").read_text())
            train = sum(v for name, v in timings.items() if name.endswith(": train"))
            not_training.append(seconds - train)
            inside.append({name: v for name, v in timings.items() if not name.endswith(": train")})
            shutil.rmtree(out)
        rows.append(("cxr run, small, all but training (warm cache)", statistics.median(not_training)))
        for name, seconds in rows:
            print(f"{name:<48} {seconds:6.2f} s  (median of {args.runs})")
        total = statistics.median(d["total"] for d in inside)
        print("inside the run, median seconds (the rest of the wall time is starting Python and importing):")
        for name in (n for n in inside[0] if n != "total"):
            print(f"  {name:<40} {statistics.median(d[name] for d in inside):6.2f} s")
        print(f"  (in-run total {total:.2f} s, training included)")
        if args.json:
            inside_median = {n: statistics.median(d[n] for d in inside) for n in inside[0]}
            args.json.write_text(json.dumps({"wall_s": dict(rows), "inside_run_s": inside_median}, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
