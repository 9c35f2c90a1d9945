"""The model card's sentences: what a user of a model should read beside its predictions (predict,
serve and the report say the same). Plain dicts and records in, text out; imports nothing of cxr but
the operating point's record."""

from __future__ import annotations

from ..training.operating_point import OperatingPoint

# The first sentence of serve's intended-use line (deploy/serve.py); its second names the training
# data of the bundled model, which a report's own runs need not share.
INTENDED_USE = "For research and education only: not a medical device, not for diagnosis or treatment decisions."
# Fewer validation images than this and a chosen threshold carries a warning: below 50 images a
# class, one image moves the sensitivity or specificity it was chosen for by 2 points or more, and
# the threshold moves with them from one draw of patients to the next.
FEW_VALIDATION_IMAGES = 100


def describe_adaptation(a: dict) -> str:
    """One sentence for predict, serve and the report: where the model was fitted, on what, and
    how well that is expected to work there."""
    counts = ", ".join(f"{k} {v}" for k, v in a["counts"].items())
    text = f"adapted ({a['adapted']}) to the site {a['site']} ({counts} images, {a['patients']} patients)"
    ft = a.get("finetune")
    if ft:
        text += (f"; {ft['train']} trained for {ft['epochs']} epochs on {ft['site_train']['images']} site images"
                 + (f" with {ft['replay']:g} of each batch replayed from {ft['replay_images']} source training images"
                    if ft.get("replay_images") else "")
                 + (f", a soup of {ft['soup_fitted']['members']} such fine-tunes (seeds apart; epochs "
                    f"{', '.join(map(str, ft['soup_fitted']['kept_epochs']))} kept) deployed, its weights averaged"
                    if ft.get("soup_fitted")
                    else f", the weights of epoch {ft['kept_epoch']} deployed" if ft.get("kept_epoch") else "")
                 + (f" (chosen on {ft['chosen_on']})" if ft.get("chosen_on") else "")
                 + (f", mixed with the source weights at {ft['wise']['alpha']:g} (WiSE-FT"
                    + (", a coefficient fixed in advance)" if ft["wise"].get("fixed") else ")") if ft.get("wise") else ""))
    text += f"; operating point chosen on {OperatingPoint.from_dict(a['operating_point']).chosen_on}"
    points = {name: OperatingPoint.from_dict(p) for name, p in (a.get("operating_points") or {}).items()}
    if points:  # --site NAME in predict, serve and evaluate decides with one of these
        text += "; per site (--site NAME): " + ", ".join(
            f"{name} threshold {p.threshold:.3f} ({p.chosen_on}"
            + (f"; out-of-distribution flag above {p.ood_threshold:.2f}" if p.ood_threshold is not None else "") + ")"
            for name, p in points.items())
    k = a.get("kfold_estimate")
    if k:
        def cell(m):
            v, ci = m["value"], m.get("ci")
            return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        text += (f"; expected at the site ({k['folds']}-fold by {k['resampled']}): accuracy {cell(k['accuracy'])}, "
                 f"ROC AUC {cell(k['roc_auc'])}")
    return text


def describe_backbone(b: dict) -> str:
    """Where a self-supervised backbone came from (`cxr pretrain`), in one phrase."""
    sources = ", ".join(f"{s['data']} ({s['images']:,} images, sha256 {s['digest'][:12]})" for s in b["sources"])
    return (f"backbone pretrained self-supervised ({b['method']}, {b['epochs']} epochs at {b['image_size']} px, "
            f"seed {b['seed']}) on {b['images']:,} unlabelled images: {sources}")


def few_validation_warning(op: OperatingPoint) -> str | None:
    """A warning for an operating point whose threshold was chosen on fewer than
    FEW_VALIDATION_IMAGES validation images; None when nothing was chosen (0.5, argmax) or the
    record predates the count."""
    n = op.n_val
    if n is None or n >= FEW_VALIDATION_IMAGES or op.rule in ("0.5", "argmax", "fixed"):
        return None
    return (f"threshold was chosen on only {n} validation images (fewer than {FEW_VALIDATION_IMAGES}): on other "
            "images it may sit far from its rule's point; read its sensitivity and specificity with their "
            "intervals, or choose it again on more validation images (a larger --val-ratio for cxr run or "
            "train; more site images for cxr adapt)")
