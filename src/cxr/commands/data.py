"""`cxr manifest`, `cxr download`: describing and fetching data sets."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CxrError


def register(sub) -> None:
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


def cmd_manifest(args: argparse.Namespace) -> int:
    from ..data.manifest import write_manifest

    if args.out.suffix.lower() != ".csv":
        raise CxrError(f"{args.out}: name a .csv file")
    n = write_manifest(args.folder, args.out)
    print(f"wrote {args.out}: {n} images (next: cxr run --manifest {args.out} --out runs/study)")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from ..data.download import FILE_LIST, download

    folder = download(args.dest, args.file_list or FILE_LIST, args.archive, args.timeout, args.keep_archive)
    print(f"data set ready: {folder} (next: cxr run --data {folder} --out runs/study)")
    return 0
