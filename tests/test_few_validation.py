"""A threshold chosen on few validation images is said to be so wherever the report states it."""

import html

from cxr.reporting.card import FEW_VALIDATION_IMAGES, few_validation_warning
from cxr.training.operating_point import OperatingPoint

from .helpers import make_report_task


def test_the_warning_names_the_count_and_the_cut_off():
    said = few_validation_warning(OperatingPoint(rule="youden", threshold=0.4, n_val=20))
    assert "20 validation images" in said and f"fewer than {FEW_VALIDATION_IMAGES}" in said
    assert few_validation_warning(OperatingPoint(rule="youden", n_val=FEW_VALIDATION_IMAGES)) is None
    assert few_validation_warning(OperatingPoint(rule="0.5", n_val=20)) is None  # nothing was chosen
    assert few_validation_warning(OperatingPoint(rule="argmax", n_val=20)) is None
    # a record from before the count was kept
    assert few_validation_warning(OperatingPoint.from_dict({"rule": "youden"})) is None


def test_the_report_warns_beside_the_threshold_of_few_validation_images(tmp_path):
    from cxr.reporting.report import write_report

    out = tmp_path / "out"
    make_report_task(out / "scratch", n_val=20)
    make_report_task(out / "finetune", n_val=400)
    make_report_task(out / "fixed", n_val=20, rule="0.5")
    write_report(out, ["scratch", "finetune", "fixed"])
    md, page = (out / "report.md").read_text(), html.unescape((out / "report.html").read_text())
    rows = {}  # each task's row of the first table, the comparison
    for line in md.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert "only 20 validation images" in rows["scratch"]
    assert "validation images" not in rows["finetune"] and "validation images" not in rows["fixed"]
    for text in (md, page):
        assert f"scratch's threshold was chosen on only 20 validation images (fewer than {FEW_VALIDATION_IMAGES})" in text
        assert "finetune's threshold was chosen" not in text and "fixed's threshold was chosen" not in text
