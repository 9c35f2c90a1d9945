"""The checkpoint format: plain dicts of tensors and primitives, written atomically, loaded with
`torch.load(weights_only=True)` so a file can never run code, and checked before use."""

from __future__ import annotations

import pickle
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torchvision
from torch import nn

from .. import __version__
from ..config import CLASSES, TaskConfig, config_from_dict
from ..data.labels import class_names
from ..errors import CheckpointError
from ..files import folder_hint, save_torch
from .model import build_model
from .operating_point import OperatingPoint

FORMAT = "cxr-checkpoint-v1"


def make_checkpoint(model: nn.Module, config: TaskConfig, epoch: int, metrics: dict,
                    best_val_loss: float, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict | None = None) -> dict:
    """A checkpoint dict; `extra` adds resume state (history, RNG states) to last.pt."""
    return {
        **(extra or {}),
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "config": config.to_dict(),
        "classes": list(class_names(config.labels)),
        "epoch": epoch,
        "metrics": dict(metrics),
        "best_val_loss": best_val_loss,
        "threshold": 0.5,  # decision threshold on P(PNEUMONIA) used by evaluate and predict
        # str(): torch.__version__ is a TorchVersion, a class weights_only loading refuses
        "versions": {"cxr": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
    }


def save_checkpoint(path: Path | str, checkpoint: dict) -> None:
    save_torch(path, checkpoint)


def load_checkpoint(path: Path | str) -> dict:
    """A verified cxr checkpoint, or CheckpointError naming the file and the problem."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint{folder_hint(path)}; pass a best.pt written by cxr")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; train first (cxr train / cxr run)")
    if path.suffix.lower() in (".jpeg", ".jpg", ".png", ".dcm", ".dicom"):
        raise CheckpointError(f"{path}: is an image, not a checkpoint; the checkpoint comes first, e.g. "
                              f"cxr predict OUT/scratch/best.pt {path}")
    try:
        with warnings.catch_warnings():  # a cut or foreign pickle warns of its protocol before failing
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # every failure to read is one line naming the file; which line depends on the bytes
        try:
            with open(path, "rb") as f:
                head = f.read(2)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot be read ({err.strerror or err}); check its permissions") from None
        is_pickle = head == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
        if not is_pickle:  # neither PyTorch's zip nor a pickle: corrupt or another kind of file, not a crafted one
            raise CheckpointError(f"{path}: not a checkpoint (its bytes are no saved PyTorch file: corrupt, "
                                  "truncated or another kind of file); pass a best.pt written by cxr") from None
        if isinstance(e, pickle.UnpicklingError):
            # weights_only refused a named object a plain checkpoint never holds, or read an instruction of a
            # pickle protocol torch.save does not write (a Python pickle of another kind); an unknown
            # instruction after torch's own protocol-2 header is a garbled byte: a corrupt file, said below
            lines = [ln.strip() for ln in str(e).splitlines()
                     if "global" in ln.lower() or ("Unsupported" in ln and head != b"\x80\x02")]
            if lines:
                raise CheckpointError(f"{path}: refused: not a plain cxr checkpoint, loading it could run code "
                                      f"({lines[0][:160]})") from None
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint ({type(e).__name__}); "
                              "retrain or use another file") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cxr checkpoint (no '{FORMAT}' marker); pass a best.pt "
                              "or last.pt written by cxr")
    expected = class_names(ck.get("config", {}).get("labels")) if isinstance(ck.get("config"), dict) else CLASSES
    if tuple(ck.get("classes", ())) != expected:
        raise CheckpointError(f"{path}: classes {ck.get('classes')} differ from {list(expected)}, its label set's; "
                              "this checkpoint was not made by this version of cxr")
    return ck


def model_from_checkpoint(ck: dict) -> tuple[nn.Module, TaskConfig]:
    """Rebuild the model a checkpoint describes and load its weights (no download needed)."""
    config = config_from_dict(ck["config"])
    model = build_model(None, train_backbone=config.train_backbone, n_classes=len(class_names(config.labels)))
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit ResNet-18: {str(e).splitlines()[0]}") from None
    return model, config


def for_site(ck: dict, site: str | None) -> dict:
    """The checkpoint as it decides at `site`: its threshold, temperature and operating point
    replaced by those stored for that site under "operating_points" (`cxr adapt --finetune`
    chooses one per site on that site's validation images), and the out-of-distribution flag's
    threshold and validation reference by the site's where they are stored; `site` None: the
    checkpoint as it is.
    An unknown site is a CheckpointError naming the sites there are."""
    if site is None:
        return ck
    points = ck.get("operating_points") or {}
    if site not in points:
        known = ", ".join(sorted(points)) or "none (only a fine-tuned run fitted by cxr adapt stores them)"
        raise CheckpointError(f"--site {site}: this checkpoint has no operating point for that site; its sites: {known}")
    op = OperatingPoint.from_dict(points[site])
    trust = ck.get("trust")
    if op.ood_threshold is not None and isinstance(trust, dict):  # the flag accepts as many of this site's images
        trust = {**trust, "threshold": float(op.ood_threshold)}
    if op.reference_rows is not None and isinstance(trust, dict) and "reference" in trust:
        trust = {**trust, "reference": site_reference(trust["reference"], *op.reference_rows)}
    return {**ck, "threshold": float(op.threshold), "temperature": float(op.temperature),
            "operating_point": replace(op, site=site).to_dict(), **({"trust": trust} if trust is not None else {})}


def site_reference(reference: dict, start: int, stop: int) -> dict:
    """A stored validation reference (trust.fit.Reference as a dict) cut to rows [start, stop): one
    site's validation images, what a check at that site compares with. Its kept features are those
    of the rows in range; a reference stored without their rows keeps all of them."""
    out = {k: reference[k][start:stop] for k in ("logits", "labels", "scores")}
    rows = reference.get("feature_rows")
    if rows is None:
        return {**reference, **out}
    inside = (rows >= start) & (rows < stop)
    return {**reference, **out, "features": reference["features"][inside], "feature_rows": rows[inside] - start}
