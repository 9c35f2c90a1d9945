"""The operating point: where a model decides (threshold, temperature) and where that was chosen.

Evaluation chooses it on the validation split, `cxr adapt` at a site or again on the source's
validation split; best.pt and metrics.json store it as a plain dict (`to_dict`), since checkpoints
load with `torch.load(weights_only=True)`; predict, serve, evaluate and the report read it back
(`from_dict`). A field a record does not hold is None and is not written: a dict comes back with
the keys it was stored with, and one stored before a field existed reads with that field None.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class OperatingPoint:
    rule: str | None = None         # "youden", "sensitivity>=0.9", "0.5", "argmax"; "fixed" (nothing was
    #                                 chosen: a checkpoint without a point), "stored" (the source run's, kept)
    threshold: float | None = None  # on P(PNEUMONIA), the positive class (K classes: the pneumonia reading)
    temperature: float | None = None  # softmax(logits / T)
    chosen_on: str | None = None    # "validation", "site", "site validation patients", "N site validation
    #                                 images", the source run's rule applied again ...
    n_val: int | None = None        # the images it was chosen on, where counted (few: predict warns)
    decision: str | None = None     # a K-class model: how the label is decided
    val_ece: float | None = None    # validation calibration before and after the temperature
    val_ece_calibrated: float | None = None
    val_nll: float | None = None
    val_nll_calibrated: float | None = None
    site: str | None = None         # chosen at a site (`cxr adapt`: its folder) or picked by `--site NAME`
    n_site: int | None = None       # the site's images
    ood_threshold: float | None = None  # a per-site point (`cxr adapt --finetune`): the out-of-distribution
    #                                 flag's threshold on this site's own validation images (see for_site)
    reference_rows: list[int] | None = None  # [start, stop): this site's rows of the stored validation
    #                                 reference, which the shift check, the estimates and the monitor compare with
    extra: dict = field(default_factory=dict)  # keys unknown to this version, kept: a round trip loses none

    @classmethod
    def from_dict(cls, d: dict | None) -> OperatingPoint:
        """The record of a stored dict (None or {}: a point with nothing known)."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: d.pop(k) for k in list(d) if k in known}, extra=d)

    def to_dict(self) -> dict:
        """The stored dict: the fields that are set, in this order, then the unknown keys."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in d.items() if v is not None}, **self.extra}
