"""cxr against the plain pipeline a user would otherwise write, on the same machine in one run.

    python benchmarks/bench.py --data ../shared/data/chest_xray \
        --originals ../shared/data/chest_xray_originals --json bench.json

Each section runs in a fresh process (so its peak memory is its own) and prints one row:
what was measured, cxr's number, the plain pipeline's number and their ratio. "Plain" is
torchvision ImageFolder + PIL transforms (Resize((s, s)), ToTensor, Normalize) + DataLoader,
fp32, and for the frozen fine-tune the backbone recomputed every epoch (in eval mode).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from cxr.data import decode_all, labels_of, list_split
from cxr.engine import extract_features, run_epoch
from cxr.model import build_model, set_train_mode
from cxr.preprocess import memory_format, normalize, place

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def plain_transform(size: int):
    return transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def plain_loader(folder: Path, size: int, batch: int, workers: int, n: int | None = None, shuffle=True):
    ds = datasets.ImageFolder(str(folder), transform=plain_transform(size))
    if n is not None:
        ds = Subset(ds, list(np.random.default_rng(0).permutation(len(ds))[:n]))
    return DataLoader(ds, batch_size=batch, shuffle=shuffle, num_workers=workers,
                      generator=torch.Generator().manual_seed(0))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- sections: each returns {"cxr": ..., "plain": ..., "unit": ..., "what": ...} --------------

def decode(args, folder: Path, label: str) -> dict:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    ours = timed(lambda: decode_all(paths, args.size, args.workers))
    loader = plain_loader(folder, args.size, 32, args.workers, shuffle=False)
    plain = timed(lambda: [None for _ in loader])  # one epoch of decoding, as a DataLoader does it
    return {"what": f"decode + resize to {args.size} px, {len(paths)} {label} (cxr: once, into the uint8 cache)",
            "unit": "images/s", "cxr": len(paths) / ours, "plain": len(paths) / plain}


def _train_steps(step, batches, warmup=2) -> float:
    for b in batches[:warmup]:
        step(*b)
    return timed(lambda: [step(*b) for b in batches[warmup:]])


def train_throughput(args) -> dict:
    root = Path(args.data) / "train"
    n = args.batch * (args.steps + 2)
    samples = list_split(Path(args.data), "train")
    chosen = [samples[i] for i in np.random.default_rng(0).permutation(len(samples))[:n]]
    images, _ = decode_all([s.path for s in chosen], args.size, args.workers)
    labels = labels_of(chosen)
    results = {}
    for name, fmt in (("cxr", memory_format("cpu")), ("contiguous", torch.contiguous_format)):
        torch.manual_seed(0)
        model = build_model(None).to(memory_format=fmt)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        set_train_mode(model, True)

        def step(x, y, model=model, opt=opt, fmt=fmt):
            x = normalize(x, "cpu").contiguous(memory_format=fmt)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        batches = [(images[i:i + args.batch], labels[i:i + args.batch]) for i in range(0, n, args.batch)]
        results[name] = args.batch * args.steps / _train_steps(step, batches)
    torch.manual_seed(0)
    model = build_model(None).train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loader = iter(plain_loader(root, args.size, args.batch, args.workers))

    def plain_step():
        x, y = next(loader)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        plain_step()
    plain = args.batch * args.steps / timed(lambda: [plain_step() for _ in range(args.steps)])
    return {"what": f"from-scratch training at {args.size} px, batch {args.batch} ({args.steps} steps; "
                    f"cxr without channels_last: {results['contiguous']:.1f} images/s)",
            "unit": "images/s", "cxr": results["cxr"], "plain": plain}


def inference(args) -> dict:
    samples = list_split(Path(args.data), "test")[: args.batch * 10]
    images, _ = decode_all([s.path for s in samples], args.size, args.workers)
    model = place(build_model(None), "cpu").eval()
    with torch.no_grad():
        model(normalize(images[:args.batch], "cpu"))
        ours = timed(lambda: [model(normalize(images[i:i + 64], "cpu")) for i in range(0, len(images), 64)])
        model = build_model(None).eval()  # the plain pipeline: default memory format
        loader = plain_loader(Path(args.data) / "test", args.size, 64, args.workers, n=len(images), shuffle=False)
        plain = timed(lambda: [model(x) for x, _ in loader])
    return {"what": f"inference at {args.size} px, batch 64, {len(images)} images",
            "unit": "images/s", "cxr": len(images) / ours, "plain": len(images) / plain}


def frozen_finetune(args) -> dict:
    """10 epochs of the finetune task on every shared train image (weights: random stand-in, same cost)."""
    data = Path(args.data)
    samples = list_split(data, "train")
    labels = labels_of(samples)
    torch.manual_seed(0)
    model = build_model(build_model(None).state_dict(), train_backbone=False)

    def ours():  # what `fit` does for a frozen task: decode once, features once, fc on features
        images, _ = decode_all([s.path for s in samples], args.size, args.workers)
        feats = extract_features(model, images, 64, "cpu")
        opt = torch.optim.Adam(model.fc.parameters(), 1e-4)
        g = torch.Generator().manual_seed(0)
        for _ in range(args.epochs):
            run_epoch(model.fc, feats, labels, 32, "cpu", opt, g)

    t_ours = timed(ours)
    model = model.to(memory_format=torch.contiguous_format)  # the plain pipeline: default memory format
    opt = torch.optim.Adam(model.fc.parameters(), 1e-4)
    loader = plain_loader(data / "train", args.size, 32, args.workers)

    def plain_epoch():
        model.eval()  # the frozen backbone in eval mode, recomputed every epoch
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    per_epoch = statistics.mean(timed(plain_epoch) for _ in range(args.plain_epochs))
    t_plain = per_epoch * args.epochs
    note = "" if args.plain_epochs >= args.epochs else f"; plain: {args.plain_epochs} epoch(s) timed, x{args.epochs}"
    return {"what": f"frozen fine-tune, {args.epochs} epochs, {len(samples)} images at {args.size} px, incl. decoding{note}",
            "unit": "s", "cxr": t_ours, "plain": t_plain}


def predict_latency(args) -> dict:
    from cxr.checkpoint import make_checkpoint
    from cxr.config import make_config
    from cxr.predict import Model

    torch.set_num_threads(torch.get_num_threads())
    paths = sorted((Path(args.data) / "test" / "NORMAL").iterdir())[:40]
    model = Model(make_checkpoint(build_model(None), make_config("scratch"), 1, {}, 0.0))
    for p in paths[:3]:
        model.predict([p])
    plain_ms, cam_ms = [], []
    for p in paths:
        plain_ms.append(1000 * timed(lambda: model.predict([p])))
        cam_ms.append(1000 * timed(lambda: model.explain([p])))
    batch = timed(lambda: model.predict(paths, batch_size=32))
    return {"what": f"cxr.load_model(...).predict, one image at a time, decode included, median over "
                    f"{len(paths)} images at 224 px; second column: with the CAM computed (no PNG written); "
                    f"batch of {len(paths)}: {len(paths) / batch:.1f} images/s",
            "unit": "ms", "cxr": statistics.median(plain_ms), "plain": statistics.median(cam_ms),
            "ratio_name": "CAM cost"}


SECTIONS = {"decode_224": lambda a: decode(a, Path(a.data) / "train", "shared 224 px train files"),
            "decode_originals": lambda a: decode(a, Path(a.originals), "full-size originals"),
            "train": train_throughput, "inference": inference, "frozen_finetune": frozen_finetune,
            "predict_latency": predict_latency}


def _child(name, args, queue):
    result = SECTIONS[name](args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--originals")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--plain-epochs", type=int, default=1, help="plain frozen epochs actually timed")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'section':<18} {'cxr':>10} {'plain':>10} {'unit':<9} {'ratio':>6} {'peak MB':>8}  what")
    for name in args.sections.split(","):
        if name == "decode_originals" and not args.originals:
            continue
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(name, args, queue))
        proc.start()
        r = queue.get()
        proc.join()
        faster = r["plain"] / r["cxr"] if r["unit"] in ("s", "ms") else r["cxr"] / r["plain"]
        r.update(section=name, ratio=faster)
        rows.append(r)
        print(f"{name:<18} {r['cxr']:>10.2f} {r['plain']:>10.2f} {r['unit']:<9} {faster:>5.2f}x "
              f"{r['peak_rss_mb']:>8.0f}  {r['what']}", flush=True)
        if "ratio_name" in r:  # not a speed-up: what the second column costs over the first
            print(f"{'':<18} ({r['ratio_name']}: {faster:.2f}x the time without it)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                               "torch": str(torch.__version__), "rows": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
