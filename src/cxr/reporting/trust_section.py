"""The report's section "Where this model can be trusted", read from the run folders' files.

Three questions, each answered on the sets this run evaluated:

- Does the out-of-distribution score tell a set from the test split, image by image? For each
  external set (predictions_NAME.csv) and each kind of probe (ood_probes.csv: transformed test
  images and made images), the share flagged, and AUROC and FPR at 95% TPR of the score beside
  those of the softmax confidence (MSP), the test split's images as the in-distribution ones.
- How many images does the shift check need? For each external set, the share of random draws of
  n images in which `cxr check`'s tests on the probabilities and the scores (trust.shift.compare,
  without features, which the files do not keep) fire at p < 0.01 against the test split; and the
  same for draws from the test split against the rest of it (the false-alarm rate).
- How far off is the label-free accuracy estimate? Its value beside the true accuracy on every
  evaluated set, from the metrics files' "trust" blocks.

Reads files only (the report never evaluates); numpy and the shift check's tests, no model.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.labels import probability_key
from ..evaluation.evaluate import result_files
from ..evaluation.probes import DESCRIPTIONS, KINDS, PER_KIND, PROBES_FILE
from ..files import read_csv
from ..trust.shift import ALPHA, shifted_draws
from .html_page import _html_table
from .sections import _pct, markdown_table

SIZES = (5, 10, 20, 50)  # images per draw of the power table
DRAWS = 200              # random draws per size
SEED = 0
SEPARATED = 0.95         # an AUROC at or above it: the score tells the set apart
CLOSE = 0.04             # an estimate within 4 points of the truth is close
MANY_FLAGGED = 0.20      # a set with more flagged, where the model is within 5 points of its test accuracy,
#                          is said to be flagged though the model works there (a shift that does no harm)
TITLE = "Where this model can be trusted"


@dataclass(frozen=True)
class Scored:
    """A set's images as the files give them."""

    scores: np.ndarray     # (N,) out-of-distribution scores; higher is less like the training images
    accepted: np.ndarray   # (N,) bool: at or below the checkpoint's threshold
    probs: np.ndarray      # (N, K) class probabilities at the stored temperature

    @property
    def unconfident(self) -> np.ndarray:
        """1 - the softmax confidence (MSP): the baseline score, higher is less sure."""
        return 1.0 - self.probs.max(1)


def read_scored(rows: list[dict], classes) -> Scored | None:
    """A predictions or probes file's rows as scores, flags and probabilities; None without scores."""
    if not rows or not rows[0].get("ood_score"):
        return None
    if len(classes) == 2:
        p = np.array([float(r[probability_key(classes[1])]) for r in rows])
        probs = np.stack([1.0 - p, p], 1)
    else:
        probs = np.array([[float(r[probability_key(c)]) for c in classes] for r in rows])
    return Scored(np.array([float(r["ood_score"]) for r in rows]),
                  np.array([r["in_distribution"] == "True" for r in rows]), probs)


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an outside image scores above an inside one), ties counting half (the Mann-Whitney AUROC)."""
    ranked = np.sort(inside)
    below = np.searchsorted(ranked, outside, "left")
    at_or_below = np.searchsorted(ranked, outside, "right")
    return float((below + 0.5 * (at_or_below - below)).sum() / (len(inside) * len(outside)))


def fpr_at_95_tpr(inside: np.ndarray, outside: np.ndarray) -> float:
    """The share of outside images still accepted by the threshold that accepts 95% of the inside
    ones (the in-distribution images are the positives)."""
    return float((outside <= np.quantile(inside, 0.95, method="higher")).mean())


@dataclass(frozen=True)
class Separation:
    """How a set's images stand against the test split's: the flag, the score, the MSP."""

    name: str
    kind: str          # "external set" or "probe"
    n: int
    flagged: float
    auroc: float
    fpr95: float
    auroc_msp: float
    fpr95_msp: float


def separation(name: str, kind: str, test: Scored, other: Scored) -> Separation:
    return Separation(name, kind, len(other.scores), float(1.0 - other.accepted.mean()),
                      auroc(test.scores, other.scores), fpr_at_95_tpr(test.scores, other.scores),
                      auroc(test.unconfident, other.unconfident), fpr_at_95_tpr(test.unconfident, other.unconfident))


def fire_rate(draw: Scored, reference: Scored | None, n: int, rng: np.random.Generator) -> float | None:
    """The share of DRAWS random draws of n images of `draw` (without replacement) in which the
    shift check fires at p < ALPHA against `reference`; with `reference` None, draws of `draw`
    against the rest of it (the false-alarm rate). None when the set is too small for n."""
    size = len(draw.scores)
    if n > (size if reference is not None else size // 2):
        return None
    orders = np.stack([rng.permutation(size) for _ in range(DRAWS)])  # every draw's order, then all tested at once
    pick, rest = orders[:, :n], orders[:, n:]
    if reference is None:
        ref_probs, ref_scores = draw.probs[rest], draw.scores[rest]
    else:
        ref_probs, ref_scores = reference.probs[None], reference.scores[None]
    fired = shifted_draws(draw.probs[pick], ref_probs, draw.scores[pick], ref_scores, alpha=ALPHA)
    return int(fired.sum()) / DRAWS


@dataclass(frozen=True)
class TaskTrust:
    """What the section shows for one task, computed once from its files."""

    task: str
    test: Scored
    separations: tuple[Separation, ...]
    power: dict[str, dict[int, float | None]]   # external set -> n -> share of draws that fired
    false_alarms: dict[int, float | None]      # n -> the same for the test split against itself


def task_trust(row: dict) -> TaskTrust | None:
    """The section's numbers for a report row (None when its test predictions hold no scores),
    computed on first use and kept in the row, which both pages read."""
    if "trust_section" not in row:
        row["trust_section"] = _compute(row)
    return row["trust_section"]


def _compute(row: dict) -> TaskTrust | None:
    run_dir, classes = Path(row["dir"]), row.get("classes")
    test = read_scored(read_csv(run_dir / "predictions.csv"), classes)
    if test is None:
        return None
    externals = {}
    for name in row.get("externals", {}):
        path = run_dir / result_files(name)[1]
        scored = read_scored(read_csv(path), classes) if path.is_file() else None
        if scored is not None:
            externals[name] = scored
    probes = read_csv(run_dir / PROBES_FILE) if (run_dir / PROBES_FILE).is_file() else []
    by_kind = {k: read_scored([r for r in probes if r["probe"] == k], classes) for k in KINDS}
    seps = [separation(name, "external set", test, s) for name, s in externals.items()]
    seps += [separation(k, "probe", test, s) for k, s in by_kind.items() if s is not None]
    rng = np.random.default_rng(SEED)
    power = {name: {n: fire_rate(s, test, n, rng) for n in SIZES} for name, s in externals.items()}
    false_alarms = {n: fire_rate(test, None, n, rng) for n in SIZES}
    return TaskTrust(row["task"], test, tuple(seps), power, false_alarms)


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def separation_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["task", "set", "images", "flagged", "AUROC (score)", "FPR at 95% TPR (score)", "AUROC (MSP)",
            "FPR at 95% TPR (MSP)"]
    body = []
    for r in rows:
        t = task_trust(r)
        if t is None:
            continue
        body.append([t.task, "test (in-distribution)", str(len(t.test.scores)), _share(1 - t.test.accepted.mean()),
                     "", "", "", ""])
        body += [[t.task, f"{s.name} ({s.kind})", str(s.n), _share(s.flagged), f"{s.auroc:.3f}", _share(s.fpr95),
                  f"{s.auroc_msp:.3f}", _share(s.fpr95_msp)] for s in t.separations]
    return head, body


def power_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["task", "draws from", *(f"n = {n}" for n in SIZES)]
    body = []
    for r in rows:
        t = task_trust(r)
        if t is None:
            continue
        body += [[t.task, f"{name} (power)", *(_share(p[n]) for n in SIZES)] for name, p in t.power.items()]
        body.append([t.task, "test, against the rest of it (false alarms)",
                     *(_share(t.false_alarms[n]) for n in SIZES)])
    return head, body


def _estimate_cell(est: dict, truth: float | None) -> str:
    if not est.get("trusted") or est.get("atc") is None:
        return f"no estimate ({100 * est.get('flagged_share', 0):.0f}% flagged)"
    if truth is None:
        return f"{100 * est['atc']:.1f}%"
    return f"{100 * est['atc']:.1f}% vs {100 * truth:.1f}% ({100 * (est['atc'] - truth):+.1f})"


def estimate_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Every evaluated set: the ATC estimate (on the accepted images, and on all) against the truth."""
    head = ["task", "set", "images", "flagged", "true accuracy", "ATC on accepted images vs truth there (error)",
            "DoC on accepted images (error)", "ATC on all images vs truth (error)"]
    body = []
    for r in rows:
        for name, m in [("test", r["metrics"]), *r.get("externals", {}).items()]:
            tb = m.get("trust", {})
            if not tb.get("available"):
                continue
            est, everything = tb["estimate"], tb["estimate_all_images"]
            doc = "" if est.get("doc") is None or tb.get("accuracy_accepted") is None else \
                f"{100 * est['doc']:.1f}% ({100 * (est['doc'] - tb['accuracy_accepted']):+.1f})"
            body.append([r["task"], name, str(tb["n"]), _share(tb["flagged_share"]), _pct(tb["accuracy"]),
                         _estimate_cell(est, tb.get("accuracy_accepted")), doc,
                         _estimate_cell(everything, tb.get("accuracy"))])
    return head, body


def _names(seps: list[Separation]) -> str:
    return ", ".join(f"{s.name} ({s.auroc:.2f})" for s in seps)


def _detector_finding(t: TaskTrust, row: dict) -> list[str]:
    good = [s for s in t.separations if s.auroc >= SEPARATED]
    poor = [s for s in t.separations if s.auroc < SEPARATED]
    text = (f"{t.task}: the flag refuses {_share(1 - t.test.accepted.mean())} of the test images (its threshold "
            "accepts 95% of validation, so about 5% is expected)")
    if good:
        low, high = _share(min(s.flagged for s in good)), _share(max(s.flagged for s in good))
        text += (f"; the score tells {_names(good)} from the test images (AUROC >= {SEPARATED}), flagging "
                 + (f"{low} of them" if low == high else f"{low} to {high} of them, as the sets go"))
    if poor:
        text += (f"; it does not tell {_names(poor)} apart: many of those images are answered without a warning, "
                 "so the flag alone does not protect against them")
    if t.separations:
        better = sum(s.auroc > s.auroc_msp for s in t.separations)
        text += f"; the score ranks better than the softmax confidence on {better} of {len(t.separations)} sets"
    said = [text + "."]
    test_acc = row["metrics"].get("trust", {}).get("accuracy")
    for name, m in row.get("externals", {}).items():
        tb = m.get("trust", {})
        harmless = test_acc is not None and tb.get("accuracy") is not None and tb["accuracy"] >= test_acc - 0.05
        if tb.get("available") and tb["flagged_share"] > MANY_FLAGGED and harmless:
            said.append(f"{t.task} on {name}: {_share(tb['flagged_share'])} flagged although its accuracy there "
                        f"({100 * tb['accuracy']:.1f}%) is near the test split's ({100 * test_acc:.1f}%): the flag "
                        "says these images differ from the training images, not that the answers are wrong.")
    return said


def _power_finding(t: TaskTrust) -> list[str]:
    said = []
    for name, p in t.power.items():
        enough = next((n for n in SIZES if p[n] is not None and p[n] >= 0.9), None)
        largest = max((n for n in SIZES if p[n] is not None), default=None)
        if largest is None:
            continue
        said.append(f"{t.task}: the shift check tells {name} from the test split in {_share(p[largest])} of draws of "
                    f"{largest} images; " + (f"{enough} images are enough for 90% of draws." if enough else
                                              f"fewer than 90% of draws even at {largest}: a folder like it of that "
                                              "size can pass unnoticed."))
    alarms = [v for v in t.false_alarms.values() if v is not None]
    if alarms:
        said.append(f"{t.task}: on draws from the test split itself it fires in at most {_share(max(alarms))} of "
                    f"draws (its level is {ALPHA:.0%})" + (", more than its level: treat a single alarm with care."
                                                           if max(alarms) > 3 * ALPHA else "."))
    return said


def _estimate_finding(rows: list[dict]) -> list[str]:
    close, far, refused = [], [], []
    for r in rows:
        for name, m in [("test", r["metrics"]), *r.get("externals", {}).items()]:
            tb = m.get("trust", {})
            if not tb.get("available"):
                continue
            est, truth = tb["estimate"], tb.get("accuracy_accepted")
            where = f"{r['task']} on {name}"
            if not est.get("trusted") or est.get("atc") is None or truth is None:
                refused.append(f"{where} ({_share(tb['flagged_share'])} flagged)")
            elif abs(est["atc"] - truth) <= CLOSE:
                close.append(where)
            else:
                far.append(f"{where} ({100 * (est['atc'] - truth):+.1f} points)")
    if not close + far + refused:
        return []
    parts = ([f"within {100 * CLOSE:.0f} points of the truth on {', '.join(close)}"] if close else []) + \
        ([f"further off on {', '.join(far)}"] if far else []) + \
        ([f"refused on {', '.join(refused)}"] if refused else [])
    return ["The label-free accuracy estimate (ATC on the accepted images) was " + "; ".join(parts) + ". Believe "
            "an estimate for unlabelled images only where few of them are flagged and a set like them was close "
            "here; otherwise label some images and measure."]


def findings(rows: list[dict]) -> list[str]:
    """What a reader should take from the section, in sentences generated from its numbers."""
    said = []
    for r in rows:
        t = task_trust(r)
        if t is not None:
            said += _detector_finding(t, r) + _power_finding(t)
    return said + _estimate_finding(rows)


SEPARATION_NOTE = ("Image by image, each set against the test split (the in-distribution images): the share the "
                   "out-of-distribution flag refuses, and how well the score, and for comparison the softmax "
                   "confidence (MSP), ranks the set's images above the test split's: AUROC (1 is perfect, 0.5 is "
                   "chance) and FPR at 95% TPR (the share of the set still accepted by the threshold that accepts "
                   f"95% of the test images; 0 is perfect). Probes, {PER_KIND} images of each kind: "
                   + "; ".join(f"{k}, {d}" for k, d in DESCRIPTIONS.items()) + ".")
POWER_NOTE = (f"The shift check (`cxr check`: Kolmogorov-Smirnov on the probabilities and Mann-Whitney on the "
              "scores, Bonferroni-combined; its feature test needs features the files do not keep) on "
              f"{DRAWS} random draws of n images of each external set against all the test split's images: the share "
              f"of draws in which it fires at p < {ALPHA:g} (its power). Draws from the test split against the rest "
              f"of it give its false-alarm rate, which should stay near or below {ALPHA:.0%}.")
ESTIMATE_NOTE = ("The label-free accuracy estimates (ATC and DoC, calibrated on validation) beside the true "
                 "accuracy of the same images, the error in points: on the images the flag accepts, and (ATC) on "
                 "all of them. No estimate is given where too many images are flagged.")


def trust_markdown(rows: list[dict]) -> list[str]:
    """The section's markdown lines; none when no task's files hold out-of-distribution scores."""
    if not any(task_trust(r) for r in rows):
        return []
    return [f"## {TITLE}", "", SEPARATION_NOTE, "", markdown_table(*separation_cells(rows)), "",
            POWER_NOTE, "", markdown_table(*power_cells(rows)), "", ESTIMATE_NOTE, "",
            markdown_table(*estimate_cells(rows)), "", *[f"- {s}" for s in findings(rows)], ""]


def trust_html(rows: list[dict]) -> list[str]:
    """The section's HTML parts; none when no task's files hold out-of-distribution scores."""
    if not any(task_trust(r) for r in rows):
        return []
    return [f"<h2>{TITLE}</h2>", f"<p>{html.escape(SEPARATION_NOTE)}</p>", _html_table(*separation_cells(rows)),
            f"<p>{html.escape(POWER_NOTE)}</p>", _html_table(*power_cells(rows)),
            f"<p>{html.escape(ESTIMATE_NOTE)}</p>", _html_table(*estimate_cells(rows)),
            "<ul class='trust'>" + "".join(f"<li>{html.escape(s)}</li>" for s in findings(rows)) + "</ul>"]
