"""cxr against the plain pipeline a user would otherwise write, on the same machine in one run.

    python benchmarks/bench.py --data ../shared/data/chest_xray \
        --originals ../shared/data/chest_xray_originals --json bench.json

On a GPU machine (copy the data next to the repository first, see benchmarks/gpu_check.sh):

    python benchmarks/bench.py --device cuda --data DATA --json bench_cuda.json

Each section runs in a fresh process (so its peak memory is its own) and prints one row:
what was measured, cxr's number, the plain pipeline's number and their ratio. "Plain" is
torchvision ImageFolder + PIL transforms (Resize((s, s)), ToTensor, Normalize) + DataLoader,
fp32, and for the frozen fine-tune the backbone recomputed every epoch (in eval mode).
cxr's numbers go through cxr's own code (`run_epoch`, `extract_features`), with the defaults of
the device (accel.py); the training row also lists the other variants (memory format,
precision, torch.compile) so that defaults are switched by measurement. On CUDA, "peak" is
the bf16 matrix-product rate measured on the card and "full_run" the whole `cxr run`.
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

from cxr.data.dataset import labels_of
from cxr.data.decode import decode_all
from cxr.data.folders import list_split
from cxr.training.accel import autocast, compiled, resolve_precision, stage
from cxr.training.engine import extract_features, run_epoch
from cxr.training.model import build_model, set_train_mode
from cxr.training.preprocess import memory_format, normalize, place

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TRAIN_GFLOP = 10.7  # ResNet-18 at 224 px, one image, forward + backward (about 3 x the forward pass's 1.8 G multiply-adds)


def plain_transform(size: int):
    return transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def plain_loader(folder: Path, size: int, batch: int, workers: int, n: int | None = None, shuffle=True,
                 pin: bool = False):
    ds = datasets.ImageFolder(str(folder), transform=plain_transform(size))
    if n is not None:
        ds = Subset(ds, list(np.random.default_rng(0).permutation(len(ds))[:n]))
    return DataLoader(ds, batch_size=batch, shuffle=shuffle, num_workers=workers, pin_memory=pin,
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


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _sample_train(args, n: int):
    samples = list_split(Path(args.data), "train")
    chosen = [samples[i] for i in np.random.default_rng(0).permutation(len(samples))[:n]]
    images, _ = decode_all([s.path for s in chosen], args.size, args.workers)
    return images, labels_of(chosen)


def cxr_train_rate(args, images, labels, fmt, precision, compile_model) -> float:
    """Images/s of cxr's training pass (`run_epoch`: gather, copy, normalise, forward under
    autocast, backward, Adam) on `args.device`, after warm-up passes (compilation included there)."""
    device = args.device
    torch.manual_seed(0)
    model = build_model(None).to(device=device, memory_format=fmt)
    set_train_mode(model, True)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    net = compiled(model, compile_model)
    data, y = stage(images, device), stage(labels, device)

    def forward(x):
        return net(normalize(x, device).contiguous(memory_format=fmt))

    warm = args.batch * 2
    g = torch.Generator().manual_seed(0)
    for _ in range(3 if compile_model else 1):  # compile: the full-batch graph, then settled
        run_epoch(forward, data[:warm], y[:warm], args.batch, device, opt, g, precision=precision)
    sync(device)
    seconds = timed(lambda: run_epoch(forward, data, y, args.batch, device, opt, g, precision=precision))
    return len(labels) / seconds


def train_throughput(args) -> dict:
    device = torch.device(args.device)
    n = args.batch * args.steps
    images, labels = _sample_train(args, n)
    variants = {"default": (memory_format(device), resolve_precision("auto", device), False),
                "fp32 contiguous": (torch.contiguous_format, "fp32", False),
                "fp32 channels_last": (torch.channels_last, "fp32", False),
                "bf16 contiguous": (torch.contiguous_format, "bf16", False),
                "bf16 channels_last": (torch.channels_last, "bf16", False)}
    if args.compile:
        variants["default + compile"] = (*variants["default"][:2], True)
    rates = {name: cxr_train_rate(args, images, labels, *v) for name, v in variants.items()}
    torch.manual_seed(0)
    model = build_model(None).to(device).train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loader = iter(plain_loader(Path(args.data) / "train", args.size, args.batch, args.workers,
                               pin=device.type == "cuda"))

    def plain_step():
        x, y = next(loader)
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        plain_step()
    sync(args.device)
    plain = n / timed(lambda: ([plain_step() for _ in range(args.steps)], sync(args.device)))
    others = ", ".join(f"{k} {v:.1f}" for k, v in rates.items() if k != "default")
    fmt, precision, _ = variants["default"]
    flops = rates["default"] * TRAIN_GFLOP / 1e3
    return {"what": f"from-scratch training at {args.size} px, batch {args.batch}, {n} images "
                    f"(cxr default: {'channels_last' if fmt == torch.channels_last else 'contiguous'} {precision}, "
                    f"{flops:.2f} TFLOP/s; other variants, images/s: {others})",
            "unit": "images/s", "cxr": rates["default"], "plain": plain, "variants": rates, "tflops": flops}


def inference(args) -> dict:
    device = args.device
    samples = list_split(Path(args.data), "test")[: args.batch * 10]
    images, _ = decode_all([s.path for s in samples], args.size, args.workers)
    model = place(build_model(None), device).eval()

    def ours(precision="fp32"):  # cxr evaluates in fp32 (accel.py); bf16 shown for reference
        with autocast(device, precision):
            out = [model(normalize(images[i:i + 64], device)) for i in range(0, len(images), 64)]
        sync(device)
        return out

    with torch.no_grad():
        ours(), ours("bf16")  # warm-up
        t_ours, t_bf16 = timed(ours), timed(lambda: ours("bf16"))
        model = build_model(None).to(device).eval()  # the plain pipeline: default memory format
        loader = plain_loader(Path(args.data) / "test", args.size, 64, args.workers, n=len(images), shuffle=False)
        plain = timed(lambda: ([model(x.to(device)) for x, _ in loader], sync(device)))
    return {"what": f"inference at {args.size} px, batch 64, {len(images)} images, fp32 "
                    f"(bf16 autocast: {len(images) / t_bf16:.1f} images/s)",
            "unit": "images/s", "cxr": len(images) / t_ours, "plain": len(images) / plain}


def frozen_finetune(args) -> dict:
    """10 epochs of the finetune task on every shared train image (weights: random stand-in, same cost)."""
    device = args.device
    data = Path(args.data)
    samples = list_split(data, "train")
    labels = labels_of(samples)
    torch.manual_seed(0)
    model = build_model(build_model(None).state_dict(), train_backbone=False)
    precision = resolve_precision("auto", device)

    def ours():  # what `fit` does for a frozen task: decode once, features once, fc on features
        images, _ = decode_all([s.path for s in samples], args.size, args.workers)
        feats = extract_features(model, images, 64, device, precision=precision)
        opt = torch.optim.Adam(model.fc.parameters(), 1e-4)
        g = torch.Generator().manual_seed(0)
        for _ in range(args.epochs):
            run_epoch(model.fc, feats, labels, 32, device, opt, g)

    t_ours = timed(ours)
    model = model.to(memory_format=torch.contiguous_format)  # the plain pipeline: default memory format
    opt = torch.optim.Adam(model.fc.parameters(), 1e-4)
    loader = plain_loader(data / "train", args.size, 32, args.workers, pin=torch.device(device).type == "cuda")

    def plain_epoch():
        model.eval()  # the frozen backbone in eval mode, recomputed every epoch
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)

    per_epoch = statistics.mean(timed(plain_epoch) for _ in range(args.plain_epochs))
    t_plain = per_epoch * args.epochs
    note = "" if args.plain_epochs >= args.epochs else f"; plain: {args.plain_epochs} epoch(s) timed, x{args.epochs}"
    return {"what": f"frozen fine-tune, {args.epochs} epochs, {len(samples)} images at {args.size} px, incl. decoding, "
                    f"features in {precision}{note}",
            "unit": "s", "cxr": t_ours, "plain": t_plain}


def peak(args) -> dict:
    """The card's bf16 matrix-product rate: 8192^3 products on fresh random operands, median of 20
    event-timed runs after warm-up. CUDA only; the training row's share of it is printed last."""
    device = torch.device(args.device)
    n = 8192
    pairs = [(torch.randn(n, n, device=device, dtype=torch.bfloat16),
              torch.randn(n, n, device=device, dtype=torch.bfloat16)) for _ in range(3)]
    for a, b in pairs:
        a @ b
    times = []
    for i in range(20):
        a, b = pairs[i % len(pairs)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return {"what": f"measured bf16 peak: {n}^3 matrix product, median of 20", "unit": "TFLOP/s",
            "cxr": 2 * n ** 3 / statistics.median(times) / 1e12, "plain": None}


def full_run(args) -> dict:
    """The whole `cxr run` (both study tasks, all images, 10 epochs) in a subprocess, wall time,
    with an empty decode cache (so the cache build is included). The finetune task needs ImageNet
    weights: offline, a random ResNet-18 state dict stands in (same cost; its accuracy means nothing)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "standin_resnet18.pt"
        torch.save(build_model(None).state_dict(), weights)
        cmd = [sys.executable, "-m", "cxr", "run", "--data", args.data, "--out", str(Path(tmp) / "out"),
               "--device", args.device, "--weights", str(weights), "--cache-dir", str(Path(tmp) / "cache"),
               "--epochs", str(args.epochs), "--image-size", str(args.size), "--workers", str(args.workers)]
        cmd += ["--limit", str(args.limit)] if args.limit else []
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"cxr run failed: {done.stderr[-2000:]}")
        summary = json.loads((Path(tmp) / "out" / "summary.json").read_text())
    images = f"at most {args.limit} images per class and split" if args.limit else "all images"
    return {"what": f"whole cxr run, scratch + finetune, {images}, {args.epochs} epochs at {args.size} px, cache build, "
                    f"evaluation, figures and report included (stand-in ImageNet weights); plain column: "
                    f"the study's 7 h (shown only for the study's setting)", "unit": "s", "cxr": seconds,
            "plain": 7 * 3600.0 if (not args.limit and args.epochs == 10 and args.size == 224) else None,
            "summary": summary}


def predict_latency(args) -> dict:
    from cxr.config import make_config
    from cxr.deploy.predict import Model
    from cxr.training.checkpoint import make_checkpoint

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
            "ratio_name": "time with CAM / time without"}


SECTIONS = {"decode_224": lambda a: decode(a, Path(a.data) / "train", "shared 224 px train files"),
            "decode_originals": lambda a: decode(a, Path(a.originals), "full-size originals"),
            "train": train_throughput, "inference": inference, "frozen_finetune": frozen_finetune,
            "predict_latency": predict_latency, "peak": peak, "full_run": full_run}
CUDA_ONLY = ("peak",)
DEFAULT_CPU = ("decode_224", "decode_originals", "train", "inference", "frozen_finetune", "predict_latency")


def _child(name, args, queue):
    try:
        result = SECTIONS[name](args)
    except Exception as e:  # reported in the table; the other sections still run
        queue.put({"error": f"{type(e).__name__}: {e}"})
        raise
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.device(args.device).type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    queue.put(result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--originals")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--sections", help=f"comma-separated, from {', '.join(SECTIONS)} (default on the CPU: "
                   f"{', '.join(DEFAULT_CPU)}; on CUDA: all)")
    p.add_argument("--compile", action="store_true", help="also time training with torch.compile")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--plain-epochs", type=int, default=1, help="plain frozen epochs actually timed")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--limit", type=int, help="full_run only: at most N images per class and split (a trial)")
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    sections = args.sections.split(",") if args.sections else list(SECTIONS if cuda else DEFAULT_CPU)
    unknown = [s for s in sections if s not in SECTIONS or (s in CUDA_ONLY and not cuda)]
    if unknown:
        p.error(f"unknown section, or one that needs --device cuda: {', '.join(unknown)}")
    ctx = mp.get_context("spawn")
    rows = []
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    print(f"{'section':<18} {'cxr':>10} {'plain':>10} {'unit':<9} {'ratio':>6} {'peak MB':>8}  what")
    for name in sections:
        if name == "decode_originals" and not args.originals:
            continue
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(name, args, queue))
        proc.start()
        r = queue.get()
        proc.join()
        if "error" in r:
            print(f"{name:<18} failed: {r['error']}", flush=True)
            rows.append({"section": name, **r})
            continue
        if r["plain"] is None:  # a measurement of the machine, nothing to compare with
            faster = None
        else:
            faster = r["plain"] / r["cxr"] if r["unit"] in ("s", "ms") else r["cxr"] / r["plain"]
        r.update(section=name, ratio=faster)
        rows.append(r)
        plain = f"{r['plain']:>10.2f}" if r["plain"] is not None else f"{'-':>10}"
        ratio = f"{faster:>5.2f}x" if faster is not None else f"{'-':>6}"
        print(f"{name:<18} {r['cxr']:>10.2f} {plain} {r['unit']:<9} {ratio} "
              f"{r['peak_rss_mb']:>8.0f}  {r['what']}"
              + (f"; peak GPU memory {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else ""), flush=True)
        if "ratio_name" in r:  # not a speed-up: what the ratio column means for this row
            print(f"{'':<18} (ratio = {r['ratio_name']})", flush=True)
    by_name = {r["section"]: r for r in rows if "error" not in r}
    if "train" in by_name and "peak" in by_name:
        share = by_name["train"]["tflops"] / by_name["peak"]["cxr"]
        by_name["peak"]["train_share"] = share
        print(f"from-scratch training uses {100 * share:.1f}% of the measured bf16 peak "
              f"({by_name['train']['cxr']:.0f} images/s x {TRAIN_GFLOP} GFLOP)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                               "device": args.device, "torch": str(torch.__version__),
                                               "gpu": torch.cuda.get_device_name() if cuda else None,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
