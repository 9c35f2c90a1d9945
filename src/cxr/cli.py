"""Command line: `cxr <command>`; each command's options and handler live in `commands/`.

Turns flags into configs and calls one function. User mistakes (CxrError) end as one line on
stderr and exit code 2; nothing below the commands parses flags. Building the parser imports
no torch: `cxr --help` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .commands import GROUPS
from .commands.options import apply_threads
from .errors import CxrError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description="Train, evaluate and explain ResNet-18 "
                                     "chest X-ray classifiers (pneumonia vs normal).")
    parser.add_argument("--version", action="version", version=f"cxr {__version__}")
    parser.set_defaults(argv=None)  # main() fills it: the command as config.json records it
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def _refuse_torchrun(args: argparse.Namespace) -> None:
    if "WORLD_SIZE" not in os.environ:  # not under torchrun; spares the torch import of distributed.py
        return
    from .training.distributed import launched_by_torchrun

    if launched_by_torchrun() and not getattr(args, "distributed", False):
        raise CxrError(f"cxr {args.command} runs as one process: start it without torchrun (only cxr train and "
                       "cxr run train on several processes)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # what was asked, also when main() is called in-process (tests, notebooks), where sys.argv is the host's
    args.argv = ["cxr", *(sys.argv[1:] if argv is None else argv)]
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # epoch lines show up at once in a log file
    try:
        _refuse_torchrun(args)
        apply_threads(args)
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
            from .training.distributed import shutdown

            shutdown()


def _other_threads_running() -> bool:
    import threading

    return any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread())


def entry() -> None:
    """The `cxr` command and `python -m cxr`: main(), then a quick exit.

    With torch and torchvision loaded, the interpreter's own teardown of their modules at exit takes
    about 0.9 s on 2 cores (measured: `python -c "import torch, torchvision"` 3.1 s wall, 2.2 s when
    it ends in os._exit), on every command that computes. Once main() has returned nothing is left for
    that teardown to do, so the exit handlers run (logging, multiprocessing, temporary folders), the
    output is flushed and the process ends. Where another non-daemon thread still runs, or torch was
    never imported, the normal exit (which waits for threads) is taken instead."""
    code = main()
    if "torch" not in sys.modules or _other_threads_running():
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`cxr predict ... | head`): nothing more to say
            pass
    os._exit(code)
