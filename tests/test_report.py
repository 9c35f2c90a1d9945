"""The report as a person sees it: rebuilt from files, opened in headless Chromium."""

import json
import shutil

import pytest

from cxr.reporting.comparisons import conclusions

from .helpers import cxr


def fake_row(task, normal, pneumonia, val_losses):
    n_c, n_t = normal
    p_c, p_t = pneumonia
    return {"task": task,
            "metrics": {"accuracy": (n_c + p_c) / (n_t + p_t), "n": n_t + p_t,
                        "per_class": {"NORMAL": {"accuracy": n_c / n_t, "correct": n_c, "total": n_t},
                                      "PNEUMONIA": {"accuracy": p_c / p_t, "correct": p_c, "total": p_t}}},
            "history": [{"epoch": str(i + 1), "val_loss": str(v)} for i, v in enumerate(val_losses)]}


def test_conclusions_follow_the_numbers():
    rows = [fake_row("scratch", (119, 234), (383, 390), [0.5, 0.3, 0.4]),
            fake_row("finetune", (200, 234), (350, 390), [0.2, 0.25])]
    text = conclusions(rows)
    assert text[0] == "Highest test accuracy: finetune (88.1%)."
    assert "scratch recognises 98.2% of pneumonia images (383/390) and 50.9% of normal images (119/234)." in text
    assert any(s.startswith("scratch over-calls pneumonia: its NORMAL accuracy is 47.4 points") for s in text)
    assert not any(s.startswith("finetune over-calls") for s in text)
    assert text[-1] == "Lowest validation loss, best first: finetune 0.2000 at epoch 1, scratch 0.3000 at epoch 2."


def test_report_and_explain_rebuild_from_files(study, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(study[0], out)
    for p in [out / "report.html", out / "report.md", out / "summary.json", *out.glob("*/figures/*.png")]:
        p.unlink()
    result = cxr("explain", out / "scratch", "--only-errors", "--cam-method", "gradcam", "--n", 4)
    assert result.returncode == 0, result.stderr[-2000:]
    made = {p.name for p in (out / "scratch" / "figures").iterdir()}
    assert made == {"loss.png", "confusion.png", "roc.png", "pr.png", "calibration.png", "misclassified.png"}
    result = cxr("report", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text()) == json.loads((study[0] / "summary.json").read_text())
    assert "misclassified.png" in (out / "report.md").read_text()


@pytest.mark.slow
def test_report_of_an_empty_folder_is_a_clear_error(tmp_path):
    result = cxr("report", tmp_path)
    assert result.returncode == 2 and "no task folder with metrics.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_report_opens_in_a_browser_with_every_image(browser, study, tmp_path):  # a skip comes first
    from selenium.webdriver.support.ui import WebDriverWait

    out, _ = study
    browser.get_log("browser")  # drained: the session's browser may hold an earlier page's messages
    browser.get((out / "report.html").as_uri())
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
    # compare_loss + 8 figures for each of the two tasks
    assert len(images) == 17, images
    broken = [alt for alt, complete, width in images if not complete or width == 0]
    assert not broken, broken
    sources = browser.execute_script("return Array.from(document.images).map(i => i.src.slice(0, 22));")
    assert all(src == "data:image/png;base64," for src in sources), sources  # embedded, not linked
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    assert "Highest test accuracy" in browser.find_element("tag name", "body").text
    browser.execute_script("document.images[3].click()")  # a click enlarges a figure to the window
    assert browser.execute_script("return document.images[3].classList.contains('big')")
    browser.execute_script("document.images[3].click()")
    assert not browser.execute_script("return document.images[3].classList.contains('big')")
    # a wide table scrolls inside its box instead of widening the page
    assert browser.execute_script("return getComputedStyle(document.querySelector('table')).overflowX") == "auto"
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    shutil.copy(shot, out.parent / "report_screenshot.png")  # for a person to look at after a run


def test_better_only_where_the_paired_test_says_so():
    rows = [fake_row("scratch", (119, 234), (383, 390), [0.5]), fake_row("finetune", (200, 234), (350, 390), [0.2])]

    def comparisons(p_holm):
        tests = {"accuracy": {"difference": -0.0465, "ci": [-0.08, -0.01], "p": p_holm / 2, "p_holm": p_holm}}
        return {"test": {"images": {"NORMAL": 234, "PNEUMONIA": 390},
                         "pairs": [{"a": "out/scratch", "b": "out/finetune", "tests": tests}]}}

    real = conclusions(rows, comparisons(0.004))[0]
    assert real == ("Highest test accuracy: finetune (88.1%); against scratch: +4.7 points (95% CI +1.0 to +8.0, "
                    "McNemar p = 0.002, Holm-adjusted 0.004): a difference.")
    noise = conclusions(rows, comparisons(0.2))[0]
    assert noise.endswith("Holm-adjusted 0.2): no difference measurable on 624 images.")


def test_a_study_of_two_tasks_reports_paired_tests(study):
    out, _ = study
    comparisons = json.loads((out / "comparisons.json").read_text())
    (pair,) = comparisons["test"]["pairs"]
    assert {pair["a"].rsplit("/", 1)[-1], pair["b"].rsplit("/", 1)[-1]} == {"scratch", "finetune"}
    assert set(pair["tests"]) == {"roc_auc", "accuracy", "sensitivity", "specificity"}
    report = (out / "report.md").read_text()
    assert "## Is the difference real? Paired tests on test" in report and "Holm across all 4 p-values" in report
    assert "against " in report.split("Highest test accuracy")[1].split("\n")[0]


def test_settings_read_as_words_and_a_loss_spike_does_not_flatten_the_axis():
    from cxr.reporting.plots import robust_top
    from cxr.reporting.sections import setting

    assert [setting(v) for v in (None, True, False, 0.0003, 1e-3, [1, 2], "crop")] == [
        "none", "yes", "no", "0.0003", "0.001", "1, 2", "crop"]
    top = robust_top([12.0, 0.7, 0.55, 0.5, 0.48, 0.47])
    assert top is not None and 0.7 < top < 12.0  # the spike is written at the top edge instead
    assert robust_top([0.9, 0.7, 0.6, 0.55]) is None  # nothing to cut


def test_ece_has_an_interval_over_patients():
    import numpy as np

    from cxr.evaluation.metrics import ece_interval, expected_calibration_error

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.35 * y + 0.3 + rng.normal(0, 0.15, 200), 0, 1)
    ece, _ = expected_calibration_error(y, p)
    lo, hi = ece_interval(y, p, groups=np.arange(200) // 2)
    assert lo < ece < hi and hi - lo > 0.01
