"""`cxr check`: is a folder of images like those the model was validated on, and how well would it do?"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import options as o


def register(sub) -> None:
    ch = sub.add_parser("check", help="check a folder of images for a shift away from the model's training data",
                        description="Compare the images of DIR (unlabelled, or NORMAL/ and PNEUMONIA/) with the "
                        "model's validation images: two-sample tests on its outputs, its out-of-distribution scores "
                        "and its features, the share of images flagged as unlike the training images, and the "
                        "model's accuracy estimated without labels (ATC, DoC) with 95% intervals; with labels, the "
                        "true accuracy beside it. Nothing is chosen on DIR. Manual: docs/guide/trust.md.")
    ch.add_argument("checkpoint", type=o.checkpoint, metavar="CHECKPOINT", help="a best.pt written by cxr (or its task folder)")
    ch.add_argument("data", type=Path, metavar="DIR", help="a folder of JPEG, PNG or DICOM images (searched "
                    "recursively), or NORMAL/ and PNEUMONIA/ (or test/ holding them) for labelled images")
    ch.add_argument("--output", type=o.output_file(".json"), help="also write the check to a .json file")
    ch.add_argument("--site", metavar="NAME", help="against this site's own validation images and flag threshold, as stored "
                    "by cxr adapt --finetune or by training on several sites")
    ch.add_argument("--seed", type=int, default=0, help="seed of the permutations and bootstrap (default: 0)")
    o.add_runtime(ch)
    o.add_cache(ch)
    ch.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    from ..evaluation.check import check_folder, format_check
    from ..files import write_json

    result = check_folder(args.checkpoint, args.data, o.device(args), args.workers, o.cache_dir(args), args.site,
                          args.seed)
    print(format_check(result))
    if args.output:
        write_json(args.output, result)
        print(f"wrote {args.output}")
    return 0
