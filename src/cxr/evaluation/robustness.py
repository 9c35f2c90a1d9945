"""The shift benchmark: a trained model on one split under every acquisition shift in
`shifts.SHIFTS`, at three severities, seeded. Writes `robustness_<split>.json/.csv` and
`figures/robustness_<split>.png` into the run folder.

Run it on `val` to compare recipes (selection never looks at test); on `test` to report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.dataset import describe, labels_of
from ..data.loading import get_test_samples, load_images, prepare_splits
from ..errors import CxrError
from ..files import write_csv, write_json
from ..training.checkpoint import load_checkpoint, model_from_checkpoint
from ..training.shifts import NOT_AUGMENTED, SHIFTS, apply_shift
from .evaluate import pneumonia_probability, predict_logits
from .metrics import point_metrics

METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc")


def shift_table(score, images, seed: int = 0) -> tuple[dict, list[dict]]:
    """(clean metrics, one row per shift and severity) for `score`: uint8 images -> metrics."""
    clean = score(images)
    rows = [{"shift": name, "severity": sev, **score(apply_shift(images, name, sev, seed))}
            for name in SHIFTS for sev in (1, 2, 3)]
    return clean, rows


def summarize(clean: dict, rows: list[dict]) -> dict:
    """Clean, mean and worst of each metric over all shifted rows, and over the held-out families."""
    def agg(subset: list[dict], fn) -> dict:
        return {m: float(fn([r[m] for r in subset if r[m] is not None])) for m in METRICS}

    held_out = [r for r in rows if r["shift"] in NOT_AUGMENTED]
    return {"clean": {m: clean[m] for m in METRICS}, "mean": agg(rows, np.mean), "worst": agg(rows, np.min),
            "held_out_mean": agg(held_out, np.mean), "held_out_shifts": list(NOT_AUGMENTED)}


def robustness_run(run_dir: Path, data_root: Path, split: str, device, workers: int, cache_dir=None,
                   seed: int = 0, log=print) -> dict:
    """Run the benchmark on `split` ("val" or "test") of `data_root` for RUN_DIR/best.pt; writes
    robustness_SPLIT.{json,csv} (its figure is drawn from the result by `reporting.plots`)."""
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir / "best.pt")
    if len(checkpoint["classes"]) > 2:
        raise CxrError(f"{run_dir}: a {len(checkpoint['classes'])}-class model; cxr robustness measures two-class "
                       "models at their threshold (run it on a --labels pneumonia or subtype run)")
    model, config = model_from_checkpoint(checkpoint)
    if split == "test":
        samples = get_test_samples(Path(data_root), config.seed, config.limit, config.val_ratio, config.classes, config.labels)
    else:  # the same patient split the run trained with
        samples = prepare_splits(Path(data_root), config.val_ratio, config.seed, config.limit, config.classes, config.labels).val
    log(f"data: {data_root}\n{describe({split: samples})}")
    images = load_images([s.path for s in samples], config.image_size, workers, desc=f"decode {split}",
                         cache_dir=cache_dir)
    y = labels_of(samples).numpy()
    threshold = float(checkpoint.get("threshold", 0.5))
    temperature = float(checkpoint.get("temperature", 1.0))

    def score(x) -> dict:
        prob = pneumonia_probability(predict_logits(model, x, 64, device, config.intensity), temperature)
        m = point_metrics(y, prob, threshold)
        return {k: m[k] for k in METRICS}

    clean, rows = shift_table(score, images, seed)
    result = {"split": split, "n": int(len(y)), "threshold": threshold, "seed": seed,
              **summarize(clean, rows), "rows": rows}
    write_json(run_dir / f"robustness_{split}.json", result)
    write_csv(run_dir / f"robustness_{split}.csv", ["shift", "severity", *METRICS],
              ([r["shift"], r["severity"], *(r[m] for m in METRICS)] for r in rows))
    return result
