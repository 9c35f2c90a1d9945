"""The steps `cxr run` and `cxr train` chain together, with explicit arguments (no CLI namespace):
check and decode the data, train each task into its run folder, evaluate every best.pt, report.

Everything that can fail because of the user's input (data layout, unreadable images, weights,
an occupied output folder) is checked before the first byte is written to OUT. The steps it chains
live beside it: the data (`study_data`), the run folder (`run_folder`), the weights a task starts
from (`starting_weights`), frozen features shared by seeds (`feature_memo`); how to run, `run_options`.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .config import TaskConfig
from .data.dataset import labels_of
from .data.folders import get_external_samples, is_sample, resolve_data_root
from .data.labels import class_names
from .data.loading import get_test_samples
from .data.overlap import content_overlap_notes
from .evaluation.evaluate import choose_operating_point, evaluate_model
from .evaluation.metrics import format_auc
from .evaluation.probes import write_probes
from .evaluation.seeds import check_layout
from .feature_memo import feature_memo
from .files import read_run_config, write_json
from .reporting.explain import draw_comparison, draw_run_figures, explain_run
from .reporting.report import write_report
from .run_folder import claim_run_dir, start_run_dir, task_dir, write_run_config
from .run_options import RunOptions
from .starting_weights import backbone_card, pretrained_weights, refuse_seen_by_backbone
from .study_data import (
    EvalSet,
    PreparedData,
    check_sites,
    claim_sites_manifest,
    decode_data,
    decode_externals,
    plan_data,
    training_sites,
)
from .training.checkpoint import load_checkpoint, model_from_checkpoint
from .training.distributed import barrier, lost_rank_message, same_everywhere, shutdown
from .training.engine import fit, seed_everything
from .training.model import build_model
from .trust.fit import describe_fit, store_trust

Log = Callable[[str], None]


@dataclass
class StudyInputs:
    """What the data steps hand to training and evaluation (test and the external sets: rank 0 only)."""

    data: PreparedData                  # train and val, split by patient and decoded
    state: dict | None                  # ImageNet weights, if any task needs them
    test: tuple | None                  # the test split (samples, images), when this process evaluates
    external_sets: dict[str, EvalSet]   # by name, when this process evaluates
    checks: dict[str, list[str]]        # each scored set's notes on copies of train images in it


def train_task(config: TaskConfig, data: PreparedData, *, root: Path, state: dict | None, run_dir: Path,
               mode: str, options: RunOptions, log: Log = print):
    """Build, train (or continue) and checkpoint one task into `run_dir`, then choose its
    operating point on validation. With several processes (options.group), every rank trains and
    rank 0 alone writes. Returns the task's trackers (tracking.Trackers; None without --log),
    which have logged every epoch and are finished by the caller once results exist."""
    group = options.group
    if group.main:
        last = start_run_dir(run_dir, mode)
    elif mode == "resume" and (run_dir / "last.pt").exists():
        last = load_checkpoint(run_dir / "last.pt")
    else:
        last = None
    done = last["epoch"] if last is not None else 0
    same_everywhere(done, group, f"the epoch to resume after in {run_dir}")
    trackers = None
    if group.main and options.trackers:
        resumed = mode == "resume" and last is not None
        trackers = _open_trackers(config, data, run_dir=run_dir, resumed=resumed, options=options, log=log)
    if group.main:
        write_run_config(run_dir, config, data=data, root=root, options=options,
                         tracking=trackers.record() if trackers else None)
    if last is not None and last["epoch"] >= config.epochs:
        log(f"{config.task}: already trained for {last['epoch']} epochs; nothing to resume")
    else:
        _fit_task(config, data, state=state, run_dir=run_dir, last=last, options=options, log=log,
                  on_epoch=trackers.epoch if trackers else None)
    if not group.main:
        return None
    _choose_and_fit_trust(config, data, root=root, run_dir=run_dir, options=options, log=log)
    return trackers


def _open_trackers(config: TaskConfig, data: PreparedData, *, run_dir: Path, resumed: bool,
                   options: RunOptions, log: Log):
    """The task's trackers (--log), continuing the runs config.json names when a run resumes."""
    from .reporting.tracking import data_digest, open_trackers

    previous = read_run_config(run_dir).get("tracking") if resumed else None
    digest = data_digest([s.path for s in data.splits.train + data.splits.val])
    return open_trackers(list(options.trackers), run_dir, options.log_dir, config.to_dict(), digest, log,
                         previous)


def _fit_task(config: TaskConfig, data: PreparedData, *, state: dict | None, run_dir: Path,
              last: dict | None, options: RunOptions, log: Log, on_epoch: Callable | None) -> None:
    """Seed, build and fit the task's model (from `last` when a run resumes)."""
    seed_everything(config.seed)
    model = build_model(state if config.pretrained else None, config.train_backbone,
                        n_classes=len(class_names(config.labels)))
    sites = training_sites(data)
    fit(model, config, data.train_images, labels_of(data.splits.train), data.val_images,
        labels_of(data.splits.val), run_dir, options.device, resume=last, log=log,
        precision=options.precision, compile_model=options.compile_model, group=options.group,
        on_epoch=on_epoch, features=feature_memo(options, config, data, model),
        card=backbone_card(config, options), **sites)


def _choose_and_fit_trust(config: TaskConfig, data: PreparedData, *, root: Path, run_dir: Path,
                          options: RunOptions, log: Log) -> None:
    """Once best.pt is final: its operating point chosen on validation, and the statistics that say
    whether an image looks like its training images (stored in best.pt)."""
    chosen = choose_operating_point(run_dir, config, data.splits.val, data.val_images, options.device)
    decision = "the class of highest probability" if chosen.rule == "argmax" else \
        f"threshold {chosen.threshold:.3f} ({chosen.rule})"
    log(f"{config.task} operating point from validation: {decision}, "
        f"temperature {chosen.temperature:.3f}")
    trust = store_trust(run_dir / "best.pt", data.train_images, labels_of(data.splits.train),
                        data.val_images, labels_of(data.splits.val), options.device, seed=config.seed,
                        extra={"bundled_sample": True} if is_sample(root) else None,
                        val_sites=training_sites(data).get("val_sites"))
    log(f"{config.task}: {describe_fit(trust)}")


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


def evaluate_tasks(out: Path, configs: list[TaskConfig], *, test: tuple, external_sets: dict[str, EvalSet],
                   options: RunOptions, clock: Stopwatch, log: Log,
                   checks: dict[str, list[str]] | None = None) -> None:
    """Each task's best.pt on test and every external set, then its figures and CAMs. `checks`:
    each set's overlap notes (content_overlap_notes), kept in its metrics file."""
    checks = checks or {}
    for c in configs:
        run_dir = task_dir(out, c, options)
        with clock(f"{c.task}: evaluate"):
            _evaluate_task(c, run_dir, test=test, external_sets=external_sets, checks=checks,
                           options=options, log=log)
        with clock(f"{c.task}: figures and CAMs"):
            draw_run_figures(run_dir)
            explain_run(run_dir, options.n_examples, method=options.cam_method, device=options.device,
                        workers=options.workers)


def _evaluate_task(config: TaskConfig, run_dir: Path, *, test: tuple, external_sets: dict[str, EvalSet],
                   checks: dict[str, list[str]], options: RunOptions, log: Log) -> None:
    """One task's best.pt on test (with its probes) and on every external set."""
    checkpoint = load_checkpoint(run_dir / "best.pt")
    model, _ = model_from_checkpoint(checkpoint)
    test_samples, test_images = test
    m = evaluate_model(model, checkpoint, test_samples, test_images, run_dir, options.device,
                       seed=config.seed, checks=checks.get("test"))
    write_probes(model, checkpoint, test_images, run_dir, options.device, seed=config.seed)
    log(f"{config.task} test: {_scores(m)} (best epoch {checkpoint['epoch']})")
    for name, s in external_sets.items():
        m = evaluate_model(model, checkpoint, s.samples, s.images, run_dir, options.device, seed=config.seed,
                           name=name, folder=s.folder, checks=checks.get(name))
        log(f"{config.task} on {name}: {_scores(m)}")


def _scores(metrics: dict) -> str:
    return (f"accuracy {metrics['accuracy']:.3f}, ROC AUC {format_auc(metrics['roc_auc'])}, "
            f"confusion {metrics['confusion_matrix']}")


def finish_tracking(trackers: dict) -> None:
    """Each task's results (metrics with intervals, config, figures, artefacts) to its trackers."""
    for task, t in trackers.items():
        if t is not None:
            t.finish(task)


def prepare_inputs(root: Path, configs: list[TaskConfig], options: RunOptions, *, evaluate: bool,
                   externals: dict[str, Path], log: Log) -> StudyInputs:
    """List and split the data, decode it (rank 0 alone decodes test and the external sets), note
    copies of train images in the sets that score, and check the weights the tasks start from."""
    first = configs[0]
    test_list = get_test_samples(root, first.seed, first.limit, first.val_ratio, first.classes,
                                 first.labels) if evaluate else None
    external_lists = {name: get_external_samples(folder, first.labels)
                      for name, folder in externals.items()}
    splits, summary = plan_data(root, first, test_list, workers=options.workers, log=log,
                                externals=external_lists)
    check_sites(splits, configs)
    state = pretrained_weights(configs, options.weights)
    evaluating = evaluate and options.group.main  # only rank 0 evaluates
    data, test = decode_data(splits, summary, image_size=first.image_size, options=options,
                             test=test_list if evaluating else None, log=log,
                             classes=class_names(first.labels))
    external_sets = decode_externals(externals, external_lists, first.image_size, options, log) \
        if evaluating else {}
    checks = _copies_of_train(data, test, external_sets, log) if evaluating else {}
    refuse_seen_by_backbone(configs, options, test_list=test_list, test=test, external_sets=external_sets)
    return StudyInputs(data, state, test, external_sets, checks)


def _copies_of_train(data: PreparedData, test: tuple, external_sets: dict[str, EvalSet],
                     log: Log) -> dict[str, list[str]]:
    """Each scored set's notes on copies of train or val images in it (content_overlap_notes), logged."""
    others = {"test": test, **{n: (s.samples, s.images) for n, s in external_sets.items()}}
    train_all = (data.splits.train + data.splits.val, [data.train_images, data.val_images])
    checks = content_overlap_notes(train_all, others, "train")
    for note in (n for notes in checks.values() for n in notes):
        log(note)
    return checks


def run_study(root: Path, out: Path, configs: list[TaskConfig], options: RunOptions, *, evaluate: bool = True,
              log: Log = print, externals: dict[str, Path] | None = None,
              sites: list[tuple[str, Path]] | None = None) -> dict | None:
    """Train every task and, with `evaluate`, test each best.pt (and evaluate it on every external
    set), draw the figures and write the report; OUT/timings.json says where the time went. `sites`:
    named sources, whose manifest `root` is written once the run folders are claimed
    (claim_sites_manifest)."""
    clock = Stopwatch()
    root = resolve_data_root(root)
    group = options.group
    if not group.main:
        log = lambda _: None  # noqa: E731
    if options.precision_reason:
        log(f"training precision: {options.precision_reason}")
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
        inputs = prepare_inputs(root, configs, options, evaluate=evaluate, externals=externals or {}, log=log)
        if group.main:
            barrier(group)
    trackers = {}
    with lost_rank_message(group):
        for c, mode in zip(configs, modes):
            with clock(f"{c.task}: train"):
                run_dir = task_dir(out, c, options)
                trackers[run_dir] = train_task(c, inputs.data, root=root, state=inputs.state, run_dir=run_dir,
                                               mode=mode, options=options, log=log)
    if group.active:
        log(f"training done on {group.world} processes; rank 0 goes on alone")
        shutdown()
        if not group.main:
            return None
    if not evaluate:
        finish_tracking(trackers)
        return None
    evaluate_tasks(out, configs, test=inputs.test, external_sets=inputs.external_sets, options=options,
                   clock=clock, log=log, checks=inputs.checks)
    if options.seeded:  # one seed of several: the report comes once all are done (seeds.run_seeds)
        finish_tracking(trackers)
        return clock.table()
    summary = _write_study_report(out, configs, options, clock, log)
    finish_tracking(trackers)
    log("where the time went (wall seconds):\n" + format_timings(summary["timings"]))
    return summary


def _write_study_report(out: Path, configs: list[TaskConfig], options: RunOptions, clock: Stopwatch,
                        log: Log) -> dict:
    """The comparison figure, report.html and .md, timings.json and summary.json (with the timings)."""
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
    return summary


def run_seeds(root: Path, out: Path, configs: list[TaskConfig], options: RunOptions, seeds: list[int], *,
              externals: dict[str, Path] | None = None, log: Log = print,
              sites: list[tuple[str, Path]] | None = None) -> dict | None:
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
        timings = run_study(root, out, [replace(c, seed=k) for c in configs], options, log=log,
                            externals=externals, sites=sites)
        seconds[f"seed{k}"] = timings
    if not options.group.main:  # under torchrun, rank 0 alone writes the aggregate and the report
        return None
    timings_file = Path(out) / "timings.json"
    previous = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    write_json(timings_file, {**previous, **seconds})
    summary = write_report(out)  # seeded: it finds OUT/<task>/seed<K>/
    log(f"wrote {Path(out) / 'report.html'}, {Path(out) / 'aggregate.json'} and "
        f"{Path(out) / 'comparisons.json'}")
    return summary
