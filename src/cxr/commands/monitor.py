"""`cxr monitor DB`: the prediction log of `cxr serve`, in windows, with an alarm when one departs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import options as o


def _window(text: str) -> int:
    value = o.positive_int(text)
    if value < 5:  # trust.shift.MIN_IMAGES: fewer, and no test says anything
        raise argparse.ArgumentTypeError(f"must be at least 5 predictions (20 or more to see a shift), got {text}")
    return value


def register(sub) -> None:
    mo = sub.add_parser("monitor", help="windows of a served model's predictions: shift, flagged share, alarms",
                        description="Read the SQLite prediction log cxr serve writes (predictions.db in the "
                        "checkpoint's run folder, or its --log-db) and show, per window of N consecutive predictions "
                        "of the model that answered last: the share decided positive, the share flagged as unlike "
                        "the training images, the shift test against the model's validation images (p-value) and "
                        "the accuracy estimated without labels (ATC, 95% interval). A window departs (ALARM) when "
                        "the shift test fires at p < 0.01 or more than 20% of its images are flagged; exit code 1 then. "
                        "Manual: docs/guide/monitoring.md.")
    mo.add_argument("db", type=Path, metavar="DB", help="the prediction log (a predictions.db)")
    mo.add_argument("--window", type=_window, default=50, metavar="N",  # deploy.monitor.DEFAULT_WINDOW, DEFAULT_LAST
                    help="predictions per window (default: 50; at least 5)")
    mo.add_argument("--last", type=o.positive_int, default=20, metavar="K", help="windows shown, the latest last "
                    "(default: 20)")
    mo.add_argument("--checkpoint", type=o.checkpoint, metavar="CKPT", help="compare with this checkpoint's validation "
                    "images (default: the one the log names, if it is still there and unchanged)")
    mo.add_argument("--json", action="store_true", help="print the windows as JSON instead of a table")
    mo.set_defaults(func=cmd_monitor)


def cmd_monitor(args: argparse.Namespace) -> int:
    """Exit code 1 when a shown window departs (for a cron job or a probe), else 0."""
    from ..deploy.monitor import format_monitor, monitor

    report = monitor(args.db, args.window, args.checkpoint, args.last)
    print(json.dumps(report, indent=2) if args.json else format_monitor(report))
    return 1 if report["alarms"] else 0
