"""Device-side speed that leaves the training arithmetic alone: numeric precision, compilation,
and where the uint8 training images live while a model trains.

- precision: "fp32", or "bf16" autocast (matrix products and convolutions in bfloat16, the loss
  and the optimiser in float32, weights kept in float32; bf16 keeps float32's exponent range, so
  no loss scaling is needed). "auto" is bf16 where the hardware has bf16 matrix units: a CUDA
  device that supports it, or a CPU with AMX (on a 2-core Xeon with AMX, training ran 2.4x faster
  in bf16, benchmarks/bench.py "train" row); elsewhere fp32. AVX-512 BF16 alone is not enough: on
  a 2-core Xeon with it and without AMX, bf16 channels_last trained at 12.2 images/s against fp32
  channels_last's 16.8 (the same bench row), and emulated bf16 is slower still. Only training
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

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bf16 matrix products in hardware (not emulated)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    if torch.device(device).type == "cpu":
        # AMX tiles only: AVX-512 BF16 without them trained slower than fp32 (the docstring above)
        return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())  # private, hence the care
    return False


def resolve_precision(name: str, device: torch.device | str) -> str:
    """"fp32" or "bf16" for `device`; "auto" is bf16 where `native_bf16(device)`."""
    if name not in PRECISIONS:
        raise CxrError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise CxrError("--precision bf16: this CUDA device has no bfloat16 support; use --precision fp32")
    return name


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
