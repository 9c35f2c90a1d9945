"""`cxr adapt`: fit a trained run to a new site's images, or measure that fitting by k-fold."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..config import TRAIN_CHOICES, FinetuneSpec
from ..errors import CxrError
from . import options as o
from .options import external


def _sizes(text: str) -> list[int | None]:
    try:
        sizes = [None if t.strip() == "all" else int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write numbers of images per class, e.g. 10,25,50,100") from None
    if not sizes or any(s is not None and s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: write positive numbers of images per class, e.g. 10,25,50,100")
    return sizes


def _trainable(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(t not in TRAIN_CHOICES for t in names):
        raise argparse.ArgumentTypeError(f"{text!r}: choose among fc, last, all (comma-separated with --evaluate)")
    return list(dict.fromkeys(names))


def _replay(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def _soup(text: str) -> int:
    n = o.positive_int(text)
    if n < 2:
        raise argparse.ArgumentTypeError(f"{text}: a soup averages at least 2 fine-tunes")
    return n


def _alphas(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: a mixing coefficient lies in [0, 1] (0: the source, 1: the "
                                         "fine-tuned); with --evaluate, several comma-separated, e.g. 0.5,0.7,0.9")
    return list(dict.fromkeys(values))


def _l2sp(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, e.g. 0.01, got {text}")
    return value


def register(sub) -> None:
    d = FinetuneSpec()
    ad = sub.add_parser("adapt", help="fit a trained run to a new site's images (threshold, temperature, "
                        "batch-norm statistics) into a new run folder",
                        description="Adapt RUN_DIR/best.pt to a site: with a labelled sample (NORMAL/ and "
                        "PNEUMONIA/), choose the threshold and temperature on it; with --unlabeled (a folder of "
                        "images), re-estimate the batch-norm statistics (AdaBN; --tent adds entropy minimisation of "
                        "the batch-norm affine parameters). Writes OUT/best.pt, config.json, history.csv, "
                        "adaptation.json (and site_predictions.csv; with --finetune finetune_history.csv); "
                        "RUN_DIR is never changed. With --evaluate K, "
                        "measure every variant instead by K folds of patients and write OUT/adapt_evaluation.json/.md.")
    ad.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a trained task folder, e.g. OUT/scratch")
    ad.add_argument("--data", type=Path, required=True, metavar="SITE_DIR", help="the site's images: NORMAL/ and "
                    "PNEUMONIA/ (or test/ with them), or with --unlabeled any folder of JPEG/PNG images")
    ad.add_argument("--out", type=Path, required=True, metavar="NEW_RUN_DIR", help="the new run folder")
    ad.add_argument("--patients", type=Path, metavar="CSV", help="patient ids of the site's images (columns "
                    "path,patient; path: the file name or its path inside SITE_DIR), for sites whose file names carry "
                    "none: validation, folds and intervals then keep each patient's images together")
    ad.add_argument("--unlabeled", action="store_true", help="SITE_DIR has no class folders: adapt the batch-norm "
                    "statistics only and keep the source's threshold and temperature")
    ad.add_argument("--adabn", action="store_true", help="with a labelled sample, also re-estimate the batch-norm "
                    "statistics on it (labels unused for that) before choosing the threshold")
    ad.add_argument("--tent", action="store_true", help="TENT: a few entropy-minimisation steps on the batch-norm "
                    "affine parameters before AdaBN (with --evaluate: also measure the TENT variants)")
    ad.add_argument("--tent-steps", type=o.positive_int, default=10, help="TENT steps of 32 images (default: 10)")
    ad.add_argument("--target-sensitivity", type=o.ratio, help="threshold: the highest reaching this sensitivity on "
                    "the site (default: maximise Youden's J on the site)")
    ad.add_argument("--evaluate", type=o.positive_int, metavar="K", help="measure the adaptation instead: K folds by "
                    "patient, adapt on K-1, predict the held fold; before and after, with 95%% CIs")
    ad.add_argument("--sizes", type=_sizes, default=[None], help="with --evaluate: comma-separated adaptation images "
                    "per class drawn from the other folds, e.g. 10,25,50,100 (default: all)")
    ad.add_argument("--repeats", type=o.positive_int, default=1, help="with --evaluate: draws per size (default: 1)")
    ad.add_argument("--seed", type=o.seed, default=0, help="seed of the folds, draws and TENT batches (default: 0)")
    ad.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ft = ad.add_argument_group("fine-tuning on the site's labelled images (docs/guide/another-hospital.md)")
    ft.add_argument("--finetune", action="store_true", help="train the model on the site's labelled images; the "
                    "epoch and the threshold are chosen on a validation split of the site's patients (--site-val-ratio); "
                    "the new run is also evaluated on the source run's test split and every --external set")
    ft.add_argument("--train", type=_trainable, default=["all"], help="what trains: fc (the head), last (layer4 and "
                    "the head) or all (default: all); with --evaluate, a comma-separated list measures each")
    ft.add_argument("--replay", type=_replay, default=d.replay, help="share of every batch drawn from the source run's own "
                    "training images, so the first site is kept (default: 0.5; 0: the site's images alone); with "
                    "--evaluate, both 0 and this value are measured")
    ft.add_argument("--wise", action="store_true", help="WiSE-FT: mix the source and the fine-tuned weights, the "
                    "coefficient (0, 0.1, ..., 1) chosen on the worst of both sites' validation, batch norm re-estimated "
                    "on images of both sites (with --evaluate: measured beside the plain fine-tuning)")
    ft.add_argument("--wise-alpha", type=_alphas, metavar="A", help="WiSE-FT at this fixed coefficient instead of one "
                    "chosen on validation (the WiSE-FT paper's default is 0.5): for when no validation set shows what "
                    "the first site loses; implies --wise. With --evaluate, a comma-separated list measures each "
                    "coefficient (e.g. 0.5,0.7,0.9: every one mixes the fold's one plain fine-tune)")
    ft.add_argument("--l2sp", type=_l2sp, default=0.0, metavar="BETA", help="L2-SP: add BETA/2 x the squared distance "
                    "from the source weights to the loss, in place of weight decay (with --evaluate: measured beside "
                    "the plain fine-tuning; e.g. 0.01)")
    ft.add_argument("--soup", type=_soup, metavar="N", help="a model soup: N fine-tunes from the source (seeds apart), "
                    "their weights averaged, batch norm re-estimated on images of both sites; N times the fine-tuning "
                    "time (with --evaluate: measured beside the plain fine-tuning; with --wise, the soup is mixed)")
    ft.add_argument("--lp-epochs", type=o.positive_int, metavar="N", help="LP-FT: the head alone for the first N epochs, "
                    "then what --train says (with --evaluate: measured beside the plain fine-tuning)")
    ft.add_argument("--epochs", type=o.positive_int, default=d.epochs, help=f"fine-tuning epochs over the site's "
                    f"training images (default: {d.epochs})")
    ft.add_argument("--lr", type=o.learning_rate, default=d.lr, help=f"AdamW learning rate, cosine schedule (default: {d.lr:g})")
    ft.add_argument("--site-val-ratio", type=o.ratio, default=d.val_ratio, help="share of each class's site images held out, whole patients at a time, "
                    f"to choose the epoch and threshold (default: {d.val_ratio})")
    ft.add_argument("--external", type=external, action="append", default=[], metavar="NAME=DIR",
                    help="also measure the fine-tuned model on this set of the first site (repeatable), e.g. "
                    "official_half=data/official_test_half: what it kept")
    ft.add_argument("--site-name", metavar="NAME", help="the site's name in the model's operating points (default: "
                    "SITE_DIR's folder name): predict, serve and evaluate take --site NAME to decide as chosen there")
    ft.add_argument("--site-threshold", action="store_true", help="choose the threshold and temperature on the "
                    "site's validation patients (default: keep the source run's operating point, which did better "
                    "at nih_half: docs/results/another-hospital.md)")
    ft.add_argument("--estimate-from", type=Path, metavar="EVAL_DIR", help="the --out folder of an earlier cxr adapt "
                    "--evaluate K of the same run, site and fine-tuning settings: its k-fold estimate goes into the "
                    "model card (predict, serve, report) beside the model fitted on all the site's images")
    o.add_precision(ft, "fine-tuning arithmetic (default: auto, as cxr run)")
    o.add_tracking(ft)
    o.add_runtime(ad)
    o.add_cache(ad)
    ad.set_defaults(func=cmd_adapt)


def _finetunes(args: argparse.Namespace) -> list[FinetuneSpec]:
    """The fine-tuning specs: one to fit (every option combined), or with --evaluate each --train
    with and without replay, and beside each of those with replay every way of keeping the first
    site that was asked for (WiSE-FT, L2-SP, LP-FT, a soup), each alone, so that they are measured apart."""
    wise = args.wise or args.wise_alpha is not None
    alphas = args.wise_alpha or [None]
    if len(alphas) > 1 and args.evaluate is None:
        raise CxrError(f"--wise-alpha {','.join(f'{a:g}' for a in alphas)}: one model is fitted with one coefficient; "
                       "several are measured side by side with --evaluate K")
    keep = dict(wise=wise, wise_alpha=alphas[0], l2sp=args.l2sp, lp_epochs=args.lp_epochs or 0, soup=args.soup or 1)
    if args.lp_epochs is not None and args.lp_epochs >= args.epochs:
        raise CxrError(f"--lp-epochs {args.lp_epochs}: must be below --epochs ({args.epochs}), so that something "
                       "besides the head trains")
    base = dict(epochs=args.epochs, lr=args.lr, val_ratio=args.site_val_ratio)
    if args.evaluate is None:
        return [FinetuneSpec(train=t, replay=args.replay, **base, **keep) for t in args.train]
    replays = [0.0, args.replay] if args.replay else [args.replay]
    specs = [FinetuneSpec(train=t, replay=r, **base) for t in args.train for r in replays]
    for t in args.train:
        for asked, option in ([(wise, dict(wise=True, wise_alpha=a)) for a in alphas]
                              + [(bool(args.l2sp), dict(l2sp=args.l2sp)),
                                 (args.lp_epochs is not None, dict(lp_epochs=args.lp_epochs)),
                                 (args.soup is not None, dict(soup=args.soup))]):
            if asked:
                specs.append(FinetuneSpec(train=t, replay=args.replay, **base, **option))
    return specs


def cmd_adapt(args: argparse.Namespace) -> int:
    from ..adaptation.adapt import adapt_run
    from ..adaptation.kfold import evaluate_adaptation
    from ..adaptation.kfold_table import evaluation_table
    from ..adaptation.settings import AdaptSettings
    from ..evaluation.evaluate import check_set_name
    from ..training.accel import resolve_precision
    from ..training.operating_point import OperatingPoint

    device = o.device(args)
    externals = {check_set_name(name): folder for name, folder in args.external}
    if args.site_threshold and not args.finetune:
        raise CxrError("--site-threshold goes with --finetune (without it, a labelled sample's threshold is always "
                       "chosen at the site)")
    if externals and not args.finetune:
        raise CxrError("--external goes with --finetune: the other methods leave the model's ranking as it was")
    settings = AdaptSettings(tent_steps=args.tent_steps, target_sensitivity=args.target_sensitivity,
                             patients=args.patients, seed=args.seed, device=device, workers=args.workers,
                             cache_dir=o.cache_dir(args), overwrite=args.overwrite, externals=externals,
                             command=tuple(args.argv or sys.argv),
                             # only fine-tuning trains: other methods run in fp32 whatever --precision says
                             precision=resolve_precision(args.precision, device) if args.finetune else "fp32")
    if args.site_name is not None and (not args.finetune or args.evaluate is not None):
        raise CxrError("--site-name names the site in a fine-tuned model's operating points: it goes with --finetune "
                       "(without --evaluate)")
    if args.site_name == "source":
        raise CxrError("--site-name source: 'source' names the source run's operating point; choose another name")
    if (args.wise or args.wise_alpha is not None or args.l2sp or args.lp_epochs or args.soup) and not args.finetune:
        raise CxrError("--wise, --wise-alpha, --l2sp, --lp-epochs and --soup are ways of fine-tuning: add --finetune")
    if args.finetune and args.evaluate is None:  # fitting one model: every option must act on it
        if args.tent or args.adabn:
            raise CxrError(f"--{'tent' if args.tent else 'adabn'} goes without --finetune: a fine-tuned model's batch "
                           "norm is trained on the site's images already (with --evaluate K, --tent adds the TENT "
                           "variants to the comparison)")
        if args.target_sensitivity is not None and not args.site_threshold:
            raise CxrError("--target-sensitivity with --finetune chooses the threshold at the site: add "
                           "--site-threshold (without it the source run's operating point is kept)")
    if args.estimate_from is not None and args.evaluate is not None:
        raise CxrError("--estimate-from goes with fitting a model (without --evaluate): it attaches that estimate")
    if args.evaluate is not None:
        if args.unlabeled:
            raise CxrError("--evaluate measures against labels: pass a labelled site sample (NORMAL/ and PNEUMONIA/) "
                           "without --unlabeled")
        if args.evaluate < 2:
            raise CxrError("--evaluate K: K must be at least 2 (adapt on K-1 folds, measure on the held one)")
        result = evaluate_adaptation(args.run_dir, args.data, args.out, settings=settings, k=args.evaluate,
                                     sizes=args.sizes, repeats=args.repeats, use_tent=args.tent,
                                     finetunes=_finetunes(args) if args.finetune else [])
        print(evaluation_table(result))
        print(f"wrote {args.out / 'adapt_evaluation.json'} and adapt_evaluation.md")
        return 0
    if args.sizes != [None] or args.repeats != 1:
        raise CxrError("--sizes and --repeats go with --evaluate K")
    if args.finetune and len(args.train) > 1:
        raise CxrError("--train: name one of fc, last, all to fine-tune (a list goes with --evaluate K)")
    finetune = _finetunes(args)[0] if args.finetune else None
    if args.trackers and finetune is None:
        raise CxrError("--log goes with --finetune: the other adaptations train nothing to follow")
    if args.trackers:
        from ..reporting.tracking import check_trackers

        check_trackers(args.trackers)
    p = adapt_run(args.run_dir, args.data, args.out, settings=settings, unlabeled=args.unlabeled,
                  adabn_too=args.adabn, use_tent=args.tent, finetune=finetune,
                  site_threshold=args.site_threshold, site_name=args.site_name,
                  estimate_from=args.estimate_from,
                  trackers=tuple(dict.fromkeys(args.trackers)), log_dir=args.log_dir)
    op = OperatingPoint.from_dict(p["operating_point"])
    print(f"{args.out}: {p['adapted']} on {p['site']} ({', '.join(f'{k} {v}' for k, v in p['counts'].items())}); "
          f"threshold {op.threshold:.3f} ({op.rule}, {op.chosen_on}), temperature {op.temperature:.3f}; "
          f"{'method' if args.finetune else 'batch norm'}: {p['batch_norm']}")
    return 0
