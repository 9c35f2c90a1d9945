"""Choices made by measuring the machine cxr runs on, rather than by a rule about its hardware.

- Precision (`choose_precision`): on a CPU, `--precision auto` times a few training steps of
  ResNet-18 in fp32 and in bf16 autocast (channels_last, as training runs) and takes bf16 only when
  it trains clearly faster (BF16_GAIN). No rule by instruction set served every machine: with AMX
  (an Intel Xeon) bf16 trained 2.4x faster than fp32; with AVX-512 BF16 and no AMX it was 0.73x on
  one Intel Xeon and 1.8x on an AMD EPYC (docs/speed.md). The answer is cached per CPU (its model
  name, its instruction set as torch sees it, AMX or not), torch version and thread count in
  `$XDG_CACHE_HOME/cxr/precision.json` when nothing else ran beside it, so the measurement (about
  2.7 s) is paid once per machine; delete that file to measure again. On CUDA, bf16 where the
  device supports it.
- Threads (`busy_threads`): torch's CPU pool defaults to one thread per core, and OpenMP threads
  that share their cores with another job wait on each other: `cxr demo` took 3 min 36 s beside
  another job on 2 cores of an AMD EPYC, 27 s with `--threads 1`. When other jobs already keep
  cores busy at the start, cxr computes with the cores left (at least one, never more than torch's
  default) and says so; `--threads` or OMP_NUM_THREADS override.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ..files import write_json

BF16_GAIN = 1.15  # bf16 must train this much faster than fp32 to be chosen: it also rounds more
PROBE_SIZE, PROBE_BATCH, PROBE_STEPS = 112, 16, 3  # a probe of about a second per precision on 2 cores


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cxr" / "precision.json"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else the platform's words)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_key() -> str:
    """What the measurement depends on. Virtual machines often report a generic model name
    ("Intel(R) Xeon(R) Processor"), hence the instruction set and AMX beside it."""
    capability = torch.backends.cpu.get_cpu_capability()
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return (f"{cpu_name()} | {capability}{' AMX' if amx else ''} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads")


def training_rates(*, size: int = PROBE_SIZE, batch: int = PROBE_BATCH, steps: int = PROBE_STEPS) -> dict:
    """Images/s of a ResNet-18 training step (forward, backward, optimiser) on the CPU in fp32 and
    in bf16 autocast, channels_last; the two alternate so that a change of load hits both."""
    from torchvision.models import resnet18

    with torch.random.fork_rng(devices=[]):  # a caller's random stream is left as it was
        torch.manual_seed(0)
        model = resnet18(num_classes=2).to(memory_format=torch.channels_last)
        images = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3)
    labels = torch.arange(batch) % 2

    def step(precision: str) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return time.perf_counter() - start

    times = {"fp32": [], "bf16": []}
    for precision in times:  # first steps allocate and pick kernels: not timed
        step(precision)
    for _ in range(steps):
        for precision in times:
            times[precision].append(step(precision))
    return {precision: batch / statistics.median(t) for precision, t in times.items()}


def measured_cpu_precision(measure: Callable[[], dict] = training_rates,
                           busy: Callable[[], int] | None = None) -> tuple[str, str]:
    """("fp32" or "bf16", why) for this CPU, from the cache or measured now: cached only when no
    other task was seen beside the measurement (`busy`, default `busy_cores`), so a ratio skewed by
    another job is used once, not kept. On an allocation of some cores or under a CPU quota nothing
    is seen (the machine-wide count says nothing there) and the measurement is cached."""
    path, key = cache_file(), cpu_key()
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    where = f"cached in {path}"
    if not (isinstance(entry, dict) and {"fp32", "bf16"} <= entry.keys()):
        entry = {name: round(rate, 1) for name, rate in measure().items()}
        # CXR_IGNORE_LOAD=1 (the tests): the first measurement is kept whatever runs beside it, so every
        # process of a session computes in the same precision (two runs a test compares must agree)
        ignore = busy is None and os.environ.get("CXR_IGNORE_LOAD") == "1"
        others = 0 if ignore else (busy or busy_cores)()
        if others:
            where = f"measured now beside {others} other running task(s), so not cached"
        else:
            cache[key] = entry
            where = f"measured now, cached in {path}"
            try:
                write_json(path, cache)
            except OSError:
                where = f"measured now, not cached ({path} is not writable)"
    gain = entry["bf16"] / entry["fp32"]
    choice = "bf16" if gain >= BF16_GAIN else "fp32"
    why = (f"{choice}: a training step on this CPU ran at {entry['bf16']:g} images/s in bf16 against "
           f"{entry['fp32']:g} in fp32 ({gain:.2f}x; bf16 needs {BF16_GAIN}x), {where}; "
           f"--precision overrides")
    return choice, why


def choose_precision(name: str, device: torch.device | str) -> tuple[str, str]:
    """("fp32" or "bf16", why) for --precision `name` on `device`; only "auto" on a CPU measures."""
    kind = torch.device(device).type
    if name != "auto":
        return name, f"{name}: asked for with --precision"
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "bf16: this CUDA device computes bfloat16 natively"
        return "fp32", "fp32: this CUDA device has no bfloat16 support"
    if kind == "cpu":
        return measured_cpu_precision()
    return "fp32", f"fp32: bf16 is not measured on {kind} devices"


def busy_cores(samples: int = 5, interval: float = 0.02, loadavg: Path = Path("/proc/loadavg"),
               cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """How many tasks other than this process are running right now (Linux: the runnable count of
    /proc/loadavg, median of a few reads, less this process); 0 where it cannot be read, and 0 where
    this process may use only some of the machine's cores (a Slurm, cpuset or taskset allocation, or
    a container's CPU quota): /proc/loadavg counts the whole machine's tasks, most of them then on
    cores that are not ours."""
    if usable_cores() < (os.cpu_count() or 1) or cpu_quota(cgroup) is not None:
        return 0
    counts = []
    for i in range(samples):
        try:
            running = loadavg.read_text().split()[3].split("/")[0]
            counts.append(int(running))
        except (OSError, IndexError, ValueError):
            return 0
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, int(statistics.median(counts)) - 1)


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPUs a cgroup quota grants this process's container (cgroup v2 `cpu.max`, or v1
    `cpu/cpu.cfs_quota_us` over its period), or None where no quota is set or none can be read."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def quota_threads(quota: float, default: int) -> int | None:
    """The threads to compute with under a cgroup CPU quota of `quota` CPUs when torch would take
    `default` (the host's physical cores): the quota rounded up, when that is fewer; else None.
    More threads than the quota grants run in turn, each paused while the others use the quota."""
    threads = max(1, math.ceil(quota))
    return threads if threads < default else None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform says, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def busy_threads(cores: int, busy: int, default: int) -> int | None:
    """The threads to compute with when `busy` other tasks run on `cores` logical cores and torch
    would take `default` (one per physical core): the cores left, at least one, when that is fewer
    than the default; else None (the default stands)."""
    threads = max(1, cores - busy)
    return threads if busy > 0 and threads < default else None
