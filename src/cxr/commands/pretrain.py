"""`cxr pretrain`: self-supervised pretraining of ResNet-18 on unlabelled X-rays (training/pretrain.py).

OUT holds backbone.pt (a torchvision resnet18 state dict without `fc`, which `--weights` of
`cxr run` / `cxr train` loads into the finetune* presets), provenance.json (what it learnt from:
images, each folder's digest, method, epochs, seed), images.csv (every image's SHA-1) and
thumbnails.npy (each image's 32x32 thumbnail): from those two a run that uses the backbone refuses
to score images the pretraining saw (data/overlap.py, `backbone_overlap`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from ..config import PRETRAIN_METHODS, PretrainSpec
from ..errors import CxrError
from . import options as o

OUTPUTS = ("backbone.pt", "provenance.json", "images.csv", "thumbnails.npy", "history.csv", "pretrain_last.pt")


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining of ResNet-18 on unlabelled X-rays",
                       description="Pretrain ResNet-18 on every image under the --data folders (labels ignored; a "
                       "folder layout's test/ is left out), writing OUT/backbone.pt for --weights of cxr run / cxr "
                       "train (the finetune* presets), with OUT/provenance.json. Needs the lightly package "
                       "(pip install 'cxr[pretrain]').")
    p.add_argument("--data", type=Path, action="append", required=True, metavar="DIR",
                   help="a folder of images (any tree; a folder layout's train/ and val/), or a CSV manifest (its "
                   "rows but the test split); repeatable")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    d = PretrainSpec()
    p.add_argument("--method", choices=PRETRAIN_METHODS, default=d.method,
                   help=f"simclr (contrastive, NT-Xent) or byol (momentum target, no negatives) (default: {d.method})")
    p.add_argument("--epochs", type=o.positive_int, default=d.epochs, help=f"passes over the images (default: {d.epochs})")
    p.add_argument("--batch-size", type=o.positive_int, default=d.batch_size,
                   help=f"images per step, two views each (default: {d.batch_size})")
    p.add_argument("--lr", type=o.learning_rate, default=d.lr, help=f"AdamW peak learning rate (default: {d.lr:g})")
    p.add_argument("--image-size", type=o.image_size, default=d.image_size,
                   help=f"square view side in pixels (default: {d.image_size})")
    p.add_argument("--intensity", choices=["none", "equalize", "standardize"], default=d.intensity,
                   help=f"per-image normalisation, as the task that will use the backbone (default: {d.intensity}, "
                   "the robust presets'; the study's finetune uses none)")
    p.add_argument("--temperature", type=o.positive_float, default=d.temperature,
                   help=f"SimCLR's NT-Xent temperature (default: {d.temperature:g})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the initial weights, batches and views (default: {d.seed})")
    p.add_argument("--keep-every", type=o.positive_int, metavar="N",
                   help="also keep the backbone of every N-th epoch as backbone_epochE.pt (a linear-probe curve)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted pretraining in OUT (same options; "
                   "--epochs may grow)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier pretraining in OUT")
    p.add_argument("--skip-bad-images", action="store_true", help="go on without unreadable images instead of stopping")
    o.add_precision(p, "training arithmetic (default: auto, as cxr run: bf16 where this machine trains faster in it)")
    o.add_runtime(p)
    o.add_cache(p)
    p.set_defaults(func=cmd_pretrain, distributed=True)


def _spec(args: argparse.Namespace) -> PretrainSpec:
    return PretrainSpec(method=args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        image_size=args.image_size, intensity=args.intensity, temperature=args.temperature,
                        seed=args.seed)


def _claim(out: Path, spec: PretrainSpec, images_digest: str, args: argparse.Namespace) -> dict | None:
    """None for a fresh start (after checking OUT may be used), or the resume state."""
    from ..training.pretrain import STATE_FORMAT

    existing = [n for n in OUTPUTS if (out / n).exists()]
    if args.resume:
        state_file = out / "pretrain_last.pt"
        if not state_file.is_file():
            if existing:
                raise CxrError(f"{out}: no pretrain_last.pt to resume from; pass --overwrite to start again")
            return None
        import torch

        try:
            state = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CxrError(f"{state_file}: unreadable ({type(e).__name__}); pass --overwrite to start again") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CxrError(f"{state_file}: not a cxr pretraining state; pass --overwrite to start again")
        saved = {k: v for k, v in state["spec"].items() if k != "epochs"}
        differ = [k for k, v in spec.to_dict().items() if k != "epochs" and saved.get(k) != v]
        if state.get("images_digest") != images_digest:
            differ.append("data (the images differ)")
        if differ:
            raise CxrError(f"{out}: --resume with different settings ({', '.join(differ)}); repeat the original "
                           "options, or pass --overwrite to start again")
        if state["epoch"] >= spec.epochs:
            raise CxrError(f"{out}: already pretrained for {state['epoch']} epochs; pass a larger --epochs to go on")
        return state
    if existing and not args.overwrite:
        raise CxrError(f"{out}: holds a previous pretraining ({', '.join(existing)}); pass --resume to continue it, "
                       "--overwrite to replace it, or choose another --out")
    return None


def _remove_outputs(out: Path) -> None:
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    for old in out.glob("backbone_epoch*.pt"):
        old.unlink()


@contextlib.contextmanager
def _nothing_left_on_failure(out: Path, main: bool):
    """A pretraining that fails (or is interrupted) before its first epoch's resume state is saved
    leaves none of its files, nor OUT if it made it: images.csv and thumbnails.npy alone made a
    rerun refused as a previous pretraining. After an epoch, pretrain_last.pt and its files stay
    for --resume."""
    made = not out.exists()
    try:
        yield
    except BaseException:
        if main and not (out / "pretrain_last.pt").is_file():
            _remove_outputs(out)
            if made and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise


def cmd_pretrain(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    import torchvision

    from .. import __version__
    from ..data.cache import cached_decode
    from ..data.decode import bad_images_error
    from ..data.folders import resolve_data_root
    from ..data.overlap import thumbnails
    from ..data.unlabelled import (
        PROVENANCE_FORMAT,
        digests,
        folder_digest,
        pretraining_images,
    )
    from ..files import atomic_write, save_torch, write_csv, write_json
    from ..training.accel import resolve_device
    from ..training.distributed import agreed_precision, init_from_env
    from ..training.pretrain import _lightly, pretrain

    spec = _spec(args)
    _lightly()  # a missing package is one line before anything is read
    paths, owners, notes = pretraining_images(args.data)
    for note in notes:
        print(f"note: {note}")
    file_digests = digests(paths, args.workers)
    images_digest = folder_digest(file_digests)
    resume = _claim(args.out, spec, images_digest, args)
    group, device = init_from_env(resolve_device(args.device))
    precision, precision_reason = agreed_precision(args.precision, device, group)
    images, bad = cached_decode(paths, spec.image_size, args.workers, o.cache_dir(args), desc="decode")
    if bad:
        if not args.skip_bad_images:
            raise bad_images_error(bad)
        keep = sorted(set(range(len(paths))) - {i for i, _, _ in bad})
        print(f"note: {len(bad)} unreadable images left out: {', '.join(str(p) for _, p, _ in bad[:5])}")
        paths, file_digests = [paths[i] for i in keep], [file_digests[i] for i in keep]
        owners = [owners[i] for i in keep]
        images = images[keep]
    sources = []
    for k, source in enumerate(args.data):
        mine = [i for i, owner in enumerate(owners) if owner == k]
        sources.append({"data": str(resolve_data_root(Path(source)).resolve()), "images": len(mine),
                        "digest": folder_digest([file_digests[i] for i in mine])})
    provenance = {
        "format": PROVENANCE_FORMAT, "method": spec.method, "spec": spec.to_dict(),
        "epochs_done": 0 if resume is None else resume["epoch"],
        "images": len(paths), "images_digest": images_digest, "sources": sources, "notes": notes,
        "device": str(device), "precision": precision,
        "precision_reason": precision_reason, "processes": group.world, "command": args.argv or sys.argv,
        "versions": {"cxr": __version__, "torch": str(torch.__version__),
                     "torchvision": str(torchvision.__version__)},
    }
    out = args.out

    def on_epoch(epoch: int, weights: dict) -> None:
        write_json(out / "provenance.json", {**provenance, "epochs_done": epoch})
        if args.keep_every and epoch % args.keep_every == 0:
            save_torch(out / f"backbone_epoch{epoch}.pt", weights)

    with _nothing_left_on_failure(out, group.main):
        if group.main:
            out.mkdir(parents=True, exist_ok=True)
            if resume is None:
                _remove_outputs(out)
            write_csv(out / "images.csv", ["path", "sha1"], zip(map(str, paths), file_digests))

            def save_thumbs(p: Path) -> None:
                with open(p, "wb") as f:
                    np.save(f, thumbnails(images).to(torch.float16).numpy())

            atomic_write(out / "thumbnails.npy", save_thumbs)
        pretrain(images, spec, out, device, precision, resume, group, on_epoch=on_epoch,
                 extra_state={"images_digest": images_digest})
    if group.main:
        print(f"wrote {out / 'backbone.pt'}: pass it as --weights to cxr run / cxr train (the finetune* tasks)")
    return 0
