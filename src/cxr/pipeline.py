"""The steps `cxr run` and `cxr train` chain together, with explicit arguments (no CLI namespace).

Everything that can fail because of the user's input (data layout, unreadable images, weights,
an occupied output folder) is checked before the first byte is written to OUT.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torchvision

from . import __version__
from .config import TaskConfig
from .data.dataset import labels_of
from .data.folders import get_external_samples, is_sample, resolve_data_root
from .data.labels import class_names
from .data.loading import get_test_samples
from .data.overlap import backbone_overlap, content_overlap_notes
from .data.sites import site_counts
from .data.unlabelled import read_provenance
from .errors import CxrError, DataError
from .evaluation.evaluate import choose_operating_point, evaluate_model
from .evaluation.metrics import format_auc
from .evaluation.probes import write_probes
from .evaluation.seeds import check_layout
from .files import read_run_config, write_json
from .reporting.explain import draw_comparison, draw_run_figures, explain_run
from .reporting.report import write_report
from .study_data import (
    PreparedData,
    RunOptions,
    check_sites,
    claim_sites_manifest,
    decode_data,
    decode_externals,
    plan_data,
    task_dir,
    training_sites,
)
from .training.checkpoint import load_checkpoint, model_from_checkpoint
from .training.distributed import barrier, lost_rank_message, same_everywhere, shutdown
from .training.engine import fit, seed_everything
from .training.model import build_model, imagenet_state_dict
from .trust.fit import describe_fit, store_trust

ARTEFACTS = ("config.json", "history.csv", "best.pt", "last.pt", "val_predictions.csv", "metrics.json",
             "predictions.csv")


def pretrained_weights(configs: list[TaskConfig], weights: Path | None) -> dict | None:
    """ImageNet weights if any task needs them, checked against ResNet-18 before anything trains."""
    if not any(c.pretrained for c in configs):
        return None
    state = imagenet_state_dict(weights)
    build_model(state, source=str(weights) if weights else "torchvision ImageNet weights")
    return state


def refuse_seen_by_backbone(configs: list[TaskConfig], options: RunOptions, data: PreparedData, test_list, test,
                            external_sets: dict) -> None:
    """With a backbone from `cxr pretrain` as --weights: refuse (DataError) when its pretraining saw
    an image this run scores (the test split, an external set), by digest and by content; note when
    the pretraining normalised images otherwise than a task does."""
    provenance = read_provenance(options.weights) if any(c.pretrained for c in configs) else None
    if provenance is None:
        return
    sets = {"the test split": test if test is not None else (test_list, None),
            **{f"external set {n}": (samples, images) for n, (_, samples, images) in external_sets.items()}}
    sets = {k: v for k, v in sets.items() if v[0]}
    refusal = backbone_overlap(options.weights, provenance, sets, options.workers)
    if refusal:
        raise DataError(refusal)
    seen = provenance["spec"].get("intensity")
    for c in configs:
        if c.pretrained and c.intensity != seen:
            print(f"note: {c.task} normalises images with intensity {c.intensity!r}, its backbone was pretrained "
                  f"with {seen!r}: pass --intensity {seen} to feed it what it learnt from")


def backbone_card(config: TaskConfig, options: RunOptions) -> dict | None:
    """{"backbone": its provenance in short} for a task started from a `cxr pretrain` backbone."""
    provenance = read_provenance(options.weights) if config.pretrained else None
    if provenance is None:
        return None
    spec = provenance["spec"]
    return {"backbone": {"method": provenance["method"], "epochs": provenance["epochs_done"],
                         "images": provenance["images"], "image_size": spec["image_size"],
                         "intensity": spec["intensity"], "seed": spec["seed"], "file": str(options.weights),
                         "sources": provenance["sources"]}}


def claim_run_dir(run_dir: Path, config: TaskConfig, root: Path, options: RunOptions) -> str:
    """"fresh" or "resume" for `run_dir`; refuses to mix a new run into an old one."""
    existing = [name for name in ARTEFACTS if (run_dir / name).exists()]
    if not existing or options.overwrite:
        return "fresh"
    if not options.resume:
        raise CxrError(f"{run_dir}: holds a previous run ({', '.join(existing)}); pass --resume to continue "
                       "it, --overwrite to replace it, or choose another --out")
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise CxrError(f"{run_dir / 'config.json'}: missing or unreadable, so --resume cannot check the run; "
                       "pass --overwrite to start again") from None
    new = json.loads(json.dumps(config.to_dict()))  # as config.json holds it: tuples are lists there
    differ = [k for k in new if k != "epochs" and saved.get("config", {}).get(k) != new[k]]
    if saved.get("data") != str(Path(root).resolve()):
        differ.append("data")
    if differ:
        raise CxrError(f"{run_dir}: --resume with different settings ({', '.join(differ)}); repeat the "
                       "original options, or pass --overwrite to start again")
    return "resume"


def start_run_dir(run_dir: Path, mode: str) -> dict | None:
    """Prepare `run_dir`; for a resume, the last.pt to continue from (None if no epoch finished)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if mode == "fresh":
        for name in ARTEFACTS:
            (run_dir / name).unlink(missing_ok=True)
        return None
    for name in ("metrics.json", "predictions.csv", "val_predictions.csv"):  # made again from best.pt
        (run_dir / name).unlink(missing_ok=True)
    for tmp in run_dir.glob(".*.tmp"):  # left by a kill in the middle of an atomic write
        tmp.unlink()
    if not (run_dir / "last.pt").exists():
        return None
    last = load_checkpoint(run_dir / "last.pt")
    if "rng" not in last or last.get("optimizer") is None:
        raise CxrError(f"{run_dir / 'last.pt'}: holds no resume state; pass --overwrite to start again")
    return last


def feature_memo(options: RunOptions, config: TaskConfig, data: PreparedData, model) -> Callable | None:
    """With several seeds (options.memo), a frozen backbone's features of each image are computed
    once and reused by every seed whose split holds it: keyed by the image's path, the input
    settings and a digest of the backbone's weights (the same ImageNet weights give the same
    features whatever the seed)."""
    if options.memo is None or config.train_backbone:
        return None
    import hashlib

    h = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        if not name.startswith("fc."):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()
    paths = {"train": [s.path for s in data.splits.train], "val": [s.path for s in data.splits.val]}

    def features(compute: Callable, images: torch.Tensor, which: str) -> torch.Tensor:
        keys = [("features", p, config.image_size, config.intensity, options.precision, digest) for p in paths[which]]
        missing = [i for i, k in enumerate(keys) if k not in options.memo]
        if missing:
            for k, row in zip((keys[i] for i in missing), compute(images[missing])):
                options.memo[k] = row
        return torch.stack([options.memo[k] for k in keys])

    return features


def train_task(config: TaskConfig, data: PreparedData, root: Path, state: dict | None, run_dir: Path,
               mode: str, options: RunOptions, log: Callable[[str], None] = print):
    """Build, train (or continue) and checkpoint one task into `run_dir`, then choose its
    operating point on validation. With several processes (options.group), every rank trains and
    rank 0 alone writes. Returns the task's trackers (tracking.Trackers; None without --log),
    which have logged every epoch and are finished by the caller once results exist."""
    group = options.group
    if group.main:
        last = start_run_dir(run_dir, mode)
    else:
        last = load_checkpoint(run_dir / "last.pt") if mode == "resume" and (run_dir / "last.pt").exists() else None
    same_everywhere(last["epoch"] if last is not None else 0, group, f"the epoch to resume after in {run_dir}")
    trackers = None
    if group.main and options.trackers:
        from .reporting.tracking import data_digest, open_trackers

        previous = read_run_config(run_dir).get("tracking") if mode == "resume" and last is not None else None
        trackers = open_trackers(list(options.trackers), run_dir, options.log_dir, config.to_dict(),
                                 data_digest([s.path for s in data.splits.train + data.splits.val]), log, previous)
    if group.main:
        _write_run_config(config, data, root, run_dir, options, trackers.record() if trackers else None)
    if last is not None and last["epoch"] >= config.epochs:
        log(f"{config.task}: already trained for {last['epoch']} epochs; nothing to resume")
    else:
        seed_everything(config.seed)
        model = build_model(state if config.pretrained else None, config.train_backbone,
                            n_classes=len(class_names(config.labels)))
        sites = training_sites(data)
        fit(model, config, data.train_images, labels_of(data.splits.train), data.val_images,
            labels_of(data.splits.val), run_dir, options.device, resume=last, log=log,
            precision=options.precision, compile_model=options.compile_model, group=group,
            on_epoch=trackers.epoch if trackers else None, features=feature_memo(options, config, data, model),
            card=backbone_card(config, options), **sites)
    if not group.main:
        return None
    chosen = choose_operating_point(run_dir, config, data.splits.val, data.val_images, options.device)
    decision = "the class of highest probability" if chosen["rule"] == "argmax" else \
        f"threshold {chosen['threshold']:.3f} ({chosen['rule']})"
    log(f"{config.task} operating point from validation: {decision}, temperature {chosen['temperature']:.3f}")
    trust = store_trust(run_dir / "best.pt", data.train_images, labels_of(data.splits.train), data.val_images,
                        labels_of(data.splits.val), options.device, seed=config.seed,
                        extra={"bundled_sample": True} if is_sample(root) else None)
    log(f"{config.task}: {describe_fit(trust)}")
    return trackers


def _write_run_config(config: TaskConfig, data: PreparedData, root: Path, run_dir: Path,
                      options: RunOptions, tracking: dict | None = None) -> None:
    write_json(run_dir / "config.json", {
        **({"tracking": tracking} if tracking else {}),
        "config": config.to_dict(),
        "data": str(Path(root).resolve()),
        "sample": is_sample(root),
        "data_summary": data.summary,
        **({"sites": {"train": site_counts(data.splits.train), "val": site_counts(data.splits.val)}}
           if site_counts(data.splits.train) else {}),
        "weights": (str(options.weights) if options.weights else "torchvision:IMAGENET1K_V1")
        if config.pretrained else None,
        **(backbone_card(config, options) or {}),
        "device": str(options.device),
        "precision": options.precision,
        "compile": options.compile_model,
        "processes": options.group.world,
        "command": sys.argv,
        "versions": {"cxr": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
                     "torchvision": str(torchvision.__version__)},
    })


class Stopwatch:
    """Wall seconds per named step of a run, in the order they ran: `with clock("decode"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, step: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - t

    def table(self) -> dict[str, float]:
        return {**{k: round(v, 2) for k, v in self.seconds.items()},
                "total": round(time.perf_counter() - self._start, 2)}


def format_timings(timings: dict[str, float]) -> str:
    width = max(len(k) for k in timings)
    return "\n".join(f"  {k:<{width}}  {v:9.1f} s" for k, v in timings.items())


def evaluate_tasks(out: Path, configs: list[TaskConfig], test: tuple, external_sets: dict, options: RunOptions,
                   clock: Stopwatch, log: Callable[[str], None], checks: dict[str, list[str]] | None = None) -> None:
    """Each task's best.pt on test and every external set, then its figures and CAMs. `checks`:
    each set's overlap notes (content_overlap_notes), kept in its metrics file."""
    checks = checks or {}
    for c in configs:
        with clock(f"{c.task}: evaluate"):
            checkpoint = load_checkpoint(task_dir(out, c, options) / "best.pt")
            model, _ = model_from_checkpoint(checkpoint)
            m = evaluate_model(model, checkpoint, test[0], test[1], task_dir(out, c, options), options.device, seed=c.seed,
                               checks=checks.get("test"))
            write_probes(model, checkpoint, test[1], task_dir(out, c, options), options.device, seed=c.seed)
            log(f"{c.task} test: accuracy {m['accuracy']:.3f}, ROC AUC {format_auc(m['roc_auc'])}, "
                f"confusion {m['confusion_matrix']} (best epoch {checkpoint['epoch']})")
            for name, (folder, samples, images) in external_sets.items():
                m = evaluate_model(model, checkpoint, samples, images, task_dir(out, c, options), options.device, seed=c.seed,
                                   name=name, folder=folder, checks=checks.get(name))
                log(f"{c.task} on {name}: accuracy {m['accuracy']:.3f}, ROC AUC {format_auc(m['roc_auc'])}, "
                    f"confusion {m['confusion_matrix']}")
        with clock(f"{c.task}: figures and CAMs"):
            draw_run_figures(task_dir(out, c, options))
            explain_run(task_dir(out, c, options), options.n_examples, method=options.cam_method, device=options.device,
                        workers=options.workers)


def finish_tracking(out: Path, trackers: dict) -> None:
    """Each task's results (metrics with intervals, config, figures, artefacts) to its trackers."""
    for task, t in trackers.items():
        if t is not None:
            t.finish(task)


def run_study(root: Path, out: Path, configs: list[TaskConfig], options: RunOptions, evaluate: bool = True,
              log: Callable[[str], None] = print, externals: dict[str, Path] | None = None,
              sites: list[tuple[str, Path]] | None = None) -> dict | None:
    """Train every task and, with `evaluate`, test each best.pt (and evaluate it on every external
    set), draw the figures and write the report; OUT/timings.json says where the time went. `sites`:
    named sources, whose manifest `root` is written once the run folders are claimed (claim_sites_manifest)."""
    clock = Stopwatch()
    root = resolve_data_root(root)
    group = options.group
    if not group.main:
        log = lambda _: None  # noqa: E731
    if is_sample(root):
        log(f"data: cxr's bundled sample ({root}): real images, but too few for numbers that mean much; "
            "the report says so (cxr download fetches the full data set)")
    with clock("check and decode data"), lost_rank_message(group), contextlib.ExitStack() as claimed:
        check_layout(out, options.seeded)  # one layout per output folder: plain or seeded, never both
        modes = [claim_run_dir(task_dir(out, c, options), c, root, options) for c in configs]
        same_everywhere(modes, group, f"the state of {out}")
        claimed.enter_context(claim_sites_manifest(sites, root, out, options.overwrite, group.main))
        if not group.main:
            barrier(group)  # rank 0 decodes first and fills the cache; the others read it
        first = configs[0]
        test_list = get_test_samples(root, first.seed, first.limit, first.val_ratio, first.classes, first.labels) if evaluate else None
        external_lists = {name: get_external_samples(folder, first.labels) for name, folder in (externals or {}).items()}
        splits, summary = plan_data(root, first, test_list, options.workers, log, external_lists)
        check_sites(splits, configs)
        state = pretrained_weights(configs, options.weights)
        evaluating = evaluate and group.main  # only rank 0 evaluates
        data, test = decode_data(splits, summary, first.image_size, options, test_list if evaluating else None, log,
                                 class_names(first.labels))
        external_sets = decode_externals(externals or {}, external_lists, first.image_size, options, log) \
            if evaluating else {}
        checks: dict[str, list[str]] = {}
        if evaluating:
            others = {"test": test, **{n: (samples, images) for n, (_, samples, images) in external_sets.items()}}
            train_all = (data.splits.train + data.splits.val, [data.train_images, data.val_images])
            checks = content_overlap_notes(train_all, others, "train")
            for note in (n for notes in checks.values() for n in notes):
                log(note)
        refuse_seen_by_backbone(configs, options, data, test_list, test, external_sets)
        if group.main:
            barrier(group)
    trackers = {}
    with lost_rank_message(group):
        for c, mode in zip(configs, modes):
            with clock(f"{c.task}: train"):
                run_dir = task_dir(out, c, options)
                trackers[run_dir] = train_task(c, data, root, state, run_dir, mode, options, log)
    if group.active:
        log(f"training done on {group.world} processes; rank 0 goes on alone")
        shutdown()
        if not group.main:
            return None
    if not evaluate:
        finish_tracking(out, trackers)
        return None
    evaluate_tasks(out, configs, test, external_sets, options, clock, log, checks)
    if options.seeded:  # one seed of several: the report comes once all are done (seeds.run_seeds)
        finish_tracking(out, trackers)
        return clock.table()
    if options.skipped:
        write_json(out / "skipped.json", dict(options.skipped))
    with clock("report"):
        draw_comparison(out, [c.task for c in configs])
        summary = write_report(out, [c.task for c in configs])
    timings = clock.table()
    write_json(out / "timings.json", timings)
    summary["timings"] = timings  # as `cxr report` will put it when it rebuilds summary.json
    write_json(out / "summary.json", summary)
    log(f"wrote {out / 'report.html'}, {out / 'report.md'} and {out / 'summary.json'}")
    finish_tracking(out, trackers)
    log("where the time went (wall seconds):\n" + format_timings(timings))
    return summary


def run_seeds(root: Path, out: Path, configs: list, options, seeds: list[int],
              externals: dict[str, Path] | None = None, log: Callable[[str], None] = print,
              sites: list[tuple[str, Path]] | None = None) -> dict:
    """Train and evaluate every task once per seed, then write the aggregate, the comparisons and
    the report. With options.resume, finished seeds are skipped and the interrupted one continues."""
    from .evaluation.seeds import finished

    memo: dict = {}
    options = replace(options, memo=memo, seeded=True)
    tasks = [c.task for c in configs]
    seconds = {}
    for k in seeds:
        if options.resume and finished(out, tasks, k):
            log(f"seed {k}: every task trained and evaluated already; skipped")
            continue
        log(f"--- seed {k} ({seeds.index(k) + 1} of {len(seeds)}) ---")
        timings = run_study(root, out, [replace(c, seed=k) for c in configs], options, log=log, externals=externals,
                            sites=sites)
        seconds[f"seed{k}"] = timings
    if not options.group.main:  # under torchrun, rank 0 alone writes the aggregate and the report
        return None
    previous = json.loads((Path(out) / "timings.json").read_text()) if (Path(out) / "timings.json").is_file() else {}
    write_json(Path(out) / "timings.json", {**previous, **seconds})
    summary = write_report(out)  # seeded: it finds OUT/<task>/seed<K>/
    log(f"wrote {Path(out) / 'report.html'}, {Path(out) / 'aggregate.json'} and {Path(out) / 'comparisons.json'}")
    return summary
