"""Correctness of the CUDA training path against the CPU, on real images; run by gpu_check.sh.

Prints one line per check and exits non-zero if any fails:
- staging: the uint8 split lives on the GPU after `stage`, and a pinned non-blocking copy of a
  gathered batch equals the CPU batch;
- fp32 on CUDA vs fp32 on the CPU: one eval pass, same weights (loss within 1e-3 relative;
  cuDNN and TF32-free fp32 differ only in summation order);
- bf16 autocast vs fp32 on CUDA: the same pass (loss within 2e-2 relative);
- one training step, compiled vs eager, on CUDA (train loss within 1e-3 relative);
- `fit` for 2 epochs on CUDA in bf16 writes a best.pt whose weights are fp32 and plain-named.

    python benchmarks/gpu_check.py --data DATA      (PYTHONPATH=src where cxr is not installed)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from cxr.config import make_config
from cxr.data.dataset import labels_of
from cxr.data.decode import decode_all
from cxr.data.folders import list_split
from cxr.training.accel import stage, to_device
from cxr.training.checkpoint import load_checkpoint
from cxr.training.engine import fit, run_epoch, seed_everything
from cxr.training.model import build_model, set_train_mode
from cxr.training.preprocess import normalize, place

FAILED = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a data folder in the usual layout (train/ is read)")
    p.add_argument("--n", type=int, default=256, help="training images to check on (default: 256)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the script itself")
    args = p.parse_args()
    cuda = torch.device(args.device)
    assert cuda.type != "cuda" or torch.cuda.is_available(), "no CUDA device"
    samples = list_split(Path(args.data), "train")
    chosen = [samples[i] for i in np.random.default_rng(1).permutation(len(samples))[:args.n]]
    images, _ = decode_all([s.path for s in chosen], 224, 8)
    labels = labels_of(chosen)

    staged = stage(images, cuda)
    idx = torch.randperm(len(images))[:32]
    copied = to_device(images[idx], cuda)
    check("staging", staged.device.type == cuda.type and torch.equal(staged.cpu(), images)
          and torch.equal(copied.cpu(), images[idx]), f"split on {staged.device}, pinned copy equal")

    seed_everything(0)
    model = build_model(None).eval()
    losses = {}
    for device, precision in (("cpu", "fp32"), (cuda.type, "fp32"), (cuda.type, "bf16")):
        place(model, device)
        data = stage(images, device)
        with torch.no_grad():
            losses[device, precision] = run_epoch(lambda x, d=device: model(normalize(x, d)), data, labels, 64,
                                                  device, precision=precision)["loss"]
    dev, cpu = losses[cuda.type, "fp32"], losses["cpu", "fp32"]
    check(f"fp32 {cuda.type} vs cpu", rel(dev, cpu) < 1e-3, f"eval loss {dev:.6f} vs {cpu:.6f}, rel {rel(dev, cpu):.1e}")
    bf = losses[cuda.type, "bf16"]
    check("bf16 vs fp32", rel(bf, dev) < 2e-2, f"eval loss {bf:.6f} vs {dev:.6f}, rel {rel(bf, dev):.1e}")

    step_losses = {}
    for compile_model in (False, True):
        seed_everything(0)
        model = place(build_model(None), cuda)
        set_train_mode(model, True)
        net = torch.compile(model) if compile_model else model
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        g = torch.Generator().manual_seed(0)
        step_losses[compile_model] = run_epoch(lambda x, n=net: n(normalize(x, cuda)), stage(images[:64], cuda),
                                               labels[:64], 64, cuda, opt, g)["loss"]
    r = rel(step_losses[True], step_losses[False])
    check("compile vs eager step", r < 1e-3, f"{step_losses[True]:.6f} vs {step_losses[False]:.6f}, rel {r:.1e}")

    with tempfile.TemporaryDirectory() as tmp:
        config = make_config("scratch", epochs=2, image_size=224, seed=0)
        seed_everything(0)
        model = build_model(None)
        half = len(images) // 2
        history = fit(model, config, images[:half], labels[:half], images[half:], labels[half:], Path(tmp), cuda,
                      log=print, precision="bf16")
        best = load_checkpoint(Path(tmp) / "best.pt")
        ok = (all(v.dtype != torch.bfloat16 for v in best["model"].values())
              and set(best["model"]) == set(build_model(None).state_dict()) and len(history) == 2)
        check("fit on cuda, bf16", ok, f"val loss {[round(h['val_loss'], 4) for h in history]}")
    print("all checks passed" if not FAILED else f"FAILED: {', '.join(FAILED)}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
