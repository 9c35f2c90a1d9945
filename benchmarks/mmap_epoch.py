"""Memory-mapped against in-memory decoded images: one training epoch each on the shared train
split, the same model, seed and batch order, each in a fresh process so the resident memory (RSS)
of each is its own. The memory map is read through the page cache: the first epoch after a
reboot also pays the disk.

    python benchmarks/mmap_epoch.py --data ../shared/data/chest_xray --size 128
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def one(mode: str, data: Path, size: int, cache: Path, limit: int | None) -> dict:
    import resource

    import torch

    from cxr.config import make_config
    from cxr.data.dataset import labels_of
    from cxr.data.loading import load_samples, prepare_splits
    from cxr.training.accel import resolve_precision
    from cxr.training.engine import class_weights, run_epoch, seed_everything
    from cxr.training.model import build_model
    from cxr.training.preprocess import normalize, place

    config = make_config("scratch", image_size=size, limit=limit)
    samples = prepare_splits(data, config.val_ratio, config.seed, config.limit).train
    start = time.perf_counter()
    _, images, _ = load_samples(samples, size, 2, False, cache_dir=cache, mmap=mode == "mmap")
    load_s = time.perf_counter() - start
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seed_everything(0)
    model = place(build_model(None), "cpu").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    precision = resolve_precision("auto", "cpu")
    start = time.perf_counter()
    out = run_epoch(lambda x: model(normalize(x, "cpu")), images, labels_of(samples), 32, "cpu", optimizer,
                    torch.Generator().manual_seed(0), weight=class_weights(labels_of(samples), "none"),
                    precision=precision)
    return {"mode": mode, "images": len(samples), "size": size, "load_s": round(load_s, 2),
            "epoch_s": round(time.perf_counter() - start, 1), "train_loss": out["loss"],
            "peak_rss_mb_after_load": round(rss_loaded), "precision": precision}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray"))
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--limit", type=int)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "cxr" / "images")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--one", choices=["ram", "mmap"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.data, args.size, args.cache, args.limit)))
        return
    rows = []
    for mode in ("ram", "mmap", "ram", "mmap"):  # alternate, twice: the second pair has a warm page cache
        cmd = [sys.executable, __file__, "--one", mode, "--data", str(args.data), "--size", str(args.size),
               "--cache", str(args.cache)] + (["--limit", str(args.limit)] if args.limit else [])
        rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]))
        print(rows[-1], flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
