"""Command line: `cxr run | train | evaluate | explain | report | robustness | predict | export | adapt | demo | download | serve | manifest`. Turns flags into configs and calls one function.

User mistakes (CxrError) end as one line on stderr and exit code 2; nothing below parses flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .augment import AUGMENT_PRESETS
from .config import PRESETS, QUICK, STUDY_TASKS, TaskConfig, make_config
from .errors import CxrError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _image_size(text: str) -> int:
    value = int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"must be at least 32 (ResNet-18 downsamples by 32), got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _output_file(text: str) -> Path:
    if Path(text).suffix.lower() not in (".csv", ".json"):
        raise argparse.ArgumentTypeError(f"{text}: name a .csv or .json file")
    return Path(text)


def _tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in PRESETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown task {unknown or text!r}; choose from {', '.join(PRESETS)}")
    return list(dict.fromkeys(names))


def _external(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=DIR, e.g. official_half=data/official_test_half")
    return name, Path(folder)


def _sizes(text: str) -> list[int | None]:
    try:
        sizes = [None if t.strip() == "all" else int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write numbers of images per class, e.g. 10,25,50,100") from None
    if not sizes or any(s is not None and s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: write positive numbers of images per class, e.g. 10,25,50,100")
    return sizes


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to compute (default: auto, CUDA when available)")
    p.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1,
                   help="threads decoding images (default: the number of CPU cores)")


def _add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, help="decoded-image cache (default: $XDG_CACHE_HOME/cxr/images, "
                   "else ~/.cache/cxr/images); rebuilt whenever a file, its size or mtime, or the resolution changes")
    p.add_argument("--no-cache", action="store_true", help="decode in memory only; write no cache")


def _add_mmap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mmap", action="store_true", help="keep the decoded images on disk (in the cache) and "
                   "memory-map them, for sets larger than memory (README: Scaling out)")


def _cache_dir(args: argparse.Namespace) -> Path | None:
    from .cache import default_cache_dir

    return None if args.no_cache else (args.cache_dir or default_cache_dir())


def _add_training(p: argparse.ArgumentParser) -> None:
    d = TaskConfig()
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="folder holding train/ (and val/, test/); `sample`: "
                        "the small real sample shipped with cxr (unless a folder of that name exists here); or a "
                        "CSV manifest (as --manifest)")
    source.add_argument("--manifest", type=Path, dest="data", metavar="FILE.csv", help="a CSV with columns "
                        "path,label[,patient][,split] instead of the folder layout (paths relative to the file; "
                        "without split, rows are split by patient; `cxr manifest DIR` writes one)")
    p.add_argument("--classes", help="with a manifest: its label names mapped onto NORMAL and PNEUMONIA, "
                   "e.g. normal=NORMAL,opacity=PNEUMONIA")
    p.add_argument("--out", type=Path, required=True, help="output folder; each task writes OUT/<task>/")
    p.add_argument("--epochs", type=_positive_int, help=f"epochs (default: {d.epochs}, the study's)")
    p.add_argument("--quick", action="store_true", help=f"CPU-sized: {QUICK['image_size']} px and {QUICK['epochs']} "
                   "epochs unless --image-size/--epochs say otherwise (its cost in accuracy: README, Results)")
    p.add_argument("--batch-size", type=_positive_int, help=f"batch size (default: {d.batch_size}); under torchrun "
                   "the global batch, shared among the processes (README: Scaling out)")
    p.add_argument("--image-size", type=_image_size, help=f"square input side in pixels (default: {d.image_size})")
    p.add_argument("--lr", type=float, help="Adam learning rate for every task given (default: the "
                   "task's preset: scratch 1e-3, finetune 1e-4)")
    p.add_argument("--seed", type=int, help=f"seed for the split, the init and the batch order (default: {d.seed})")
    p.add_argument("--val-ratio", type=_ratio, help=f"share of train images, by patient, held out for "
                   f"validation (default: {d.val_ratio})")
    p.add_argument("--limit", type=_positive_int, help="at most N images per class in each split (quick trials)")
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
    p.add_argument("--select-by", choices=["val_loss", "val_auc", "last"], help="which epoch to keep as best.pt: "
                   "lowest validation loss, highest validation ROC AUC, or the last one "
                   "(default: val_loss, the study's)")
    p.add_argument("--patience", type=_positive_int, help="stop after this many epochs without a better "
                   "selection metric (default: never)")
    p.add_argument("--target-sensitivity", type=_ratio, help="choose the decision threshold on validation as the "
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
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="training arithmetic: "
                   "bf16 autocast or fp32 (default: auto, bf16 where the hardware has bf16 matrix units: most CUDA "
                   "GPUs, CPUs with AMX or AVX-512 BF16; else fp32); "
                   "evaluation and prediction always run in fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training (a one-off "
                   "compilation of about a minute; measured no faster on a 2-core CPU, meant for GPUs: "
                   "benchmarks/bench.py --compile tells for yours)")
    p.add_argument("--deterministic", action="store_true", help="use deterministic algorithms only (slower on "
                   "GPU), so a resumed run matches an uninterrupted one exactly")
    _add_runtime(p)
    _add_cache(p)
    _add_mmap(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description="Train, evaluate and explain ResNet-18 "
                                     "chest X-ray classifiers (pneumonia vs normal).")
    parser.add_argument("--version", action="version", version=f"cxr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train and evaluate every task, then write the report",
                         description="Train each task, evaluate its best epoch on test/, write "
                         "OUT/<task>/{config.json,history.csv,best.pt,last.pt,metrics.json,predictions.csv}, "
                         "OUT/report.md and OUT/summary.json.")
    run.add_argument("--tasks", type=_tasks, default=list(STUDY_TASKS),
                     help=f"comma-separated tasks among {', '.join(PRESETS)} (default: {','.join(STUDY_TASKS)})")
    run.add_argument("--external", type=_external, action="append", default=[], metavar="NAME=DIR",
                     help="also evaluate every task on an external set (DIR holds NORMAL/ and PNEUMONIA/, or "
                     "test/ with them), writing metrics_NAME.json and predictions_NAME.csv; repeatable. "
                     "Evaluated only: nothing is chosen on it")
    _add_training(run)
    _add_explain(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="the study on cxr's bundled sample: a first report in about a minute on 2 CPU cores",
                          description="Train the study's tasks on the bundled sample (300 real images shipped with "
                          "cxr), evaluate them and write OUT/report.html: what `cxr run --data sample` does. The "
                          "fine-tune needs ImageNet weights (torchvision's cache, or --weights PATH); without them it "
                          "is left out with a note.")
    demo.add_argument("--out", type=Path, default=Path("runs/first"), help="output folder (default: runs/first)")
    demo.add_argument("--weights", type=Path, help="offline ImageNet weights: a torchvision resnet18 state dict file")
    demo.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo in OUT")
    demo.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                      help="training arithmetic (default: auto, as cxr run)")
    _add_runtime(demo)
    _add_cache(demo)
    demo.set_defaults(func=cmd_demo)

    sv = sub.add_parser("serve", help="a web page and a REST API for a trained checkpoint",
                        description="Serve CHECKPOINT: GET / (a page: drop images, see P(pneumonia), the label and "
                        "the CAM, and the model card), POST /predict (multipart 'files'; ?cam=true adds the CAM), "
                        "GET /model, GET /health, GET /docs. Needs the 'serve' extra (pip install 'cxr[serve]').")
    sv.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a best.pt written by cxr")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                    "only; any other needs --token)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every API call")
    sv.add_argument("--max-upload-mb", type=float, default=20, help="largest file accepted, in MB (default: 20)")
    sv.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to compute")
    sv.add_argument("--no-lock", action="store_true", help=argparse.SUPPRESS)  # overlapping passes: for the benchmark
    sv.set_defaults(func=cmd_serve)

    mf = sub.add_parser("manifest", help="write a CSV manifest (path,label,patient,split) of a data folder",
                        description="List DIR/{train,val,test}/{NORMAL,PNEUMONIA} as a CSV manifest with paths relative "
                        "to the CSV's folder, for `cxr run --manifest FILE.csv` (edit it, add rows from elsewhere).")
    mf.add_argument("folder", type=Path, metavar="DIR")
    mf.add_argument("--out", type=Path, required=True, metavar="FILE.csv")
    mf.set_defaults(func=cmd_manifest)

    dl = sub.add_parser("download", help="fetch the full data set (Mendeley Data, about 1.2 GB), check it and "
                        "unpack it into DEST/chest_xray",
                        description="Download ChestXRay2017.zip (Kermany et al. 2018, doi:10.17632/rscbjbr9sj.2, "
                        "CC BY 4.0) with a progress bar, check its size and SHA-256 against the publisher's file list, "
                        "continue a broken download when rerun, and unpack it atomically into DEST/chest_xray (then: "
                        "cxr run --data DEST/chest_xray).")
    dl.add_argument("--dest", type=Path, default=Path("data"), help="where to put chest_xray/ (default: data)")
    dl.add_argument("--archive", type=Path, help="check the layout of and unpack a ChestXRay2017.zip fetched by hand "
                    "instead of downloading")
    dl.add_argument("--keep-archive", action="store_true", help="keep DEST/ChestXRay2017.zip after unpacking")
    dl.add_argument("--timeout", type=float, default=20, help="seconds to wait for the server (default: 20)")
    dl.add_argument("--file-list", default=None, help=argparse.SUPPRESS)  # a mirror's file list (tests: a local server)
    dl.set_defaults(func=cmd_download)

    train = sub.add_parser("train", help="train one task (no test evaluation)",
                           description="Train one task into OUT/<task>/ (config.json, history.csv, best.pt, last.pt).")
    train.add_argument("--task", choices=list(PRESETS), default="scratch", help="task preset (default: scratch)")
    _add_training(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a run's best.pt on the test split or an external set",
                        description="Write RUN_DIR/metrics.json and predictions.csv from RUN_DIR/best.pt; with "
                        "--name NAME --data DIR, metrics_NAME.json and predictions_NAME.csv of the external set DIR.")
    ev.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a task folder, e.g. OUT/scratch")
    ev.add_argument("--data", type=Path, help="data folder (default: the one the run was trained on); with "
                    "--name, the external set's folder (NORMAL/ and PNEUMONIA/, or test/ holding them)")
    ev.add_argument("--name", help="evaluate an external set under this name: writes metrics_NAME.json and "
                    "predictions_NAME.csv beside the run's own (needs --data)")
    _add_runtime(ev)
    _add_cache(ev)
    ev.set_defaults(func=cmd_evaluate)
    ex = sub.add_parser("explain", help="draw a run's figures: curves, confusion, ROC, mistakes and CAMs",
                        description="Write RUN_DIR/figures/{loss,confusion,roc,pr,calibration,misclassified,"
                        "cam_normal,cam_pneumonia}.png from the files of an evaluated run.")
    ex.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="an evaluated task folder, e.g. OUT/scratch")
    ex.add_argument("--only-errors", action="store_true", help="only the misclassified figure (and the curves)")
    _add_explain(ex)
    _add_runtime(ex)
    ex.set_defaults(func=cmd_explain)

    pr = sub.add_parser("predict", help="predict new images with a trained checkpoint",
                        description="P(PNEUMONIA) and the label at the checkpoint's stored threshold for each "
                        "image: files, folders (searched recursively) and globs; JPEG, PNG (8/16 bit) and DICOM. "
                        "Unreadable files get an error row; the exit code is 1 when any file failed.")
    pr.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a best.pt or last.pt written by cxr")
    pr.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    pr.add_argument("--output", type=_output_file, help="also write the results to a .csv or .json file")
    pr.add_argument("--cam", type=Path, metavar="DIR", help="write a CAM overlay PNG per image into DIR")
    pr.add_argument("--cam-method", choices=["cam", "gradcam"], default="cam", help="map for --cam (default: cam)")
    pr.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward pass (default: 32)")
    _add_runtime(pr)
    pr.set_defaults(func=cmd_predict)

    exp = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript",
                         description="Write the model (input: (N, 1, S, S) uint8 grayscale, decoded and resized; "
                         "output: (N,) P(PNEUMONIA), with the task's intensity normalisation and temperature inside "
                         "the graph) and FILE.json beside it with the input size, class names, threshold and temperature.")
    exp.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    exp.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    exp.add_argument("--out", type=Path, required=True, metavar="FILE")
    exp.set_defaults(func=cmd_export)

    ad = sub.add_parser("adapt", help="fit a trained run to a new site's images (threshold, temperature, "
                        "batch-norm statistics) into a new run folder",
                        description="Adapt RUN_DIR/best.pt to a site: with a labelled sample (NORMAL/ and "
                        "PNEUMONIA/), choose the threshold and temperature on it; with --unlabeled (a folder of "
                        "images), re-estimate the batch-norm statistics (AdaBN; --tent adds entropy minimisation of "
                        "the batch-norm affine parameters). Writes OUT/best.pt, config.json, history.csv, "
                        "adaptation.json (and site_predictions.csv); RUN_DIR is never changed. With --evaluate K, "
                        "measure every variant instead by K folds of patients and write OUT/adapt_evaluation.json/.md.")
    ad.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a trained task folder, e.g. OUT/scratch")
    ad.add_argument("--data", type=Path, required=True, metavar="SITE_DIR", help="the site's images: NORMAL/ and "
                    "PNEUMONIA/ (or test/ with them), or with --unlabeled any folder of JPEG/PNG images")
    ad.add_argument("--out", type=Path, required=True, metavar="NEW_RUN_DIR", help="the new run folder")
    ad.add_argument("--unlabeled", action="store_true", help="SITE_DIR has no class folders: adapt the batch-norm "
                    "statistics only and keep the source's threshold and temperature")
    ad.add_argument("--adabn", action="store_true", help="with a labelled sample, also re-estimate the batch-norm "
                    "statistics on it (labels unused for that) before choosing the threshold")
    ad.add_argument("--tent", action="store_true", help="TENT: a few entropy-minimisation steps on the batch-norm "
                    "affine parameters before AdaBN (with --evaluate: also measure the TENT variants)")
    ad.add_argument("--tent-steps", type=_positive_int, default=10, help="TENT steps of 32 images (default: 10)")
    ad.add_argument("--target-sensitivity", type=_ratio, help="threshold: the highest reaching this sensitivity on "
                    "the site (default: maximise Youden's J on the site)")
    ad.add_argument("--evaluate", type=_positive_int, metavar="K", help="measure the adaptation instead: K folds by "
                    "patient, adapt on K-1, predict the held fold; before and after, with 95%% CIs")
    ad.add_argument("--sizes", type=_sizes, default=[None], help="with --evaluate: comma-separated adaptation images "
                    "per class drawn from the other folds, e.g. 10,25,50,100 (default: all)")
    ad.add_argument("--repeats", type=_positive_int, default=1, help="with --evaluate: draws per size (default: 1)")
    ad.add_argument("--seed", type=int, default=0, help="seed of the folds, draws and TENT batches (default: 0)")
    ad.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _add_runtime(ad)
    _add_cache(ad)
    ad.set_defaults(func=cmd_adapt)

    rb = sub.add_parser("robustness", help="evaluate a run under acquisition shifts (brightness, blur, JPEG...)",
                        description="Evaluate RUN_DIR/best.pt on a split under every shift of the benchmark at "
                        "three severities; writes robustness_<split>.json/.csv and figures/robustness_<split>.png. "
                        "Compare recipes on --split val; report on test.")
    rb.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    rb.add_argument("--split", choices=["val", "test"], default="test", help="which split (default: test)")
    rb.add_argument("--data", type=Path, help="data folder (default: the one the run was trained on)")
    rb.add_argument("--seed", type=int, default=0, help="seed of the random shifts (noise) (default: 0)")
    _add_runtime(rb)
    _add_cache(rb)
    rb.set_defaults(func=cmd_robustness)

    rep = sub.add_parser("report", help="rebuild OUT/report.html, report.md and summary.json from the files",
                         description="Rebuild the report from the task folders in OUT; nothing is trained "
                         "or evaluated.")
    rep.add_argument("out", type=Path, metavar="OUT", help="the --out folder of a run")
    rep.set_defaults(func=cmd_report)
    return parser


def _add_explain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cam-method", choices=["cam", "gradcam"], default="cam",
                   help="class activation map: classic CAM (default) or Grad-CAM")
    p.add_argument("--n", type=_positive_int, default=16, dest="n_examples",
                   help="images per CAM figure (default: 16)")


def _configs(tasks: list[str], args: argparse.Namespace) -> list[TaskConfig]:
    quick = QUICK if getattr(args, "quick", False) else {}
    return [make_config(t, epochs=args.epochs or quick.get("epochs"), batch_size=args.batch_size,
                        image_size=args.image_size or quick.get("image_size"),
                        lr=args.lr, seed=args.seed, val_ratio=args.val_ratio, limit=args.limit,
                        class_weights=args.class_weights, target_sensitivity=args.target_sensitivity,
                        threshold_rule=args.threshold_rule,
                        calibrate=args.calibrate, augment=args.augment, intensity=args.intensity,
                        label_smoothing=args.label_smoothing, optimizer=args.optimizer,
                        weight_decay=args.weight_decay, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
                        select_by=args.select_by, patience=args.patience, classes=args.classes)
            for t in tasks]


def _run_options(args: argparse.Namespace):
    import torch

    from .accel import resolve_precision
    from .pipeline import RunOptions, resolve_device

    device = resolve_device(args.device)
    if getattr(args, "deterministic", False):
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    return RunOptions(device=device, workers=args.workers, weights=args.weights,
                      overwrite=args.overwrite, resume=args.resume, skip_bad_images=args.skip_bad_images,
                      cam_method=getattr(args, "cam_method", "cam"), n_examples=getattr(args, "n_examples", 16),
                      cache_dir=_cache_dir(args),
                      precision=resolve_precision(getattr(args, "precision", "auto"), device),
                      compile_model=getattr(args, "compile", False), mmap=getattr(args, "mmap", False))


def _check_mmap(args: argparse.Namespace) -> None:
    if getattr(args, "mmap", False) and args.no_cache:
        raise CxrError("--mmap keeps the decoded images in the cache folder: drop --no-cache (or pass --cache-dir DIR)")


def _distributed_options(args: argparse.Namespace):
    """_run_options, having joined torchrun's process group when torchrun started this process."""
    import dataclasses

    from .distributed import init_from_env

    options = _run_options(args)
    group, device = init_from_env(options.device)
    return dataclasses.replace(options, group=group, device=device)


def cmd_run(args: argparse.Namespace) -> int:
    _check_mmap(args)
    from .evaluate import check_set_name
    from .pipeline import run_study

    externals = {check_set_name(name): folder for name, folder in args.external}
    if len(externals) < len(args.external):
        raise CxrError("--external: the same NAME is given twice; give each set its own name")
    run_study(args.data, args.out, _configs(args.tasks, args), _distributed_options(args), externals=externals)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .folders import SAMPLE_ROOT
    from .errors import WeightsError
    from .model import imagenet_state_dict
    from .pipeline import run_study

    from .pipeline import ARTEFACTS

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
    args.resume = args.skip_bad_images = args.compile = False
    run_study(SAMPLE_ROOT, args.out, [make_config(t) for t in tasks], _run_options(args))
    print(f"open {args.out / 'report.html'} (a sample: its numbers mean little; see cxr download for the full set)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .pipeline import resolve_device

    try:
        from .serve import serve
    except ImportError as e:
        raise CxrError(f"cxr serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'cxr[serve]'") from None
    serve(args.checkpoint, args.host, args.port, args.token, args.max_upload_mb, str(resolve_device(args.device)),
          serialise=not args.no_lock)
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from .manifest import write_manifest

    if args.out.suffix.lower() != ".csv":
        raise CxrError(f"{args.out}: name a .csv file")
    n = write_manifest(args.folder, args.out)
    print(f"wrote {args.out}: {n} images (next: cxr run --manifest {args.out} --out runs/study)")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .download import FILE_LIST, download

    folder = download(args.dest, args.file_list or FILE_LIST, args.archive, args.timeout, args.keep_archive)
    print(f"data set ready: {folder} (next: cxr run --data {folder} --out runs/study)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _check_mmap(args)
    from .pipeline import run_study

    run_study(args.data, args.out, _configs([args.task], args), _distributed_options(args), evaluate=False)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import check_set_name, evaluate_run, result_files
    from .pipeline import read_run_config, resolve_device

    if args.name is not None:
        check_set_name(args.name)
        if args.data is None:
            raise CxrError(f"--name {args.name}: pass --data DIR, the external set's folder")
    data = args.data or Path(read_run_config(args.run_dir)["data"])
    m = evaluate_run(args.run_dir, data, resolve_device(args.device), args.workers, _cache_dir(args), name=args.name)
    print(f"{args.run_dir}{' on ' + args.name if args.name else ''}: accuracy {m['accuracy']:.3f}, ROC AUC "
          f"{m['roc_auc']}, confusion {m['confusion_matrix']}; wrote {' and '.join(result_files(args.name))}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import draw_run_figures, explain_run
    from .pipeline import resolve_device

    written = draw_run_figures(args.run_dir)
    written += explain_run(args.run_dir, args.n_examples, args.only_errors, args.cam_method,
                           resolve_device(args.device), args.workers)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .pipeline import resolve_device
    from .predict import format_table, load_model, summary_line, write_records

    model = load_model(args.checkpoint, resolve_device(args.device))
    if model.operating_point is None:
        print(f"note: {args.checkpoint} holds no operating point chosen on validation (a last.pt?): labels use "
              f"threshold {model.threshold:.3f} and temperature {model.temperature:.3f}; predict with best.pt for "
              "the chosen ones", file=sys.stderr)
    records = model.predict(args.paths, args.batch_size, args.cam, args.cam_method, args.workers)
    print(format_table(records))
    print(summary_line(records) + f" (task {model.task}; {model.describe_operating_point()})")
    if args.output:
        write_records(args.output, records, model)
        print(f"wrote {args.output}")
    return 1 if any(r["error"] for r in records) else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .predict import export_model

    model_file, sidecar = export_model(args.checkpoint, args.format, args.out)
    print(f"wrote {model_file} and {sidecar}")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from .adapt import adapt_run, evaluation_table, evaluate_adaptation
    from .pipeline import resolve_device

    common = dict(use_tent=args.tent, tent_steps=args.tent_steps, target_sensitivity=args.target_sensitivity,
                  device=resolve_device(args.device), workers=args.workers, cache_dir=_cache_dir(args),
                  overwrite=args.overwrite, seed=args.seed)
    if args.evaluate is not None:
        if args.unlabeled:
            raise CxrError("--evaluate measures against labels: pass a labelled site sample (NORMAL/ and PNEUMONIA/) "
                           "without --unlabeled")
        if args.evaluate < 2:
            raise CxrError("--evaluate K: K must be at least 2 (adapt on K-1 folds, measure on the held one)")
        result = evaluate_adaptation(args.run_dir, args.data, args.out, k=args.evaluate, sizes=args.sizes,
                                     repeats=args.repeats, **common)
        print(evaluation_table(result))
        print(f"wrote {args.out / 'adapt_evaluation.json'} and adapt_evaluation.md")
        return 0
    if args.sizes != [None] or args.repeats != 1:
        raise CxrError("--sizes and --repeats go with --evaluate K")
    p = adapt_run(args.run_dir, args.data, args.out, unlabeled=args.unlabeled, adabn_too=args.adabn, **common)
    op = p["operating_point"]
    print(f"{args.out}: {p['adapted']} on {p['site']} ({', '.join(f'{k} {v}' for k, v in p['counts'].items())}); "
          f"threshold {op['threshold']:.3f} ({op['rule']}, {op['chosen_on']}), temperature {op['temperature']:.3f}; "
          f"batch norm: {p['batch_norm']}")
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    from .pipeline import read_run_config, resolve_device
    from .robustness import robustness_run

    data = args.data or Path(read_run_config(args.run_dir)["data"])
    r = robustness_run(args.run_dir, data, args.split, resolve_device(args.device), args.workers,
                       _cache_dir(args), args.seed)
    for key in ("clean", "mean", "worst", "held_out_mean"):
        print(f"{key:<14}" + "  ".join(f"{m} {v:.3f}" for m, v in r[key].items()))
    print(f"wrote {args.run_dir / f'robustness_{args.split}.json'} and figures/robustness_{args.split}.png")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .explain import draw_comparison
    from .report import find_tasks, write_report

    tasks = find_tasks(args.out)
    draw_comparison(args.out, tasks)
    write_report(args.out, tasks)
    print(f"wrote {args.out / 'report.html'}, {args.out / 'report.md'} and {args.out / 'summary.json'}")
    return 0


def _refuse_torchrun(args: argparse.Namespace) -> None:
    from .distributed import launched_by_torchrun

    if launched_by_torchrun() and args.func not in (cmd_run, cmd_train):
        name = args.func.__name__.removeprefix("cmd_")
        raise CxrError(f"cxr {name} runs as one process: start it without torchrun (only cxr train and cxr run "
                       "train on several processes)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # epoch lines show up at once in a log file
    try:
        _refuse_torchrun(args)
        return args.func(args)
    except CxrError as e:
        print(f"cxr: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only or missing folder while writing results
        where = e.filename or "output"
        print(f"cxr: error: {where}: {e.strerror or e}; check that the folder exists, is writable and "
              "has free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cxr: interrupted; every completed epoch is saved: rerun the same command with --resume to "
              "continue", file=sys.stderr)
        return 130
    finally:
        if "torch" in sys.modules:  # never import torch just to find nothing to close
            from .distributed import shutdown

            shutdown()
