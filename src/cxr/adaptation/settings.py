"""The settings `cxr adapt` fits a model with and `cxr adapt --evaluate K` measures with, in one record,
and the k-fold estimate a fitted model may carry (`--estimate-from`): only one made with the same
source run, site, fine-tuning spec and the four settings that change what it measures (`measured`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import FinetuneSpec
from ..errors import CxrError


@dataclass(frozen=True)
class AdaptSettings:
    """Everything both ways of adapting read beyond the source run, the site and the method."""

    tent_steps: int = 10                     # TENT: entropy steps of 32 images
    target_sensitivity: float | None = None  # threshold rule; None: Youden's J
    patients: Path | None = None             # a table of the site's patient ids (path,patient)
    seed: int = 0                            # folds, draws, TENT batches, the site's validation split
    device: torch.device | str = "cpu"
    workers: int = 2                         # decoding processes
    cache_dir: Path | None = None            # decoded images (None: decode every time)
    precision: str = "fp32"                  # fine-tuning arithmetic
    overwrite: bool = False                  # replace OUT if it exists
    # the first site's sets a fine-tuned model is measured on, by name
    externals: dict[str, Path] = field(default_factory=dict)
    log: Callable[[str], None] = print
    command: tuple[str, ...] = ()            # the cxr adapt command line (the new run's config.json)

    def measured(self) -> dict:
        """The settings a k-fold estimate records and a model fitted with --estimate-from must share."""
        return estimate_settings(self.target_sensitivity, self.tent_steps, self.patients, self.seed)


def estimate_settings(target_sensitivity: float | None, tent_steps: int, patients: Path | None, seed: int) -> dict:
    """The settings beyond the fine-tuning spec that change what a k-fold estimate measures; a
    model fitted with --estimate-from must match them (kfold_estimate checks)."""
    table = (hashlib.sha256(Path(patients).read_bytes()).hexdigest()[:16]
             if patients is not None and Path(patients).is_file() else None)
    return {"target_sensitivity": target_sensitivity, "tent_steps": tent_steps, "patients_sha256": table,
            "seed": seed}


def _specs(measured: list[dict]) -> list[dict]:
    """The fine-tuning settings an evaluation measured, with the defaults of fields added since it was
    written (an older evaluation is still the estimate of the same settings)."""
    out = []
    for d in measured:
        try:
            out.append(FinetuneSpec(**d).to_dict())
        except (TypeError, ValueError):
            out.append(d)
    return out


def kfold_estimate(eval_dir: Path, source: Path, site: Path, variant: str, *,
                   spec: FinetuneSpec | None = None, settings: dict | None = None) -> dict:
    """The k-fold estimate of `variant` (all images per class) from `cxr adapt --evaluate`'s folder,
    checked to be of the same source run and site, fine-tuning spec and `settings` (AdaptSettings.
    measured: target sensitivity, TENT steps, patient table, seed): what the model card shows
    beside the model fitted on all of the site's images."""
    path = Path(eval_dir) / "adapt_evaluation.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        raise CxrError(f"{path}: missing or unreadable; pass the --out folder of cxr adapt --evaluate K") from None
    if result.get("source_run") != str(Path(source).resolve()) or result.get("site") != str(Path(site).resolve()):
        raise CxrError(f"{path}: measured {result.get('source_run')} on {result.get('site')}, not this run on this site; "
                       "pass the evaluation of the same source run and site")
    if spec is not None and spec.to_dict() not in _specs(result.get("finetune", [])):
        raise CxrError(f"{path}: measured fine-tuning with other settings ({result.get('finetune')}) than these "
                       f"({spec.to_dict()}); pass the evaluation of the same --train, --replay, --epochs, --lr")
    if settings is not None:
        theirs = result.get("settings")
        if theirs is None:
            raise CxrError(f"{path}: records no target sensitivity, TENT steps, patient table or seed (made by an "
                           "older cxr): run cxr adapt --evaluate again with these settings")
        differ = [f"{key} {theirs.get(key)!r} there, {value!r} here" for key, value in settings.items()
                  if theirs.get(key) != value]
        if differ:
            raise CxrError(f"{path}: measured with other settings ({'; '.join(differ)}); pass the evaluation made "
                           "with the same --target-sensitivity, --tent-steps, --patients and --seed")
    row = next((r for r in result["rows"] if r["variant"] == variant and r["per_class"] is None), None)
    if row is None:
        found = sorted({r["variant"] for r in result["rows"] if r["per_class"] is None})
        raise CxrError(f"{path}: holds no '{variant}' row on all images (found: {', '.join(found)}); evaluate this "
                       "variant (the same --train, --replay, --epochs, --lr) with --sizes including all")
    return {"from": str(path.resolve()), "folds": result["folds"], "variant": variant,
            **{k: row[k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc")},
            "resampled": row.get("resampled", "patients")}
