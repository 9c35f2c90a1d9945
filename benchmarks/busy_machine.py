"""What torch's default thread count costs on a busy machine, and what cxr's choice saves.

    python benchmarks/busy_machine.py [--seconds 20] [--json busy.json]

Starts "another job" (a ResNet-18 training loop with torch's default threads, as a second
training on a shared lab machine would be), then times the same ResNet-18 training steps (128 px,
batch 32, channels_last, fp32) in fresh processes beside it: torch's default threads (one per core),
one thread, and what `cxr.training.machine.busy_threads` chooses there; then the default again with
the machine quiet. Prints images/s of each and the ratio to the default under load. Run it alone on
the machine: the load it makes is the only load it means to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STEPS = """
import sys, time, torch
from torchvision.models import resnet18
threads = int(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
seconds = float(sys.argv[2])
model = resnet18(num_classes=2).to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
x = torch.randn(32, 3, 128, 128).to(memory_format=torch.channels_last)
y = torch.arange(32) % 2
def step():
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
step()
n, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds or n < 2:
    step(); n += 1
print(32 * n / (time.perf_counter() - start), torch.get_num_threads())
"""


def rate(threads: int, seconds: float) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", STEPS, str(threads), str(seconds)], check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per row (default 20)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    from cxr.training.machine import busy_cores, busy_threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = subprocess.Popen([sys.executable, "-c", STEPS, "0", "100000"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(5)  # the other job past its start-up
        busy = busy_cores()
        import torch

        chosen = busy_threads(cores, busy, torch.get_num_threads()) or 0
        rows = {"torch's default, beside another job": rate(0, args.seconds),
                "1 thread, beside another job": rate(1, args.seconds),
                f"cxr's choice ({chosen or 'default'}), beside another job": rate(chosen, args.seconds)}
    finally:
        load.kill()
        load.wait()
    time.sleep(2)
    rows["torch's default, machine quiet"] = rate(0, args.seconds)
    base = rows["torch's default, beside another job"][0]
    print(f"{cores} cores; other tasks seen running beside the load: {busy}")
    print(f"{'setting':50} {'threads':>7} {'img/s':>8} {'vs default under load':>22}")
    for name, (r, t) in rows.items():
        print(f"{name:50} {t:7d} {r:8.1f} {r / base:21.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cores": cores, "busy": busy, "rows": {k: {"images_per_s": r, "threads": t}
                                                               for k, (r, t) in rows.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
