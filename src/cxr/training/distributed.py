"""Several processes training one model: torchrun and PyTorch's DistributedDataParallel, arranged
so that N processes compute what one process computes with the same global batch.

`torchrun --nproc-per-node N -m cxr train ...` starts N copies of cxr; each reads its place
(RANK, WORLD_SIZE, LOCAL_RANK, set by torchrun) in `init_from_env`, which joins the process group
(NCCL on GPUs, one per local rank; gloo on CPUs). Then, in `engine.run_epoch`:
- every rank draws the same batch order from the same seed and takes its contiguous share of each
  global batch (`share`); `--batch-size` stays the global batch (the study's 32);
- the loss of a step is the global batch's: each rank's summed loss over its share divided by the
  weight total of the whole batch, times N because DDP averages the gradients it all-reduces;
- BatchNorm statistics are those of the global batch: torch's SyncBatchNorm on CUDA, and on the
  CPU, where torch's SyncBatchNorm refuses to run, `CpuSyncBatchNorm` (the same arithmetic through
  its own forward and backward passes with all_reduces);
- augmentation draws its random parameters for the whole global batch and each rank applies its
  rows (`augment.augment(..., rows=)`), so the generators stay in step;
- validation is split across the ranks and gathered, so every rank sees the same metrics and
  agrees on the best epoch and on early stopping.
Rank 0 alone writes files and prints. The result: the same model as one process, up to float
rounding (tests/test_distributed.py: 2 gloo processes against 1); so a run may be resumed with a
different number of processes (allowed, not tested).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import re
import signal
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import CxrError
from .accel import precision_choice, widen


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Group()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def quiet() -> bool | None:
    """tqdm's `disable` for this process: progress bars on rank 0 only (None: tqdm's own choice)."""
    return True if int(os.environ.get("RANK", "0")) > 0 else None


def init_from_env(device: torch.device, timeout_s: float = 1800) -> tuple[Group, torch.device]:
    """Join the process group torchrun set up; the group and this rank's device. One process
    (no torchrun): `SINGLE` and `device` unchanged."""
    if not launched_by_torchrun():
        return SINGLE, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise CxrError(f"rank {rank}: local rank {local_rank} but only {torch.cuda.device_count()} CUDA "
                           "devices here; start at most that many processes per node (--nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if device.type == "cpu":
        cpu_threads()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    # torchrun stops the surviving ranks with SIGTERM when one fails: turn it into an exception, so
    # atomic writes in progress remove their temporary files and the user reads why.
    signal.signal(signal.SIGTERM, _stopped)
    return Group(rank, world, local_rank), device


def cpu_threads() -> int:
    """Threads for this CPU process: torchrun sets OMP_NUM_THREADS=1 in every process unless it was
    set, which leaves a 16-core machine running 2 processes on 2 cores; then each process gets its
    share of the cores instead (cores / processes on this machine). Any other value is the user's
    and is kept."""
    if os.environ.get("OMP_NUM_THREADS") == "1":
        share_of_cores = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(share_of_cores)
    return torch.get_num_threads()


class Stopped(Exception):
    pass


def _stopped(signum, frame):
    raise Stopped("stopped by torchrun (SIGTERM), most likely because another rank failed")


def shutdown() -> None:
    """Leave the process group; a SIGTERM from now on ends the process quietly, as by default."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def lost_rank_message(group: Group):
    """Collective failures and torchrun's SIGTERM, as one line saying what happened and what to do."""
    try:
        yield
    except (RuntimeError, Stopped) as e:
        # gloo reports a lost peer as a plain RuntimeError naming its source file; anything else
        # (a bug, out of memory) is not a lost rank and goes on as it would on one process
        lost = isinstance(e, (Stopped, dist.DistError)) or any(
            word in str(e) for word in ("gloo", "Connection", "NCCL", "connection"))
        if not (group.active and lost):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first).split(". ")[0][:160]  # gloo's source line
        raise CxrError(f"rank {group.rank}: training stopped: lost another rank ({first}); every completed epoch "
                       "is saved in last.pt: rerun the same torchrun command with --resume") from None


def barrier(group: Group) -> None:
    if group.active:
        dist.barrier()


def agreed_precision(name: str, device: torch.device, group: Group) -> tuple[str, str]:
    """(precision, why) for every process: rank 0's choice, made once the group is joined and the
    threads are set (`cpu_threads`), while the others wait, so "auto" measures one process at the
    thread count it trains with instead of every process racing for the cores."""
    if name != "auto":  # nothing measured: every process checks it alike (and refuses alike)
        return precision_choice(name, device)
    chosen = [precision_choice(name, device) if group.main else None]
    if group.active:
        dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def same_everywhere(value, group: Group, what: str) -> None:
    """CxrError unless every rank holds the same `value` (a small picklable object)."""
    if not group.active:
        return
    values = [None] * group.world
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        seen = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise CxrError(f"the processes disagree on {what} ({seen}); with several machines, --data and --out must "
                       "be on storage every machine sees at the same path")


def share(n: int, group: Group) -> tuple[int, int]:
    """This rank's contiguous rows [start, stop) of a batch of `n` (sizes differ by at most one)."""
    base, extra = divmod(n, group.world)
    start = group.rank * base + min(group.rank, extra)
    return start, start + base + (1 if group.rank < extra else 0)


def sum_all(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """The sum over ranks of `tensor` (a copy; `tensor` itself on one process)."""
    if not group.active:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def gather_rows(part: torch.Tensor, n: int, group: Group) -> torch.Tensor:
    """Every rank's `share` of `n` rows, concatenated in rank order: the whole (n, ...) tensor."""
    if not group.active:
        return part
    sizes = [share(n, Group(r, group.world))[1] - share(n, Group(r, group.world))[0] for r in range(group.world)]
    padded = torch.zeros((max(sizes), *part.shape[1:]), dtype=part.dtype, device=part.device)
    padded[:len(part)] = part
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded)
    return torch.cat([p[:s] for p, s in zip(pieces, sizes)])


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalisation with the statistics of the batch across all ranks, and its gradient,
    on any device; one small all_gather forward and one all_reduce backward, like torch's CUDA SyncBatchNorm
    (whose kernels exist for CUDA only). Heavy elementwise work goes to F.batch_norm forward and
    to three in-place passes backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        channels = x.shape[1]
        xf = widen(x)
        n_local = xf.numel() // channels
        if n_local:
            var_local, mean_local = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        else:  # a rank with no rows of this batch (a batch smaller than the number of ranks)
            var_local = mean_local = xf.new_zeros(channels)
        # one collective: every rank's (count, mean, variance), combined exactly (Chan et al.):
        # no E[x^2] - E[x]^2 cancellation
        mine = torch.cat([mean_local.new_tensor([n_local]), mean_local, var_local])
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, mine, group=group)
        every = torch.stack(every)
        counts, means, variances = every[:, :1], every[:, 1:channels + 1], every[:, channels + 1:]
        count = counts.sum()
        mean = (counts * means).sum(0) / count
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / count
        out = F.batch_norm(x, mean.to(xf.dtype), var.to(xf.dtype), weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        ctx.count, ctx.group = count, group
        ctx.mark_non_differentiable(mean, var, count)
        return out, mean, var, count

    @staticmethod
    def backward(ctx, grad, *_stats):
        x, weight, mean, invstd = ctx.saved_tensors
        channels = x.shape[1]
        xf, gf = widen(x), widen(grad)
        view = (1, channels, 1, 1)
        sum_dy = gf.sum((0, 2, 3))
        sum_dy_xmu = (gf * (xf - mean.view(view))).sum((0, 2, 3))
        both = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(both, group=ctx.group)
        mean_dy, mean_dy_xmu = both[:channels] / ctx.count, both[channels:] / ctx.count
        k = invstd * (weight if weight is not None else 1)
        a = -k * invstd * invstd * mean_dy_xmu  # grad_x = k * grad + a * x + b, per channel
        b = -k * mean_dy - a * mean
        grad_x = (gf * k.view(view)).addcmul_(xf, a.view(view)).add_(b.view(view)).to(x.dtype)
        # this rank's share of the parameter gradients: DDP sums (averages) them over the ranks
        grad_w = (sum_dy_xmu * invstd).to(weight.dtype) if weight is not None else None
        grad_b = sum_dy.to(weight.dtype) if weight is not None else None
        return grad_x, grad_w, grad_b, None, None


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch across all ranks, for CPU
    process groups (gloo), where `torch.nn.SyncBatchNorm` does not run. Same state dict as
    BatchNorm2d; in eval mode, or outside a process group, it is BatchNorm2d.

    Statistics in float32 (float64 for a float64 model), each rank's combined exactly (Chan's
    parallel variance), so the result matches one process to float rounding; the running variance
    is the unbiased one, as BatchNorm keeps it."""

    def __init__(self, *args, group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        out, mean, var, count = _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps,
                                                             self.group or dist.group.WORLD)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = float(count)
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.to(self.running_var.dtype) * (n / max(n - 1, 1)),
                                                       alpha=factor)
        return out


def _swap_batchnorm(model: nn.Module, is_old: Callable[[nn.Module], bool], make: Callable[..., nn.Module]) -> nn.Module:
    """Replace, in place, every BatchNorm layer `is_old` accepts by `make(...)` holding its state."""
    for name, child in model.named_children():
        if is_old(child):
            new = make(child.num_features, child.eps, child.momentum, child.affine,
                       child.track_running_stats).to(child.weight)
            new.load_state_dict(child.state_dict())
            new.weight.requires_grad_(child.weight.requires_grad)
            new.bias.requires_grad_(child.bias.requires_grad)
            new.train(child.training)
            setattr(model, name, new)
        else:
            _swap_batchnorm(child, is_old, make)
    return model


def sync_batchnorm(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model` with every BatchNorm2d computing statistics over all ranks (in place)."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    group = dist.new_group(backend="gloo")  # its own channel, apart from DDP's gradient buckets
    return _swap_batchnorm(model, lambda m: type(m) is nn.BatchNorm2d,
                           lambda *args: CpuSyncBatchNorm(*args, group=group))


def plain_batchnorm(model: nn.Module) -> nn.Module:
    """Undo `sync_batchnorm`: plain BatchNorm2d layers with the same state (in place)."""
    return _swap_batchnorm(model, lambda m: isinstance(m, (CpuSyncBatchNorm, nn.SyncBatchNorm)), nn.BatchNorm2d)


def wrap(module: nn.Module, group: Group, device: torch.device | str) -> nn.Module:
    """`module` under DistributedDataParallel (itself on one process). Buffers are not broadcast:
    synchronised BatchNorm already keeps the running statistics equal on every rank."""
    if not group.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device)
    ids = [device.index] if device.type == "cuda" else None
    # torch 2.14 renamed broadcast_buffers; older releases (the GPU image's 2.11) know only that
    known = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in known else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=ids, **no_sync)
