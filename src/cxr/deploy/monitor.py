"""The prediction log of `cxr serve`, and the monitor that reads it (`cxr monitor DB`, `/monitor`).

The log: one SQLite row per prediction the server answers: when, which model (the checkpoint's
path and the first hex digits of its sha256), which input (the sha256 of the uploaded bytes),
the probability, the decision, the out-of-distribution score and flag, and the site. Never the
pixels and never the file's name (a name can carry a patient's). WAL mode, committed once per
request before the answer leaves, so a killed server loses no row of an answered request.
Written with the standard library's sqlite3 only.

The monitor cuts one model's rows into windows of N consecutive predictions, counted from the
first, and for each gives the share flagged as unlike the training images, the shift test against
the model's validation images (`trust.shift.compare` on the logged probabilities and scores; no
features are logged, so no kernel test) and the label-free accuracy estimate
(`trust.estimate.estimate_accuracy`). A window departs, and raises the alarm, when the shift test
fires at its level or the flagged share exceeds the estimate's limit (MAX_FLAGGED).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import CxrError
from ..trust.estimate import MAX_FLAGGED, Calibration, estimate_accuracy
from ..trust.shift import FEW_IMAGES, MIN_IMAGES, compare

DEFAULT_NAME = "predictions.db"  # in the checkpoint's run folder, unless --log-db names another
DEFAULT_WINDOW = 50   # predictions per window: the shift test sees a real shift from about 20 (docs/guide/monitoring.md)
DEFAULT_LAST = 20     # windows shown, the latest last
DIGEST_CHARS = 12     # of the checkpoint's sha256: enough to tell two checkpoints apart
FORMAT = 1            # PRAGMA user_version of the log
SCHEMA = """CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,        -- UTC, ISO 8601, when the answer was logged
    model TEXT NOT NULL,       -- the checkpoint's resolved path
    model_digest TEXT NOT NULL,-- the first 12 hex digits of the checkpoint file's sha256
    site TEXT,                 -- the --site whose operating point decides (NULL: the checkpoint's own)
    input_sha256 TEXT,         -- sha256 of the uploaded bytes
    probability REAL,          -- P(class 1) for two classes; NULL for more
    probabilities TEXT,        -- JSON {class: P}
    decision TEXT,             -- the label answered
    threshold REAL,            -- P(class 1) at or above it decides class 1 (NULL: the highest decides)
    temperature REAL,
    ood_score REAL,            -- NULL: the checkpoint stores no out-of-distribution statistics
    in_distribution INTEGER,   -- 1 like the training images, 0 flagged, NULL no statistics
    error TEXT                 -- why the file could not be read (the other columns NULL)
)"""
NO_STATISTICS = ("holds no out-of-distribution statistics (written before cxr stored them): no shift test, "
                 "flagged share or accuracy estimate; shown: counts and decisions")
COLUMNS = ("time", "model", "model_digest", "site", "input_sha256", "probability", "probabilities", "decision",
           "threshold", "temperature", "ood_score", "in_distribution", "error")


def default_log_path(checkpoint_path: Path | str) -> Path:
    return Path(checkpoint_path).parent / DEFAULT_NAME


@dataclass(frozen=True)
class ModelId:
    """What the log says of the model that answered."""

    path: str
    digest: str
    site: str | None = None


def model_id(checkpoint_path: Path | str, site: str | None = None) -> ModelId:
    h = hashlib.sha256()
    with open(checkpoint_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return ModelId(str(Path(checkpoint_path).resolve()), h.hexdigest()[:DIGEST_CHARS], site)


class PredictionLog:
    """The server's writer: one connection, one transaction per request (serialised by a lock)."""

    def __init__(self, path: Path | str, model: ModelId):
        self.path, self.model = Path(path), model
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit survives the machine, not only the process
            with self._db:
                self._db.execute(SCHEMA)
                self._db.execute(f"PRAGMA user_version={FORMAT}")
        except sqlite3.Error as e:
            raise CxrError(f"{self.path}: cannot write the prediction log there ({e}); pass --log-db PATH "
                           "elsewhere, or --no-log") from None

    def write(self, records: list[dict], hashes: list[str | None], threshold: float | None,
              temperature: float) -> None:
        """One row per record (`Model.fill`'s, or one with an `error`), committed together."""
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        m = self.model
        rows = []
        for r, sha in zip(records, hashes):
            probs = r.get("probabilities")
            p1 = float(list(probs.values())[1]) if probs and len(probs) == 2 else None
            inside = r.get("in_distribution")
            rows.append((now, m.path, m.digest, m.site, sha, p1, json.dumps(probs) if probs else None,
                         r.get("label"), threshold, temperature, r.get("ood_score"),
                         None if inside is None else int(inside), r.get("error")))
        try:
            with self._lock, self._db:
                self._db.executemany(f"INSERT INTO predictions ({', '.join(COLUMNS)}) VALUES "
                                     f"({', '.join('?' * len(COLUMNS))})", rows)
        except sqlite3.Error as e:
            raise CxrError(f"{self.path}: these predictions could not be logged ({e}); check the disk") from None

    def close(self) -> None:
        self._db.close()


# --- reading --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Logged:
    """One model's predictions (rows with an error left out), oldest first, as arrays: all of them,
    or the last ones from `offset` on."""

    model: ModelId
    total: int                    # the model's predictions in the log
    offset: int                   # how many of them come before the first held here
    ids: np.ndarray               # (N,) row ids
    times: list[str]
    classes: tuple[str, ...]
    probs: np.ndarray             # (N, K)
    scores: np.ndarray | None     # (N,) None when the model logged none
    flagged: np.ndarray | None    # (N,) bool
    threshold: float | None
    temperature: float
    errors: int                   # this model's rows of unreadable files
    others: int                   # rows of other models (or sites) in the same log


def open_log(path: Path | str) -> sqlite3.Connection:
    """The log, read-only, or CxrError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CxrError(f"{path}: no prediction log here; cxr serve writes one (predictions.db in the checkpoint's "
                       "run folder, or the --log-db it was given)")
    try:
        db = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
        db.execute("SELECT id FROM predictions LIMIT 1")
    except sqlite3.Error as e:
        raise CxrError(f"{path}: not a prediction log of cxr serve ({e})") from None
    return db


def read_log(path: Path | str, model: ModelId | None = None, size: int | None = None,
             last: int | None = None) -> Logged | None:
    """The rows of `model` (path ignored: its digest and site), or of the model that answered last;
    with `size` and `last`, only those of its last `last` windows of `size` (a long log is read in
    time proportional to what is shown). None when the log is empty."""
    db = open_log(path)
    try:
        db.execute("BEGIN")  # one snapshot for the counts and the rows, while the server appends
        if model is None:
            newest = db.execute("SELECT model, model_digest, site FROM predictions ORDER BY id DESC LIMIT 1").fetchone()
            if newest is None:
                return None
            model = ModelId(*newest)
        same = "model_digest = ? AND site IS ?"
        total = db.execute(f"SELECT COUNT(*) FROM predictions WHERE {same} AND error IS NULL",
                           (model.digest, model.site)).fetchone()[0]
        offset = 0 if size is None or last is None else max(0, -(-total // size) - last) * size
        rows = db.execute(f"SELECT id, time, probabilities, threshold, temperature, ood_score, in_distribution "
                          f"FROM predictions WHERE {same} AND error IS NULL ORDER BY id LIMIT -1 OFFSET ?",
                          (model.digest, model.site, offset)).fetchall()
        errors = db.execute(f"SELECT COUNT(*) FROM predictions WHERE {same} AND error IS NOT NULL",
                            (model.digest, model.site)).fetchone()[0]
        every = db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
    finally:
        db.close()
    named = [json.loads(r[2]) for r in rows]
    classes = tuple(named[0]) if named else ()
    scores = np.array([np.nan if r[5] is None else r[5] for r in rows], dtype=float)
    has_scores = len(rows) > 0 and not np.isnan(scores).any()
    return Logged(model, total, offset, np.array([r[0] for r in rows], dtype=int), [r[1] for r in rows], classes,
                  np.array([[p[c] for c in classes] for p in named], dtype=float).reshape(len(rows), len(classes)),
                  scores if has_scores else None,
                  np.array([r[6] == 0 for r in rows]) if has_scores else None,
                  rows[-1][3] if rows else None, float(rows[-1][4]) if rows else 1.0, errors,
                  every - total - errors)


# --- windows --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Baseline:
    """What a window is compared with: the model's validation images as its checkpoint stores them."""

    probs: np.ndarray        # (M, K) at the served temperature
    scores: np.ndarray       # (M,) out-of-distribution scores
    calibration: Calibration
    threshold: float         # the served decision threshold (two classes)

    @classmethod
    def of(cls, trust, threshold: float, temperature: float) -> "Baseline | None":
        """From a checkpoint's `Trust` (None: no statistics stored, no baseline)."""
        if trust is None:
            return None
        ref = trust.reference
        return cls(ref.probabilities(temperature), ref.scores.numpy(),
                   ref.calibration(threshold, temperature, trust.detector.threshold),
                   threshold)


@dataclass(frozen=True)
class Window:
    index: int
    first_id: int
    last_id: int
    start: str
    end: str
    n: int
    full: bool
    positive_share: float | None   # share decided class 1 (two classes)
    flagged_share: float | None    # share flagged as unlike the training images
    shift: dict | None             # ShiftResult.to_dict()
    estimate: dict | None          # Estimate.to_dict()
    judged: bool                   # enough predictions to say whether it departs
    alarm: bool
    reasons: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def judge_window(index: int, logged: Logged, rows: slice, size: int, baseline: Baseline | None) -> Window:
    """One window's numbers, and whether it departs."""
    probs = logged.probs[rows]
    n = len(probs)
    flagged = None if logged.flagged is None else logged.flagged[rows]
    share = None if flagged is None else float(flagged.mean())
    positive = None
    if probs.shape[1] == 2:
        threshold = logged.threshold if baseline is None else baseline.threshold
        positive = float((probs[:, 1] >= threshold).mean())
    judged = n >= min(size, FEW_IMAGES)
    shift = estimate = None
    reasons = []
    if baseline is not None and n >= MIN_IMAGES:
        scores = None if logged.scores is None else logged.scores[rows]
        shift = compare(probs, baseline.probs, scores, None if scores is None else baseline.scores,
                        flagged_share=share)
        estimate = estimate_accuracy(probs, baseline.threshold, baseline.calibration,
                                     None if flagged is None else ~flagged)
        if judged and shift.shifted:
            reasons.append(f"the shift test fires (p = {shift.p_value:.2g} < {shift.alpha:g}): these predictions "
                           "differ from the model's on its validation images")
    if judged and share is not None and share > MAX_FLAGGED:
        reasons.append(f"{share:.0%} flagged as unlike the training images (the limit is {MAX_FLAGGED:.0%}; "
                       "validation: 5%)")
    if not judged:
        reasons.append(f"too few predictions to judge yet ({n} of {min(size, FEW_IMAGES)})")
    ids = logged.ids[rows]
    return Window(index, int(ids[0]), int(ids[-1]), logged.times[rows][0], logged.times[rows][-1], n, n == size,
                  positive, share, None if shift is None else shift.to_dict(),
                  None if estimate is None else estimate.to_dict(), judged, judged and bool(reasons), tuple(reasons))


def windows(logged: Logged, baseline: Baseline | None, size: int = DEFAULT_WINDOW,
            last: int | None = DEFAULT_LAST) -> tuple[list[Window], int]:
    """The last `last` windows of `size` predictions (all when None; the newest may be partial)
    and how many there are; windows start at the model's first prediction, so they stay put as
    the log grows."""
    total = -(-logged.total // size)
    first = 0 if last is None else max(0, total - last)
    if first * size < logged.offset:
        raise ValueError(f"the log was read from prediction {logged.offset}: windows of {size} from {first * size} "
                         "need more")
    return [judge_window(k, logged, slice(k * size - logged.offset, (k + 1) * size - logged.offset), size, baseline)
            for k in range(first, total)], total


def summarise(logged: Logged | None, baseline: Baseline | None, size: int = DEFAULT_WINDOW,
              last: int | None = DEFAULT_LAST, notes: tuple[str, ...] = ()) -> dict:
    """The monitor's answer, as `cxr monitor --json`, `/monitor.json` and the page show it."""
    notes = list(notes)
    if logged is None or logged.total == 0:
        return {"model": None if logged is None else asdict(logged.model), "n": 0, "window": size, "windows": [],
                "n_windows": 0, "alarms": 0, "notes": notes, "errors": 0 if logged is None else logged.errors,
                "verdict": "no predictions logged yet"}
    if logged.others:
        notes.append(f"{logged.others} logged rows of other models or sites are left out")
    shown, total = windows(logged, baseline, size, last)
    departing = [w for w in shown if w.alarm]
    if departing:
        latest = departing[-1]
        verdict = (f"ALARM: {len(departing)} of the last {len(shown)} windows depart; window {latest.index}: "
                   + "; ".join(latest.reasons))
    else:
        verdict = f"no alarm in the last {len(shown)} window(s)"
    return {"model": asdict(logged.model), "classes": list(logged.classes), "n": logged.total,
            "errors": logged.errors, "window": size, "n_windows": total, "alarms": len(departing),
            "notes": notes, "verdict": verdict, "windows": [w.to_dict() for w in shown]}


def baseline_for(model: ModelId, checkpoint: Path | str | None = None) -> tuple[Baseline | None, str | None]:
    """The baseline of the checkpoint that answered (or of `checkpoint`), and a one-line note when
    there is none or it may not be the one that answered."""
    from ..training.checkpoint import for_site, load_checkpoint
    from ..trust.fit import Trust

    path = Path(checkpoint or model.path)
    if not path.is_file():
        return None, (f"the checkpoint {path} named in the log is gone: no shift test or accuracy estimate (pass "
                      "--checkpoint with the served one); shown: what the log holds")
    digest = model_id(path).digest
    note = None
    if digest != model.digest:
        if checkpoint is None:
            return None, (f"the checkpoint {path} changed since it answered (digest {digest}, logged "
                          f"{model.digest}): no shift test or accuracy estimate (pass --checkpoint with the served "
                          "one); shown: what the log holds")
        note = f"{path} (digest {digest}) is not the checkpoint that answered ({model.digest}): compared with it anyway"
    ck = for_site(load_checkpoint(path), model.site)
    trust = Trust.from_checkpoint(ck)
    if trust is None:
        return None, f"{path} {NO_STATISTICS}"
    threshold = float(ck.get("threshold", 0.5)) if len(ck["classes"]) == 2 else 0.5
    return Baseline.of(trust, threshold, float(ck.get("temperature", 1.0))), note


def monitor(db: Path | str, size: int = DEFAULT_WINDOW, checkpoint: Path | str | None = None,
            last: int | None = DEFAULT_LAST) -> dict:
    """`cxr monitor DB`: the windows of the model that answered last, against its checkpoint."""
    logged = read_log(db, size=size, last=last)
    if logged is None:
        return summarise(None, None, size, last)
    baseline, note = baseline_for(logged.model, checkpoint)
    report = summarise(logged, baseline, size, last, (note,) if note else ())
    report["db"] = str(Path(db).resolve())
    return report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def format_monitor(report: dict) -> str:
    """The terminal's table: one line per window, the notes, and the verdict last."""
    m = report["model"]
    if m is None or report["n"] == 0:
        return "\n".join(report["notes"] + [report["verdict"]])
    lines = [f"{report['n']} predictions of {m['path']} (digest {m['digest']}"
             + (f", site {m['site']}" if m["site"] else "") + f"), {report['errors']} unreadable files; "
             f"windows of {report['window']}, the last {len(report['windows'])} of {report['n_windows']} shown"]
    lines += [f"note: {n}" for n in report["notes"]]
    lines.append(f"{'window':>6}  {'rows':>13}  {'n':>4}  {'positive':>8}  {'flagged':>7}  {'shift p':>8}  "
                 f"{'accuracy (ATC) [95% CI]':<24}  alarm")
    for w in report["windows"]:
        s, e = w["shift"], w["estimate"]
        acc = "-" if e is None else (f"{e['atc']:.1%} [{e['atc_ci'][0]:.0%}, {e['atc_ci'][1]:.0%}]" if e["trusted"]
                                     else "none (too many flagged)")
        why = [x for x, fired in (("shift", s is not None and s["shifted"]),
                                  (f"flagged > {MAX_FLAGGED:.0%}", (w["flagged_share"] or 0) > MAX_FLAGGED)) if fired]
        said = "ALARM: " + ", ".join(why) if w["alarm"] else ("" if w["judged"] else w["reasons"][0])
        lines.append(f"{w['index']:>6}  {w['first_id']:>6}-{w['last_id']:<6}  {w['n']:>4}  "
                     f"{_pct(w['positive_share']):>8}  {_pct(w['flagged_share']):>7}  "
                     f"{'-' if s is None else format(s['p_value'], '.2g'):>8}  {acc:<24}  {said}")
    lines.append(report["verdict"])
    return "\n".join(lines)
