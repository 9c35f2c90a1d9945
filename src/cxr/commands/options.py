"""Option groups shared by several commands, defined once, and the argument validators.

Light on purpose: only the standard library and `config` (no torch), so building the parser is fast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from ..config import AUGMENT_PRESETS, PRESETS, QUICK, TaskConfig, make_config
from ..data.labels import LABEL_SETS
from ..errors import CxrError


def output_file(*suffixes: str):
    """A validator for a file a command writes: one of `suffixes`, in a folder that exists."""
    def check(text: str) -> Path:
        if Path(text).suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{text}: name a {' or '.join(suffixes)} file")
        if not Path(text).parent.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: the folder {Path(text).parent} does not exist; create it "
                                             "first or write the file elsewhere")
        return Path(text)
    return check


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def learning_rate(text: str) -> float:
    """A finite rate above 0 (a negative, zero, nan or inf rate trains nothing or diverges)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, e.g. 3e-4, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (e.g. a softmax temperature: 0 divides by zero, below 0 inverts the objective)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def image_size(text: str) -> int:
    value = int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"must be at least 32 (ResNet-18 downsamples by 32), got {text}")
    return value


def seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer (NumPy's seeds are), got {text}")
    return value


def seeds(text: str) -> list[int]:
    """--seeds 0,1,2: distinct seeds, in the order given."""
    values = [seed(part.strip()) for part in text.split(",") if part.strip()]
    if not values or len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"give distinct seeds separated by commas, e.g. 0,1,2 (got {text!r})")
    return values


def checkpoint(text: str) -> Path:
    """A checkpoint argument; a task folder holding best.pt stands for its best.pt, said on stderr."""
    path = Path(text)
    if path.is_dir() and (path / "best.pt").is_file():
        print(f"note: {path} is a task folder: using its best.pt ({path / 'best.pt'})", file=sys.stderr)
        return path / "best.pt"
    return path


def ratio(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in PRESETS]
    if unknown or not names:
        import difflib

        hints = [f"{t!r}: did you mean {close[0]!r}?" for t in unknown
                 if (close := difflib.get_close_matches(t, list(PRESETS), n=1, cutoff=0.6))]
        raise argparse.ArgumentTypeError(f"unknown task {', '.join(map(repr, unknown)) or repr(text)}"
                                         + (f" ({'; '.join(hints)})" if hints else "")
                                         + f"; choose from {', '.join(PRESETS)}")
    return list(dict.fromkeys(names))


def external(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=DIR, e.g. official_half=data/official_test_half")
    return name, Path(folder)


def add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to compute (default: auto, CUDA when available)")
    p.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                   help="threads decoding images (default: the number of CPU cores)")
    add_threads(p)


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, help="threads torch computes with on the CPU (default: torch's, "
                   "one per core, or fewer when other jobs already run: docs/speed.md, a busy machine)")


def add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, help="decoded-image cache (default: $XDG_CACHE_HOME/cxr/images, "
                   "else ~/.cache/cxr/images); rebuilt whenever a file, its size or mtime, or the resolution changes")
    p.add_argument("--no-cache", action="store_true", help="decode in memory only; write no cache")


def add_mmap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mmap", action="store_true", help="keep the decoded images on disk (in the cache) and "
                   "memory-map them, for sets larger than memory (docs/guide/scaling.md)")


def add_explain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cam-method", choices=["cam", "gradcam"], default="cam",
                   help="class activation map: classic CAM (default) or Grad-CAM")
    p.add_argument("--n", type=positive_int, default=16, dest="n_examples",
                   help="images per CAM figure (default: 16)")


def cache_dir(args: argparse.Namespace) -> Path | None:
    from ..data.cache import default_cache_dir

    return None if args.no_cache else (args.cache_dir or default_cache_dir())


def add_training(p: argparse.ArgumentParser) -> None:
    d = TaskConfig()
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", action="append", metavar="[NAME=]DIR", help="folder holding train/ (and val/, "
                        "test/); `sample`: the small real sample shipped with cxr (unless a folder of that name exists "
                        "here); or a CSV manifest (as --manifest). Repeat it to train on several sites at once, each "
                        "named (--data kermany=DIR --data nih=DIR): the data set's folder layout, a folder of NORMAL/ "
                        "and PNEUMONIA/ (all of it split by patient into train and validation) or a manifest; they are "
                        "written into OUT/sites.csv, split by patient within each site, weighed equally in the loss "
                        "(--site-weight), and the kept epoch is the one whose worst site's validation ROC AUC is highest")
    p.add_argument("--site-weight", action="append", default=[], type=_site_weight, metavar="NAME=W",
                   help="with several --data sites: multiply that site's (otherwise equal) share of the loss by W, "
                   "e.g. nih=2 (repeatable)")
    source.add_argument("--manifest", type=Path, dest="data", metavar="FILE.csv", help="a CSV with columns "
                        "path,label[,patient][,split] instead of the folder layout (paths relative to the file; "
                        "without split, rows are split by patient; `cxr manifest DIR` writes one)")
    p.add_argument("--classes", help="with a manifest: its label names mapped onto NORMAL and PNEUMONIA, "
                   "e.g. normal=NORMAL,opacity=PNEUMONIA")
    p.add_argument("--labels", choices=list(LABEL_SETS), help="the question: pneumonia (NORMAL vs PNEUMONIA, the "
                   "study's; default), subtype (pneumonia images only: VIRAL vs BACTERIAL, BACTERIAL positive) or "
                   "three-way (NORMAL / BACTERIAL / VIRAL, decided by the highest probability); the subtype comes from "
                   "the file name (person1_bacteria_2.jpeg) or a manifest's subtype column")
    p.add_argument("--out", type=Path, required=True, help="output folder; each task writes OUT/<task>/")
    p.add_argument("--epochs", type=positive_int, help=f"epochs (default: {d.epochs}, the study's)")
    p.add_argument("--quick", action="store_true", help=f"CPU-sized: {QUICK['image_size']} px and {QUICK['epochs']} "
                   "epochs unless --image-size/--epochs say otherwise (its cost in accuracy: docs/results.md)")
    p.add_argument("--batch-size", type=positive_int, help=f"batch size (default: {d.batch_size}); under torchrun "
                   "the global batch, shared among the processes (docs/guide/scaling.md)")
    p.add_argument("--image-size", type=image_size, help=f"square input side in pixels (default: {d.image_size})")
    p.add_argument("--lr", type=learning_rate, help="Adam learning rate for every task given (default: the "
                   "task's preset: scratch 1e-3, finetune 1e-4)")
    p.add_argument("--seed", type=seed, help=f"seed for the split, the init and the batch order (default: {d.seed})")
    p.add_argument("--val-ratio", type=ratio, help=f"share of train images, by patient, held out for "
                   f"validation (default: {d.val_ratio}); with several --data sites a small one gets more, up to "
                   "50 images of its rarer class (at most 30%% of it)")
    p.add_argument("--limit", type=positive_int, help="at most N images per class in each split (quick trials)")
    add_tracking(p)

    p.add_argument("--weights", type=Path, help="offline ImageNet weights: a torchvision resnet18 state dict "
                   "file (default: torchvision's cache, downloaded once when online)")
    p.add_argument("--class-weights", choices=["none", "balanced"], help="weight the loss by inverse class "
                   "frequency of train (default: none, as in the study)")
    p.add_argument("--augment", choices=list(AUGMENT_PRESETS), help="on-device augmentation after the intensity "
                   "normalisation: light/strong (exposure, contrast, gamma, rotation, zoom; strong adds blur and "
                   "noise), crop (random resized crop of 70-100%% of the area, rotation, exposure and contrast), "
                   "frame (the same with crops of 35-100%%, so framing cannot tell the class) (default: none, or the "
                   "preset's)")
    p.add_argument("--intensity", choices=["none", "equalize", "standardize"], help="per-image intensity "
                   "normalisation before the network (default: none, or the preset's)")
    p.add_argument("--label-smoothing", type=float, help="label smoothing of the training loss (default: 0)")
    p.add_argument("--optimizer", choices=["adam", "adamw"], help="adam (the study's) or adamw (decoupled "
                   "weight decay)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default: 0)")
    p.add_argument("--schedule", choices=["constant", "cosine"], help="learning-rate schedule (default: constant)")
    p.add_argument("--warmup-epochs", type=int, help="linear warm-up before the cosine schedule")
    p.add_argument("--select-by", choices=["val_loss", "val_auc", "last", "worst_site_auc"], help="which epoch to keep as best.pt: "
                   "lowest validation loss, highest validation ROC AUC, the last one, or (several --data sites) "
                   "the highest ROC AUC of the worst site (default: val_loss, the study's; worst_site_auc with several "
                   "sites)")
    p.add_argument("--patience", type=positive_int, help="stop after this many epochs without a better "
                   "selection metric (default: never)")
    p.add_argument("--target-sensitivity", type=ratio, help="choose the decision threshold on validation as the "
                   "highest reaching this sensitivity (default: maximise Youden's J on validation)")
    p.add_argument("--threshold-rule", choices=["youden", "0.5"], help="decision threshold without "
                   "--target-sensitivity: youden (maximise Youden's J on validation; the study tasks' default) or "
                   "0.5 (the model's own decision; the robust presets', trained class-balanced)")
    p.add_argument("--calibrate", action="store_true", default=None,
                   help="fit a softmax temperature on validation and apply it to every prediction")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in OUT")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT from its last "
                   "completed epoch (the other options must match the original run; --epochs may grow)")
    p.add_argument("--skip-bad-images", action="store_true", help="go on without unreadable images (listed, "
                   "and left out of the data summary) instead of stopping")
    add_precision(p, "training arithmetic: bf16 autocast or fp32 (default: auto: bf16 on CUDA GPUs that have it; "
                  "on a CPU whichever a few timed training steps find faster, measured once per CPU, torch version and "
                  "thread count, and cached); "
                  "evaluation and prediction always run in fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training (a one-off "
                   "compilation of about a minute; measured no faster on a 2-core CPU, meant for GPUs: "
                   "benchmarks/bench.py --compile tells for yours)")
    p.add_argument("--deterministic", action="store_true", help="use deterministic algorithms only (slower on "
                   "GPU), so a resumed run matches an uninterrupted one exactly")
    add_runtime(p)
    add_cache(p)
    add_mmap(p)


def add_tracking(p) -> None:
    """--log tensorboard|mlflow and --log-dir (tracking.py)."""
    # --track and --track-dir say the same under torchrun, whose own parser takes --log... for itself
    p.add_argument("--log", "--track", action="append", choices=("tensorboard", "mlflow"), default=[],
                   dest="trackers", help="also log the run to TensorBoard (event files in OUT/<task>/tensorboard/) or "
                   "MLflow (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here); repeat for both; under torchrun "
                   "write --track. Needs the 'tracking' extra: pip install 'cxr[tracking]'")
    p.add_argument("--log-dir", "--track-dir", type=Path, dest="log_dir", help="with --log tensorboard: event files "
                   "in LOG_DIR/<task>/ instead of OUT/<task>/tensorboard/ (under torchrun: --track-dir)")


def add_precision(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help=help)


def _site_weight(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        weight = float(value)
    except ValueError:
        weight = -1.0
    if not sep or not name or not (math.isfinite(weight) and weight > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=W with W a number above 0, e.g. nih=2")
    return name, weight


def data_sources(data: list | Path, site_weight: list[tuple[str, float]], out: Path
                 ) -> tuple[Path, list[tuple[str, Path]] | None]:
    """(root, sites) of a run's --data values. One source (named or not): its folder or manifest, and
    None. Several named sources: OUT/sites.csv, which the run writes once its run folders are
    claimed (study_data.claim_sites_manifest), and the (name, path) of each. Only parses: writes nothing."""
    values = data if isinstance(data, list) else [data]
    weights = dict(site_weight or [])
    if len(values) == 1:
        if weights:
            raise CxrError("--site-weight goes with several --data sources (--data kermany=DIR --data nih=DIR)")
        from ..data.sites import parse_sources

        return (parse_sources([str(values[0])])[0][1] if "=" in str(values[0]) else Path(values[0])), None
    from ..data.sites import parse_sources

    sources = parse_sources([str(v) for v in values])
    unknown = sorted(set(weights) - {n for n, _ in sources})
    if unknown:
        raise CxrError(f"--site-weight {', '.join(unknown)}: no --data source has that name "
                       f"(the sources: {', '.join(n for n, _ in sources)})")
    return Path(out) / "sites.csv", sources


def configs(task_names: list[str], args: argparse.Namespace, several: bool = False) -> list[TaskConfig]:
    """One config per task: its preset with the flags given on top (`--quick` fills the rest).
    `several` training sites (data_sources): the site weights, and the kept epoch by the worst
    site's validation ROC AUC unless --select-by says otherwise."""
    quick = QUICK if args.quick else {}
    sites = dict(site_weights=tuple(sorted(dict(args.site_weight).items()))) if several else {}
    select_by = (args.select_by or "worst_site_auc") if several else args.select_by
    if args.select_by == "worst_site_auc" and not several:
        raise CxrError("--select-by worst_site_auc needs several training sites (--data kermany=DIR --data nih=DIR)")
    return [make_config(t, epochs=args.epochs or quick.get("epochs"), batch_size=args.batch_size,
                        image_size=args.image_size or quick.get("image_size"),
                        lr=args.lr, seed=args.seed, val_ratio=args.val_ratio, limit=args.limit,
                        class_weights=args.class_weights, target_sensitivity=args.target_sensitivity,
                        threshold_rule=args.threshold_rule,
                        calibrate=args.calibrate, augment=args.augment, intensity=args.intensity,
                        label_smoothing=args.label_smoothing, optimizer=args.optimizer,
                        weight_decay=args.weight_decay, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
                        select_by=select_by, patience=args.patience, classes=args.classes,
                        labels=args.labels, **sites)
            for t in task_names]


# What run_options reads that a command without those flags (cxr demo, cxr train) leaves at this
# value: its parser sets them as defaults (set_defaults(**RUN_DEFAULTS)), so nothing patches the namespace.
RUN_DEFAULTS = dict(resume=False, skip_bad_images=False, compile=False, deterministic=False, trackers=[],
                    log_dir=None, cam_method="cam", n_examples=16, mmap=False)


def add_run_defaults(p: argparse.ArgumentParser) -> None:
    """RUN_DEFAULTS for what `p` has no flag for."""
    flags = {a.dest for a in p._actions}
    p.set_defaults(**{k: v for k, v in RUN_DEFAULTS.items() if k not in flags})


def run_options(args: argparse.Namespace):
    """The pipeline's RunOptions from the flags (device, precision, cache, ...), each read as the
    parser left it (RUN_DEFAULTS for what a command has no flag for)."""
    import torch

    from ..run_options import RunOptions
    from ..training.accel import precision_choice, resolve_device

    trackers = args.trackers
    if trackers:
        from ..reporting.tracking import check_trackers

        check_trackers(trackers)  # a missing package is one line, before anything is trained
    device = resolve_device(args.device)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    # under torchrun the processes choose together once joined (train._distributed_options)
    precision, why = (args.precision, "") if under_torchrun() else precision_choice(args.precision, device)
    return RunOptions(device=device, workers=args.workers, weights=args.weights,
                      overwrite=args.overwrite, resume=args.resume, skip_bad_images=args.skip_bad_images,
                      cam_method=args.cam_method, n_examples=args.n_examples, cache_dir=cache_dir(args),
                      precision=precision, precision_reason=why,
                      command=tuple(args.argv or sys.argv), compile_model=args.compile,
                      mmap=args.mmap, trackers=tuple(dict.fromkeys(trackers)), log_dir=args.log_dir)


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def apply_threads(args: argparse.Namespace) -> None:
    """torch's CPU thread pool, set before any work: --threads, else (for a command that computes,
    started by hand on a machine where other jobs already run) the cores those jobs leave, or in a
    container with a CPU quota as many threads as the quota grants, said on stderr
    (training/machine.py measured why). OMP_NUM_THREADS, torchrun, and CXR_IGNORE_LOAD=1
    (the tests: processes they compare must compute alike) leave torch's default alone."""
    if not hasattr(args, "threads"):
        return
    threads = args.threads
    if threads is None and "OMP_NUM_THREADS" not in os.environ and not under_torchrun() \
            and os.environ.get("CXR_IGNORE_LOAD") != "1":
        import torch

        from ..training.machine import busy_cores, busy_threads, cpu_quota, quota_threads, usable_cores

        cores, busy, default = usable_cores(), busy_cores(), torch.get_num_threads()
        threads = busy_threads(cores, busy, default)
        quota = cpu_quota()
        if quota is not None and (threads := quota_threads(quota, default)) is not None:
            print(f"cxr: this container may use {quota:g} CPU{'' if quota == 1 else 's'} (its cgroup quota): computing with {threads} "
                  f"thread{'s' if threads > 1 else ''} instead of {default}, as more threads than the quota "
                  f"are paused in turn (--threads {default} to use them all)", file=sys.stderr)
        elif threads is not None:
            print(f"cxr: {busy} other task{'s' if busy > 1 else ''} running on this machine's {cores} cores: "
                  f"computing with {threads} thread{'s' if threads > 1 else ''} instead of {default}, as threads "
                  f"that share a core wait on each other (--threads {default} to use them all)", file=sys.stderr)
    if threads:
        import torch

        torch.set_num_threads(threads)


def device(args: argparse.Namespace):
    from ..training.accel import resolve_device

    return resolve_device(args.device)


def check_mmap(args: argparse.Namespace) -> None:
    if getattr(args, "mmap", False) and args.no_cache:
        raise CxrError("--mmap keeps the decoded images in the cache folder: drop --no-cache (or pass --cache-dir DIR)")
