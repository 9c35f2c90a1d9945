"""`cxr predict`, `cxr export`, `cxr serve`: a trained checkpoint applied to new images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CxrError
from . import options as o


def register(sub) -> None:
    pr = sub.add_parser("predict", help="predict new images with a trained checkpoint",
                        description="P(PNEUMONIA) and the label at the checkpoint's stored threshold for each "
                        "image (a --labels subtype model: P(BACTERIAL); three-way: every class's probability and the "
                        "label of the highest): files, folders (searched recursively) and globs; JPEG, PNG (8/16 bit) and DICOM. "
                        "Unreadable files get an error row; the exit code is 1 when any file failed.")
    pr.add_argument("checkpoint", type=o.checkpoint, metavar="CHECKPOINT", help="a best.pt or last.pt written by cxr (a task folder stands for its best.pt)")
    pr.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    pr.add_argument("--output", type=o.output_file(".csv", ".json"), help="also write the results to a .csv or .json file")
    pr.add_argument("--cam", type=Path, metavar="DIR", help="write a CAM overlay PNG per image into DIR")
    pr.add_argument("--cam-method", choices=["cam", "gradcam"], default="cam", help="map for --cam (default: cam)")
    pr.add_argument("--cam-class", metavar="CLASS", help="with --cam: the map of this class (e.g. VIRAL) instead of the "
                    "predicted one")
    pr.add_argument("--batch-size", type=o.positive_int, default=32, help="images per forward pass (default: 32)")
    pr.add_argument("--site", metavar="NAME", help="decide and flag at the point stored for this site (a model fine-tuned by cxr adapt --finetune "
                    "stores one per site, chosen on that site's validation images; a model trained on several sites "
                    "one per site with the run's threshold and the site's own out-of-distribution flag; default: the "
                    "checkpoint's own)")
    o.add_runtime(pr)
    pr.set_defaults(func=cmd_predict)

    exp = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript",
                         description="Write the model (input: (N, 1, S, S) uint8 grayscale, decoded and resized; "
                         "output: (N,) P(PNEUMONIA), with the task's intensity normalisation and temperature inside "
                         "the graph) and FILE.json beside it with the input size, class names, threshold and temperature.")
    exp.add_argument("checkpoint", type=o.checkpoint, metavar="CHECKPOINT")
    exp.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    exp.add_argument("--out", type=Path, required=True, metavar="FILE")
    exp.add_argument("--site", metavar="NAME", help="export the model as it decides at this site (its temperature in "
                     "the graph; its threshold and out-of-distribution flag threshold in FILE.json), for a model "
                     "fine-tuned by cxr adapt --finetune; default: the checkpoint's own")
    o.add_threads(exp)
    exp.set_defaults(func=cmd_export)

    sv = sub.add_parser("serve", help="a web page and a REST API for a trained checkpoint",
                        description="Serve CHECKPOINT: GET / (a page: drop images, see P(pneumonia), the label and "
                        "the CAM, and the model card), POST /predict (multipart 'files'; ?cam=true adds the CAM), "
                        "GET /model, GET /health, GET /docs, GET /monitor (the prediction log in windows, with "
                        "alarms; /monitor.json). Every prediction is logged into SQLite (time, model, the upload's "
                        "sha256, probability, decision, out-of-distribution score, site; never the pixels). "
                        "Needs the 'serve' extra (pip install 'cxr[serve]'). Manual: docs/guide/monitoring.md.")
    sv.add_argument("checkpoint", type=o.checkpoint, metavar="CHECKPOINT", help="a best.pt written by cxr (or its task folder)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                    "only; any other needs --token)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every API call")
    sv.add_argument("--max-upload-mb", type=float, default=20, help="largest file accepted, in MB (default: 20)")
    sv.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to compute")
    sv.add_argument("--site", metavar="NAME", help="decide and flag at the point stored for this site (a model fine-tuned by cxr adapt --finetune "
                    "stores one per site, chosen on that site's validation images; a model trained on several sites "
                    "one per site with the run's threshold and the site's own out-of-distribution flag; default: the "
                    "checkpoint's own)")
    logging = sv.add_mutually_exclusive_group()
    logging.add_argument("--log-db", type=Path, metavar="PATH", help="the SQLite prediction log (default: "
                         "predictions.db in the checkpoint's run folder; cxr monitor PATH reads it)")
    logging.add_argument("--no-log", action="store_true", help="log no predictions (/monitor then has nothing to show)")
    o.add_threads(sv)
    sv.add_argument("--no-lock", action="store_true", help=argparse.SUPPRESS)  # overlapping passes: for the benchmark
    sv.set_defaults(func=cmd_serve)


def cmd_predict(args: argparse.Namespace) -> int:
    from ..deploy.output import format_table, summary_line, write_records
    from ..deploy.predict import load_model

    model = load_model(args.checkpoint, o.device(args), site=args.site)
    if model.operating_point is None:
        print(f"note: {args.checkpoint} holds no operating point chosen on validation (a last.pt?): labels use "
              f"threshold {model.threshold:.3f} and temperature {model.temperature:.3f}; predict with best.pt for "
              "the chosen ones", file=sys.stderr)
    records = model.predict(args.paths, args.batch_size, args.cam, args.cam_method, args.workers, args.cam_class)
    for warning in model.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    print(format_table(records, model.keys))
    print(summary_line(records, model.classes) + f" (task {model.task}; {model.describe_operating_point()})")
    if args.output:
        write_records(args.output, records, model)
        print(f"wrote {args.output}")
    return 1 if any(r["error"] for r in records) else 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..deploy.export import export_model

    model_file, sidecar = export_model(args.checkpoint, args.format, args.out, site=args.site)
    print(f"wrote {model_file} and {sidecar}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ..deploy.serve import serve
    except ImportError as e:
        raise CxrError(f"cxr serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'cxr[serve]'") from None
    from ..deploy.monitor import default_log_path

    log_db = None if args.no_log else (args.log_db or default_log_path(args.checkpoint))
    serve(args.checkpoint, args.host, args.port, args.token, args.max_upload_mb, str(o.device(args)),
          serialise=not args.no_lock, site=args.site, log_db=log_db)
    return 0
