"""`cxr evaluate`, `cxr explain`, `cxr report`, `cxr compare`, `cxr robustness`: reading trained runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CxrError
from . import options as o


def register(sub) -> None:
    ev = sub.add_parser("evaluate", help="evaluate a run's best.pt on the test split or an external set",
                        description="Write RUN_DIR/metrics.json and predictions.csv from RUN_DIR/best.pt; with "
                        "--name NAME --data DIR, metrics_NAME.json and predictions_NAME.csv of the external set DIR.")
    ev.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a task folder, e.g. OUT/scratch")
    ev.add_argument("--data", type=Path, help="data folder (default: the one the run was trained on); with "
                    "--name, the external set's folder (NORMAL/ and PNEUMONIA/, or test/ holding them)")
    ev.add_argument("--name", help="evaluate an external set under this name: writes metrics_NAME.json and "
                    "predictions_NAME.csv beside the run's own (needs --data)")
    ev.add_argument("--site", metavar="NAME", help="at the operating point stored for this site (a model fine-tuned "
                    "by cxr adapt --finetune or trained on several sites stores one per site; metrics.json names it)")
    ev.add_argument("--patients", type=Path, metavar="CSV", help="with --name: patient ids of the set's images "
                    "(columns path,patient; path: the file name or its path inside DIR), for sites whose file names "
                    "carry none; intervals then resample patients, not images")
    o.add_runtime(ev)
    o.add_cache(ev)
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser("explain", help="draw a run's figures: curves, confusion, ROC, mistakes and CAMs",
                        description="Write RUN_DIR/figures/{loss,confusion,roc,pr,calibration,misclassified,"
                        "cam_normal,cam_pneumonia}.png from the files of an evaluated run.")
    ex.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="an evaluated task folder, e.g. OUT/scratch")
    ex.add_argument("--only-errors", action="store_true", help="only the misclassified figure (and the curves)")
    o.add_explain(ex)
    o.add_runtime(ex)
    ex.set_defaults(func=cmd_explain)

    rep = sub.add_parser("report", help="rebuild OUT/report.html, report.md and summary.json from the files",
                         description="Rebuild the report from the task folders in OUT; nothing is trained "
                         "or evaluated.")
    rep.add_argument("out", type=Path, metavar="OUT", help="the --out folder of a run")
    rep.set_defaults(func=cmd_report)

    cp = sub.add_parser("compare", help="paired tests between trained runs on the same images (DeLong, McNemar, "
                        "patient bootstrap, Holm)",
                        description="For every pair of RUN_DIRs: the ROC AUC difference with DeLong's test, and the "
                        "accuracy, sensitivity and specificity differences (each run at its own stored threshold) with "
                        "McNemar's exact test and a patient-level paired bootstrap interval; Holm's correction across "
                        "all. The runs must have predicted the very same images (checked by content).")
    cp.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                    help="evaluated task folders (two or more), or cxr adapt --evaluate folders of one site and seed")
    cp.add_argument("--variant", help="with cxr adapt --evaluate folders: the variant whose held-out predictions are "
                    "compared, e.g. 'finetune' (the error lists those measured)")
    cp.add_argument("--set", default="test", help="the run's test split (default) or an external set NAME")
    cp.add_argument("--out", type=Path, help="also write OUT/comparisons.json and comparisons.md")
    cp.add_argument("--seed", type=o.seed, default=0, help="seed of the bootstrap (default: 0)")
    cp.set_defaults(func=cmd_compare)

    rb = sub.add_parser("robustness", help="evaluate a run under acquisition shifts (brightness, blur, JPEG...)",
                        description="Evaluate RUN_DIR/best.pt on a split under every shift of the benchmark at "
                        "three severities; writes robustness_<split>.json/.csv and figures/robustness_<split>.png. "
                        "Compare recipes on --split val; report on test.")
    rb.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    rb.add_argument("--split", choices=["val", "test"], default="test", help="which split (default: test)")
    rb.add_argument("--data", type=Path, help="data folder (default: the one the run was trained on)")
    rb.add_argument("--seed", type=o.seed, default=0, help="seed of the random shifts (noise) (default: 0)")
    o.add_runtime(rb)
    o.add_cache(rb)
    rb.set_defaults(func=cmd_robustness)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import check_set_name, evaluate_run, result_files
    from ..evaluation.metrics import format_auc
    from ..files import read_run_config
    from ..reporting.card import few_validation_warning
    from ..training.operating_point import OperatingPoint

    if args.name is not None:
        check_set_name(args.name)
        if args.data is None:
            raise CxrError(f"--name {args.name}: pass --data DIR, the external set's folder")
    if args.patients is not None and args.name is None:
        raise CxrError("--patients goes with --name NAME --data DIR (an external set); the test split's patients "
                       "come from its file names or its manifest's patient column")
    data = args.data or Path(read_run_config(args.run_dir)["data"])
    m = evaluate_run(args.run_dir, data, o.device(args), args.workers, o.cache_dir(args), name=args.name, site=args.site,
                     patients=args.patients)
    print(f"{args.run_dir}{' on ' + args.name if args.name else ''}: accuracy {m['accuracy']:.3f}, ROC AUC "
          f"{format_auc(m['roc_auc'])}, confusion {m['confusion_matrix']}; wrote {' and '.join(result_files(args.name))}")
    if warning := few_validation_warning(OperatingPoint.from_dict(m.get("operating_point"))):
        print(f"warning: the {warning}", file=sys.stderr)  # as predict says it, beside the numbers it shapes
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from ..reporting.explain import draw_run_figures, explain_run

    written = draw_run_figures(args.run_dir)
    written += explain_run(args.run_dir, args.n_examples, args.only_errors, args.cam_method,
                           o.device(args), args.workers)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..evaluation.seeds import seeded_runs
    from ..reporting.explain import draw_comparison
    from ..reporting.report import find_tasks, write_report

    if seeded_runs(args.out) and not any((args.out / t / "metrics.json").is_file() for t in seeded_runs(args.out)):
        write_report(args.out)  # a --seeds folder: OUT/<task>/seed<K>/
    else:
        tasks = find_tasks(args.out)
        draw_comparison(args.out, tasks)
        write_report(args.out, tasks)
    print(f"wrote {args.out / 'report.html'}, {args.out / 'report.md'} and {args.out / 'summary.json'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..evaluation.compare import compare_runs, comparison_table
    from ..evaluation.evaluate import check_set_name

    set_name = None if args.set == "test" else check_set_name(args.set)
    result = compare_runs(args.run_dirs, set_name, args.out, args.seed, args.variant)
    print(comparison_table(result))
    if args.out:
        print(f"wrote {args.out / 'comparisons.json'} and comparisons.md")
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    from ..evaluation.robustness import METRICS, robustness_run
    from ..files import read_run_config
    from ..reporting.plots import plot_robustness

    data = args.data or Path(read_run_config(args.run_dir)["data"])
    r = robustness_run(args.run_dir, data, args.split, o.device(args), args.workers, o.cache_dir(args), args.seed)
    plot_robustness(r["clean"], r["rows"], METRICS, f"{args.run_dir.name} on {args.split}",
                    args.run_dir / "figures" / f"robustness_{args.split}.png")
    for key in ("clean", "mean", "worst", "held_out_mean"):
        print(f"{key:<14}" + "  ".join(f"{m} {v:.3f}" for m, v in r[key].items()))
    print(f"wrote {args.run_dir / f'robustness_{args.split}.json'} and figures/robustness_{args.split}.png")
    return 0
