"""The report's first lines: which cxr wrote it, the command that made the runs, what it is for."""

from cxr import __version__

from .helpers import make_report_task

INTENDED = "For research and education only: not a medical device, not for diagnosis or treatment decisions."


def _pages(out):
    return (out / "report.md").read_text(), (out / "report.html").read_text()


def test_the_report_names_its_version_command_and_intended_use(tmp_path):
    from cxr.reporting.report import write_report

    out = tmp_path / "out"
    argv = ["/home/u/.venv/bin/cxr", "run", "--data", "my data", "--out", str(out)]
    for task in ("scratch", "finetune"):
        make_report_task(out / task, command=argv, cxr_version=__version__)
    write_report(out, ["scratch", "finetune"])
    md, page = _pages(out)
    command = f"cxr run --data 'my data' --out {out}"  # quoted as a shell would need it, once for both tasks
    head = md.split("\n## ")[0]
    assert f"cxr {__version__}" in head and command in head and INTENDED in head
    assert head.count(command) == 1
    html_head = page.split("<h2>")[0]
    assert f"cxr {__version__}" in html_head and INTENDED in html_head
    assert f"<code>cxr run --data &#x27;my data&#x27; --out {out}</code>" in html_head


def test_a_run_of_another_version_or_without_a_command_says_so(tmp_path):
    from cxr.reporting.report import write_report

    out = tmp_path / "out"
    make_report_task(out / "scratch", command=None, cxr_version="0.0.9")
    write_report(out, ["scratch"])
    md, _ = _pages(out)
    head = md.split("\n## ")[0]
    assert f"report by cxr {__version__}" in head and "runs by cxr 0.0.9" in head
    assert "Command not recorded" in head and INTENDED in head
