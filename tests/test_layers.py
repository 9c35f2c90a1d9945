"""The package's import graph: data flows one way. Subpackages sit in layers (data at the bottom,
the commands at the top) and a lower one never imports a higher one; inside the package no module
imports one that imports it back, directly or through others, at the top or inside a function."""

import ast
from pathlib import Path

import pytest

import cxr

PACKAGE = Path(cxr.__file__).resolve().parent

# From the bottom up. A module may import its own layer and the layers below it. `config`, `errors`
# and `files` are the ground everything stands on; the package's `__init__` (the public API, which
# reaches `deploy` lazily) and `__main__` stand outside the order.
LAYERS = [
    {"config", "errors", "files"},
    {"data"},
    {"training"},
    {"trust"},  # out-of-distribution scores, shift tests, label-free estimates: pure functions on outputs
    {"evaluation"},
    {"reporting"},
    {"adaptation"},
    {"deploy"},
    # a study: how it runs, its data steps, the weights it starts from, features shared by seeds,
    # the run folder, then the steps it chains
    {"run_options", "study_data", "starting_weights", "feature_memo", "run_folder", "pipeline"},
    {"commands"},
    {"cli"},
]
OUTSIDE = {"__init__", "__main__"}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """`training/engine.py` -> "training.engine"; a package's `__init__.py` -> the package's name."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path = PACKAGE) -> set[str]:
    """The package's modules `path` imports anywhere in its body (relative or absolute imports),
    as dotted names below the package: `from .x import y` gives "x.y" (y may be a module or a name in
    x; `graph` keeps the longest part that is a module), `import cxr.config` "config"."""
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" and len(here) > 0 and here != ["__init__"] else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
            elif node.module == "cxr" or (node.module or "").startswith("cxr."):
                base = node.module.split(".")[1:]
                found.update(".".join(base + [a.name]) for a in node.names)
                continue
            else:
                continue
            module = base + (node.module.split(".") if node.module else [])
            found.update(".".join(module + [a.name]) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name[4:] for a in node.names if a.name.startswith("cxr."))
    return found


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (an imported name that is no module, such as
    `__version__`, is dropped; `from .x import f` where x is a subpackage counts as x)."""
    paths = {module_name(p, root): p for p in root.rglob("*.py") if "sample" not in p.parts}
    g = {}
    for name, path in paths.items():
        g[name] = set()
        for m in imports_of(path, root):
            while m and m not in paths:
                m = m.rpartition(".")[0]
            if m and m != name:
                g[name].add(m)
    return g


def layer_of(module: str) -> int | None:
    head = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    return None


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a higher layer, as "lower -> higher"."""
    bad = []
    for name, targets in sorted(g.items()):
        if name.split(".")[0] in OUTSIDE:
            continue
        for t in sorted(targets):
            if layer_of(t) > layer_of(name):
                bad.append(f"{name} -> {t}")
    return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One path back to itself for every module that reaches itself."""
    found = []
    for start in sorted(g):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(g.get(node, ())):
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
    (tmp_path / "data").mkdir()
    f = tmp_path / "data" / "m.py"
    f.write_text("def f():\n    from .cache import x\n    from ..training import engine\n    import cxr.config\n")
    assert imports_of(f, tmp_path) == {"data.cache.x", "training.engine", "config"}
    (tmp_path / "data" / "cache.py").write_text("")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "engine.py").write_text("")
    assert graph(tmp_path)["data.m"] == {"data.cache", "training.engine"}  # config is not in tmp_path


def test_the_checker_sees_a_lower_folder_import_a_higher_one(tmp_path):
    for folder, body in [("data", "from ..reporting.plots import draw\n"), ("reporting", "from ..data import cache\n")]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "data" / "cache.py").write_text("def f():\n    from ..reporting.plots import draw\n")
    (tmp_path / "reporting" / "plots.py").write_text("from ..data import cache\n")
    g = graph(tmp_path)
    assert g["data.cache"] == {"reporting.plots"} and g["reporting.plots"] == {"data.cache"}
    assert upward_imports(g) == ["data.cache -> reporting.plots"]


def test_every_module_has_a_layer():
    homeless = [m for m in graph() if m.split(".")[0] not in OUTSIDE and layer_of(m) is None]
    assert homeless == []


def test_no_lower_folder_imports_a_higher_one():
    g = graph()
    assert {"data.loading", "training.engine", "evaluation.metrics", "reporting.report", "adaptation.adapt",
            "deploy.predict", "pipeline", "commands.train", "cli"} <= set(g)
    assert upward_imports(g) == []


def test_no_module_imports_one_that_imports_it_back():
    g = graph()
    assert {"data.loading", "data.dataset", "data.folders", "data.manifest", "data.cache", "data.decode"} <= set(g)
    assert cycles(g) == []


def test_data_layers_flow_up():
    g = graph()
    assert g["data.dataset"] & {"data.folders", "data.manifest", "data.decode", "data.cache", "data.loading"} == set()
    assert "data.loading" not in g["data.cache"] | g["data.manifest"] and "data.cache" not in g["data.decode"]
    # decoding knows nothing of ranks
    assert "training.distributed" not in g["data.loading"] | g["data.decode"] | g["data.cache"]


def test_no_room_over_400_lines():
    """A module per idea: none over ~400 lines (the issue's bound), the bundled sample aside."""
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


@pytest.mark.slow
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


@pytest.mark.slow
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
