"""The scripts beside the package (benchmarks/ for speed, studies/ for the Results numbers, tools/ for
building): each answers `--help` with exit code 0, and each folder's README indexes every script in it.
The Python scripts run in one child process (runpy, one import of torch for all of them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("benchmarks", "studies", "tools")
SCRIPTS = sorted(p for folder in FOLDERS for p in (ROOT / folder).iterdir() if p.suffix in (".py", ".sh"))

# Runs every script's main with --help in this one process; prints {script: exit code}.
HELP_ALL = """
import contextlib, io, json, runpy, sys
codes = {}
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            runpy.run_path(path, run_name="__main__")
            code = "returned without printing help"
        except SystemExit as e:
            code = e.code or 0
    codes[path] = code if out.getvalue().strip() else f"printed nothing (exit {code})"
print(json.dumps(codes))
"""


def test_the_folders_hold_scripts():
    assert {p.parent.name for p in SCRIPTS} == set(FOLDERS)


@pytest.mark.slow
def test_every_python_script_answers_help():
    scripts = [str(p) for p in SCRIPTS if p.suffix == ".py"]
    r = subprocess.run([sys.executable, "-c", HELP_ALL, *scripts], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = json.loads(r.stdout.strip().splitlines()[-1])
    assert {Path(k).relative_to(ROOT).as_posix(): v for k, v in codes.items() if v != 0} == {}


@pytest.mark.slow
@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.suffix == ".sh"], ids=lambda p: p.name)
def test_every_shell_script_answers_help(script):
    r = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    assert f"bash {script.relative_to(ROOT).as_posix()}" in r.stdout  # the usage line names the script


@pytest.mark.parametrize("folder", FOLDERS)
def test_each_folder_readme_indexes_its_scripts(folder):
    readme = (ROOT / folder / "README.md").read_text()
    missing = [p.name for p in SCRIPTS if p.parent.name == folder and f"`{p.name}`" not in readme]
    assert missing == [], f"{folder}/README.md does not list {missing}"
