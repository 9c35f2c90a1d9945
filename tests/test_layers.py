"""The package's import graph: data flows one way, so no module imports one that imports it back,
directly or through others, at the top or inside a function."""

import ast
from pathlib import Path

import pytest

import cxr

PACKAGE = Path(cxr.__file__).resolve().parent


def imports_of(path: Path) -> set[str]:
    """The cxr modules `path` imports anywhere in its body (relative or absolute imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("cxr."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cxr."))
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py")} | {
        p.name: p / "__init__.py" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    g = {}
    for name, path in modules.items():
        g[name] = {m for m in imports_of(path) if m in modules and m != name}
        if path.name == "__init__.py":
            for sub in path.parent.glob("*.py"):
                if sub.stem != "__init__":
                    g[name] |= {m for m in imports_of(sub) if m in modules and m != name}
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One path back to itself for every module that reaches itself."""
    found = []
    for start in sorted(g):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(g[node]):
                if nxt == start:
                    found.append(path + [start])
                    stack.clear()
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"], ["b", "c", "a", "b"],
                                                                         ["c", "a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_inside_functions_count(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from .data import x\n    import cxr.cache\n")
    assert imports_of(f) == {"data", "cache"}


def test_no_module_imports_one_that_imports_it_back():
    g = graph()
    assert {"data", "dataset", "folders", "manifest", "cache", "decode"} <= set(g)
    assert cycles(g) == []


def test_data_layers_flow_up():
    g = graph()
    assert g["dataset"] & {"folders", "manifest", "decode", "cache", "data"} == set()
    assert "data" not in g["cache"] and "data" not in g["manifest"] and "cache" not in g["decode"]
    assert "distributed" not in g["data"] | g["decode"] | g["cache"]  # decoding knows nothing of ranks


def test_the_command_line_builds_without_torch():
    """`cxr --help` and a mistyped flag must not pay for importing torch (seconds on a busy machine)."""
    import subprocess
    import sys

    code = ("import sys, cxr.cli; p = cxr.cli.build_parser(); p.parse_args(['run', '--data', 'd', '--out', 'o']); "
            "print(sorted(m for m in ('torch', 'torchvision', 'numpy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


QUICK_EXIT = """
import atexit, pathlib, sys, threading, time
import torch  # loaded, so entry() takes the quick exit when it can
import cxr.cli as cli

marks = pathlib.Path(sys.argv[1])
atexit.register(lambda: (marks / "atexit").write_text("ran"))


def main():
    if sys.argv[2] == "thread":
        def late():
            time.sleep(0.5)
            (marks / "thread").write_text("done")
        threading.Thread(target=late).start()
    sys.stdout.reconfigure(line_buffering=False)
    sys.stdout.write("x" * 200_000)  # left in the buffer: the quick exit must flush it
    return 3


cli.main = main
cli.entry()
"""


@pytest.mark.parametrize("case", ["plain", "thread"])
def test_the_quick_exit_keeps_what_a_normal_exit_does(tmp_path, case):
    """entry() skips the interpreter's teardown of torch (~0.9 s per command), but the exit code,
    buffered output and exit handlers come through, and a running non-daemon thread is waited for."""
    import subprocess
    import sys

    script = tmp_path / "quick_exit.py"
    script.write_text(QUICK_EXIT)
    r = subprocess.run([sys.executable, str(script), str(tmp_path), case], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    assert r.stdout == "x" * 200_000
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").exists() == (case == "thread")
    if case == "thread":
        assert (tmp_path / "thread").read_text() == "done"
