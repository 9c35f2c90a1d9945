"""`cxr run`, `cxr train`, `cxr demo`: training (and, for run and demo, evaluating and reporting)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import DEMO_IMAGE_SIZE, PRESETS, QUICK, STUDY_TASKS, make_config
from ..errors import CxrError
from . import options as o


def register(sub) -> None:
    run = sub.add_parser("run", help="train and evaluate every task, then write the report",
                         description="Train each task, evaluate its best epoch on test/, write "
                         "OUT/<task>/{config.json,history.csv,best.pt,last.pt,metrics.json,predictions.csv}, "
                         "OUT/report.md and OUT/summary.json.")
    run.add_argument("--tasks", type=o.tasks, default=list(STUDY_TASKS),
                     help=f"comma-separated tasks among {', '.join(PRESETS)} (default: {','.join(STUDY_TASKS)})")
    run.add_argument("--external", type=o.external, action="append", default=[], metavar="NAME=DIR",
                     help="also evaluate every task on an external set (DIR holds NORMAL/ and PNEUMONIA/, or "
                     "test/ with them), writing metrics_NAME.json and predictions_NAME.csv; repeatable. "
                     "Evaluated only: nothing is chosen on it")
    run.add_argument("--seeds", type=o.seeds, metavar="K,K,...", help="train every task once per seed, each a complete "
                     "run in OUT/<task>/seed<K>/; the report leads with mean ± sd over seeds and paired tests on "
                     "seed-averaged probabilities (OUT/aggregate.json, OUT/comparisons.json). One seed: as --seed")
    o.add_training(run)
    o.add_explain(run)
    run.set_defaults(func=cmd_run, distributed=True)
    o.add_run_defaults(run)

    train = sub.add_parser("train", help="train one task (no test evaluation)",
                           description="Train one task into OUT/<task>/ (config.json, history.csv, best.pt, last.pt).")
    train.add_argument("--task", choices=list(PRESETS), default="scratch", help="task preset (default: scratch)")
    o.add_training(train)
    train.set_defaults(func=cmd_train, distributed=True)
    o.add_run_defaults(train)

    demo = sub.add_parser("demo", help="the study on cxr's bundled sample: a first report in about 35 s on 2 CPU cores",
                          description="Train the study's tasks on the bundled sample (300 real images shipped with "
                          f"cxr, 10 epochs at {DEMO_IMAGE_SIZE} px), evaluate them and write OUT/report.html: what "
                          f"`cxr run --data sample --image-size {DEMO_IMAGE_SIZE}` does. The "
                          "fine-tune needs ImageNet weights (torchvision's cache, or --weights PATH); without them it "
                          "is left out with a note.")
    demo.add_argument("--out", type=Path, default=Path("runs/first"), help="output folder (default: runs/first)")
    demo.add_argument("--weights", type=Path, help="offline ImageNet weights: a torchvision resnet18 state dict file")
    demo.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo in OUT")
    demo.add_argument("--image-size", type=o.image_size, default=None, metavar="PX",
                      help=f"image side in pixels (default: {DEMO_IMAGE_SIZE}, so the demo takes about 35 s on 2 CPU "
                      "cores; 224 is the study's size)")
    demo.add_argument("--quick", action="store_true", help=f"quicker still: {QUICK['image_size']} px and "
                      f"{QUICK['epochs']} epochs instead of {DEMO_IMAGE_SIZE} px and the study's 10 (docs/getting-started.md "
                      "says what each takes)")
    o.add_precision(demo, "training arithmetic (default: auto, as cxr run)")
    o.add_runtime(demo)
    o.add_cache(demo)
    demo.set_defaults(func=cmd_demo)
    o.add_run_defaults(demo)  # no --resume, --log, ... in the demo: run_options reads their defaults


def _distributed_options(args: argparse.Namespace):
    """run_options, having joined torchrun's process group when torchrun started this process."""
    import dataclasses

    from ..training.distributed import agreed_precision, init_from_env

    options = o.run_options(args)
    group, device = init_from_env(options.device)
    options = dataclasses.replace(options, group=group, device=device)
    if o.under_torchrun():  # run_options left "auto" to be chosen once the processes are joined
        precision, why = agreed_precision(args.precision, device, group)
        options = dataclasses.replace(options, precision=precision, precision_reason=why)
    return options


def cmd_run(args: argparse.Namespace) -> int:
    o.check_mmap(args)
    from ..evaluation.evaluate import check_set_name
    from ..pipeline import run_seeds, run_study

    externals = {check_set_name(name): folder for name, folder in args.external}
    if len(externals) < len(args.external):
        raise CxrError("--external: the same NAME is given twice; give each set its own name")
    if args.seeds and args.seed is not None:
        raise CxrError("--seed and --seeds: give one of them (--seeds K,K,... trains each task once per seed)")
    if args.seeds and len(args.seeds) == 1:
        args.seed, args.seeds = args.seeds[0], None  # one seed: the plain layout, as --seed
    root, sites = o.data_sources(args.data, args.site_weight, args.out)  # several sites change the selection
    configs = o.configs(args.tasks, args, several=sites is not None)
    if args.seeds:
        run_seeds(root, args.out, configs, _distributed_options(args), args.seeds, externals=externals, sites=sites)
    else:
        run_study(root, args.out, configs, _distributed_options(args), externals=externals, sites=sites)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    o.check_mmap(args)
    from ..pipeline import run_study

    root, sites = o.data_sources(args.data, args.site_weight, args.out)
    run_study(root, args.out, o.configs([args.task], args, several=sites is not None), _distributed_options(args),
              evaluate=False, sites=sites)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..data.folders import SAMPLE_ROOT
    from ..errors import WeightsError
    from ..pipeline import run_study
    from ..run_folder import ARTEFACTS
    from ..training.model import imagenet_state_dict

    if args.quick and args.image_size is not None:
        raise CxrError("--quick and --image-size: give one of them (--quick means "
                       f"{QUICK['image_size']} px and {QUICK['epochs']} epochs)")
    tasks = list(STUDY_TASKS)
    used = [t for t in tasks if any((args.out / t / name).exists() for name in ARTEFACTS)]
    if used and not args.overwrite:
        raise CxrError(f"{args.out}: holds an earlier run ({', '.join(used)}); pass --overwrite to replace it, or "
                       "another --out")
    if args.weights is None:
        try:
            imagenet_state_dict(None)
        except WeightsError:
            tasks = [t for t in tasks if not PRESETS[t].get("pretrained")]
            print("note: ImageNet weights are not in torchvision's cache and cannot be downloaded (offline?): the "
                  f"fine-tune is left out; pass --weights PATH to include it. Training {', '.join(tasks)}.")
    left_out = tuple((t, "ImageNet weights are not in torchvision's cache and cannot be downloaded here; pass "
                         "--weights PATH to include it") for t in STUDY_TASKS if t not in tasks)
    options = dataclasses.replace(o.run_options(args), skipped=left_out)
    settings = dict(QUICK) if args.quick else dict(image_size=DEMO_IMAGE_SIZE if args.image_size is None else args.image_size)
    run_study(SAMPLE_ROOT, args.out, [make_config(t, **settings) for t in tasks], options)
    for task in tasks:  # resume state (weights and Adam's two moments: 130 MB a task); a tour resumes nothing
        (args.out / task / "last.pt").unlink(missing_ok=True)
    print(f"open {args.out / 'report.html'} (a sample: its numbers mean little; see cxr download for the full set)")
    return 0
