"""The report's section "Where this model can be trusted" and the probes it reads: ood_probes.csv
written beside the test split for a checkpoint with statistics (nothing without), the section's
numbers from hand-made prediction files, and the section in report.md and report.html."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr.evaluation.probes import KINDS, MADE, PER_KIND, PROBES_FILE, TRANSFORMED, write_probes
from cxr.files import read_csv, write_csv, write_json
from cxr.reporting.trust_section import (
    DRAWS,
    SIZES,
    TITLE,
    auroc,
    estimate_cells,
    findings,
    fpr_at_95_tpr,
    separation_cells,
    task_trust,
)
from cxr.training.checkpoint import load_checkpoint, model_from_checkpoint
from cxr.trust.fit import store_trust

from .helpers import HISTORY, SIZE, fake_images, make_run_dir, make_site


@pytest.fixture(scope="module")
def trusted(tmp_path_factory):
    """A task folder OUT/scratch whose best.pt carries the statistics (an untrained ResNet-18 fitted
    on noise images), evaluated on a labelled site as its test split, with its probes; and the
    decoded test images."""
    from cxr.data.folders import get_external_samples
    from cxr.data.loading import load_images
    from cxr.evaluation.evaluate import evaluate_model

    root = tmp_path_factory.mktemp("trust_report")
    run = make_run_dir(root / "out" / "scratch", threshold=0.5, history=HISTORY)
    images, labels = fake_images(80, size=SIZE)
    store_trust(run / "best.pt", images[:60], labels[:60], images[60:], labels[60:], "cpu")
    samples = get_external_samples(make_site(root / "site", per_class=10))
    test_images = load_images([s.path for s in samples], SIZE, workers=1)
    ck = load_checkpoint(run / "best.pt")
    model, _ = model_from_checkpoint(ck)
    evaluate_model(model, ck, samples, test_images, run, "cpu")
    write_probes(model, ck, test_images, run, "cpu")
    return run, test_images


def test_probes_are_scored_for_a_checkpoint_with_statistics(trusted):
    run, test_images = trusted
    rows = read_csv(run / PROBES_FILE)
    assert list(rows[0]) == ["probe", "ood_score", "in_distribution", "prob_pneumonia"]
    counts = {k: sum(r["probe"] == k for r in rows) for k in KINDS}
    assert counts == {**{k: min(PER_KIND, len(test_images)) for k in TRANSFORMED}, **{k: PER_KIND for k in MADE}}
    assert all(r["in_distribution"] in ("True", "False") for r in rows)
    assert all(np.isfinite(float(r["ood_score"])) and 0 <= float(r["prob_pneumonia"]) <= 1 for r in rows)


def test_probes_are_the_same_on_a_second_run(trusted, tmp_path):
    """Seeded: the same draw of test images and the same made images."""
    run, test_images = trusted
    ck = load_checkpoint(run / "best.pt")
    write_probes(model_from_checkpoint(ck)[0], ck, test_images, tmp_path, "cpu")
    assert (tmp_path / PROBES_FILE).read_text() == (run / PROBES_FILE).read_text()


def test_no_probes_without_statistics(tmp_path):
    run = make_run_dir(tmp_path / "old", threshold=0.5)  # an older checkpoint: no "trust" block
    ck = load_checkpoint(run / "best.pt")
    images, _ = fake_images(6, size=SIZE)
    assert write_probes(model_from_checkpoint(ck)[0], ck, images, run, "cpu") is None
    assert not (run / PROBES_FILE).exists()


def test_auroc_and_fpr_at_95_tpr():
    inside = np.arange(100.0)
    assert auroc(inside, inside + 1000) == 1.0 and fpr_at_95_tpr(inside, inside + 1000) == 0.0
    assert auroc(inside, inside) == pytest.approx(0.5) and fpr_at_95_tpr(inside, inside) == pytest.approx(0.96)
    assert auroc(inside, inside - 1000) == 0.0 and fpr_at_95_tpr(inside, inside - 1000) == 1.0


# --- the section's numbers from hand-made files -----------------------------------------------------

def write_predictions(path, scores, probs, threshold=2.0):
    write_csv(path, ["path", "true_label", "predicted_label", "prob_pneumonia", "patient", "ood_score",
                     "in_distribution"],
              ([f"img{i}.png", "NORMAL", "NORMAL", f"{p:.6f}", f"p{i}", f"{s:.4f}", str(bool(s <= threshold))]
               for i, (s, p) in enumerate(zip(scores, probs))))


def trust_block(n, flagged, accuracy, atc=None, accuracy_accepted=None):
    est = {"atc": atc, "doc": atc, "trusted": atc is not None, "flagged_share": flagged}
    return {"available": True, "n": n, "flagged_share": flagged, "accuracy": accuracy,
            "accuracy_accepted": accuracy_accepted, "estimate": est, "estimate_all_images": est}


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    """A task folder of files only: 400 test images (scores N(0, 1), probabilities uniform), an
    obviously shifted external set `far` (scores above 5, probabilities near 1), a set `near` whose
    scores are somewhat higher and where the model works, and probes that all score above every
    test image."""
    run = tmp_path_factory.mktemp("handmade") / "task"
    run.mkdir()
    rng = np.random.default_rng(0)
    write_predictions(run / "predictions.csv", rng.normal(0, 1, 400), rng.uniform(0, 1, 400))
    write_predictions(run / "predictions_far.csv", rng.uniform(5, 9, 60), rng.uniform(0.97, 1, 60))
    write_predictions(run / "predictions_near.csv", rng.normal(2.2, 1, 100), rng.uniform(0, 1, 100))
    write_csv(run / PROBES_FILE, ["probe", "ood_score", "in_distribution", "prob_pneumonia"],
              ([k, f"{rng.uniform(10, 20):.4f}", "False", f"{rng.uniform(0, 1):.6f}"] for k in KINDS for _ in range(8)))
    metrics = {"trust": trust_block(400, 0.05, 0.90, atc=0.92, accuracy_accepted=0.91)}
    externals = {"far": {"trust": trust_block(60, 1.0, 0.55)},
                 "near": {"trust": trust_block(100, 0.42, 0.89, atc=0.97, accuracy_accepted=0.90)}}
    return {"dir": str(run), "task": "scratch", "classes": ("NORMAL", "PNEUMONIA"), "metrics": metrics,
            "externals": externals}


def test_every_probe_scoring_above_every_test_image_has_auroc_one(handmade):
    t = task_trust(handmade)
    seps = {s.name: s for s in t.separations}
    assert set(seps) == {"far", "near", *KINDS}
    for k in KINDS:
        assert seps[k].auroc == 1.0 and seps[k].fpr95 == 0.0 and seps[k].flagged == 1.0 and seps[k].n == 8
    assert seps["far"].auroc == 1.0
    # the MSP: the probes' probabilities are as uncertain as the test split's, so it does not separate them
    assert all(0.2 < seps[k].auroc_msp < 0.8 for k in KINDS)
    head, body = separation_cells([handmade])
    assert body[0][1] == "test (in-distribution)" and len(body) == 1 + len(seps)


def test_power_on_a_shifted_set_and_the_false_alarm_rate(handmade):
    t = task_trust(handmade)
    assert set(t.power) == {"far", "near"}
    assert t.power["near"][5] <= t.power["near"][50]
    assert t.power["far"][20] == 1.0 and t.power["far"][50] == 1.0
    # draws of the test split against the rest of it: near the test's level (1%, Bonferroni over two tests)
    assert all(0.0 <= t.false_alarms[n] <= 0.04 for n in SIZES)
    assert np.mean([t.false_alarms[n] for n in SIZES]) <= 0.025
    assert all(v * DRAWS == int(v * DRAWS) for v in t.false_alarms.values())
    said = " ".join(findings([handmade]))
    assert "tells far from the test split in 100% of draws of 50 images; 5 images are enough for 90% of draws" in said
    assert "it fires in at most" in said


def test_estimates_beside_the_truth_or_refused(handmade):
    head, body = estimate_cells([handmade])
    test, far, near = body
    assert test[1] == "test" and test[5] == "92.0% vs 91.0% (+1.0)" and test[4] == "90.0%"
    assert far[1] == "far" and far[5] == "no estimate (100% flagged)"
    assert near[5] == "97.0% vs 90.0% (+7.0)"
    said = " ".join(findings([handmade]))
    assert "within 4 points of the truth on scratch on test" in said and "refused on scratch on far" in said
    assert "further off on scratch on near (+7.0 points)" in said
    # flagged, yet the model works there: the flag is said not to mean wrong answers
    assert "scratch on near: 42% flagged although its accuracy there (89.0%) is near the test split's" in said


def test_a_task_without_scores_has_no_section(tmp_path):
    from cxr.reporting.trust_section import trust_html, trust_markdown

    run = tmp_path / "task"
    run.mkdir()
    write_csv(run / "predictions.csv", ["path", "true_label", "predicted_label", "prob_pneumonia", "patient"],
              [["a.png", "NORMAL", "NORMAL", "0.1", "p1"]])
    row = {"dir": str(run), "task": "scratch", "classes": ("NORMAL", "PNEUMONIA"),
           "metrics": {"trust": {"available": False}}, "externals": {}}
    assert task_trust(row) is None and trust_markdown([row]) == [] and trust_html([row]) == []


# --- in the report ------------------------------------------------------------------------------------

def test_the_section_is_in_report_md_and_html(trusted):
    from cxr.reporting.report import write_report

    run, _ = trusted
    write_report(run.parent, ["scratch"])
    md = (run.parent / "report.md").read_text()
    page = (run.parent / "report.html").read_text()
    assert f"## {TITLE}" in md and f"<h2>{TITLE}</h2>" in page
    section = md.split(f"## {TITLE}")[1].split("\n## ")[0]
    assert "| scratch | test (in-distribution) |" in section
    assert all(f"| scratch | {k} (probe) |" in section for k in KINDS)
    assert "| scratch | test, against the rest of it (false alarms) |" in section
    assert "the flag refuses" in section and "the flag refuses" in page
    assert json.loads((run.parent / "summary.json").read_text())["scratch"]["trust"]["available"]


@pytest.mark.slow
def test_cxr_run_writes_probes_and_the_section(study):
    out, _ = study
    for task in ("scratch", "finetune"):
        rows = read_csv(out / task / PROBES_FILE)
        assert {r["probe"] for r in rows} == set(KINDS)
    md = (out / "report.md").read_text()
    assert f"## {TITLE}" in md and "| scratch | inverted (probe) |" in md


def test_a_three_class_file_gives_every_class_probability():
    from cxr.reporting.trust_section import read_scored

    classes = ("NORMAL", "BACTERIAL", "VIRAL")
    rows = [{"probe": "noise", "ood_score": "3.5", "in_distribution": "False", "prob_normal": "0.2",
             "prob_bacterial": "0.7", "prob_viral": "0.1"}]
    scored = read_scored(rows, classes)
    assert scored.probs.tolist() == [[0.2, 0.7, 0.1]] and scored.unconfident[0] == pytest.approx(0.3)
    assert scored.accepted.tolist() == [False] and scored.scores.tolist() == [3.5]


def test_cxr_evaluate_on_the_test_split_writes_the_probes(trusted, tmp_path):
    """evaluate_run (`cxr evaluate`): beside predictions.csv for the test split, none for an external set."""
    import shutil

    from cxr.evaluation.evaluate import evaluate_run

    from .helpers import make_tiny_data

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trusted[0] / "best.pt", run / "best.pt")
    shutil.copy(trusted[0] / "config.json", run / "config.json")
    data = make_tiny_data(tmp_path / "data", n_test=4)
    evaluate_run(run, data / "test", "cpu", workers=1, log=lambda _: None, name="site")
    assert (run / "predictions_site.csv").is_file() and not (run / PROBES_FILE).exists()
    evaluate_run(run, data, "cpu", workers=1, log=lambda _: None)
    assert {r["probe"] for r in read_csv(run / PROBES_FILE)} == set(KINDS)
