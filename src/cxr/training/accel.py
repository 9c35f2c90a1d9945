"""Device-side speed that leaves the training arithmetic alone: numeric precision, compilation,
and where the uint8 training images live while a model trains.

- precision: "fp32", or "bf16" autocast (matrix products and convolutions in bfloat16, the loss
  and the optimiser in float32, weights kept in float32; bf16 keeps float32's exponent range, so
  no loss scaling is needed). "auto" is bf16 on a CUDA device that supports it and, on a CPU,
  whichever a few timed training steps on that CPU find faster (machine.py: with AMX bf16 trained
  2.4x faster, with AVX-512 BF16 alone 0.73x on one machine and 1.8x on another). Only training
  (and the frozen backbone's feature pass) uses it; evaluation, the operating point, prediction
  and CAMs always run in fp32, so reported numbers do not depend on it beyond what training
  itself learnt.
- compile: `torch.compile` of the model for the training and validation passes (the checkpoint
  still stores the plain module's weights). It costs a compilation per input shape and mode
  (about 50 s on 2 CPU cores for ResNet-18) and trained no faster there (bench.py: 49.1 against
  50.3 images/s), so it is off unless asked; on a GPU, measure it with bench.py --compile.
- staging: on CUDA the whole uint8 split goes to the device once when it needs less than half
  of the free device memory (5,216 images at 224 px are 262 MB), so a training step moves no
  data over PCIe at all; otherwise each gathered batch is copied from page-locked memory without
  blocking. On the CPU nothing moves.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from ..errors import CxrError
from .machine import choose_precision

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(name: str, device: torch.device | str) -> str:
    """"fp32" or "bf16" for `device`; "auto" as `machine.choose_precision` finds (and says why)."""
    return precision_choice(name, device)[0]


def precision_choice(name: str, device: torch.device | str) -> tuple[str, str]:
    """("fp32" or "bf16", why) for --precision `name` on `device`, refusing what cannot run."""
    if name not in PRECISIONS:
        raise CxrError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    if name == "bf16" and torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CxrError("--precision bf16: this CUDA device has no bfloat16 support; use --precision fp32")
    return choose_precision(name, device)


def autocast(device: torch.device | str, precision: str):
    """A context running the forward pass in `precision` ("fp32": no autocast at all)."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def widen(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32 if it is in a 16-bit float type (autocast's output), else as it is."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def fits_on_device(nbytes: int, free_bytes: int, share: float = 0.5) -> bool:
    """Whether data of `nbytes` may stay on a device with `free_bytes` free: at most `share` of it,
    leaving the rest to the model, its activations and the allocator."""
    return nbytes <= share * free_bytes


def stage(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Where a whole split (uint8 images, labels) lives during training: on a CUDA device when it
    fits (see `fits_on_device`), else where it is (batches then go through `to_device`)."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device == device:
        return tensor
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = tensor.numel() * tensor.element_size()
    return tensor.to(device) if fits_on_device(nbytes, free) else tensor


def to_device(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`batch` on `device`. A CPU batch bound for CUDA is page-locked first, so the copy does not
    block the host, which goes on queueing the step's kernels."""
    device = torch.device(device)
    if batch.device == device:
        return batch
    if device.type == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def compiled(model: nn.Module, enabled: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model`, or `torch.compile(model)` sharing its parameters (its state_dict keys stay plain)."""
    return torch.compile(model) if enabled else model


def resolve_device(name: str) -> torch.device:
    """--device auto|cpu|cuda as a torch.device (here, not in pipeline.py, so that commands that
    only predict do not import the training stack)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CxrError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return torch.device(name)
