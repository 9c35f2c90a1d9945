"""`cxr adapt --evaluate K`'s result as a markdown table (adapt_evaluation.md, the terminal, the
report): one line per size and variant, the intervals, and a legend naming what the nested choice chose.
"""

from __future__ import annotations

from .heldout import NESTED


def _cell(block: dict) -> str:
    if block["value"] is None:
        return "n/a"
    ci = block.get("ci")
    return f"{100 * block['value']:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _diff(block: dict | None) -> str:
    if not block or block.get("ci") is None:
        return ""
    ci = block["ci"]
    return f"{100 * block['value']:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def evaluation_table(result: dict) -> str:
    sets = list(result.get("source_sets", {}))
    lines = ["| images per class | variant | accuracy | sensitivity | specificity | ROC AUC | threshold range | "
             "accuracy vs source (paired) | " + "".join(f"{n}: accuracy / AUC | " for n in sets),
             "|---|---|---|---|---|---|---|---|" + "---|" * len(sets)]
    for r in result["rows"]:
        n = r["adaptation_images"]
        size = ("all" if r["per_class"] is None else str(r["per_class"])) + \
            f" ({'-'.join(map(str, sorted(set(n['NORMAL']))))}/{'-'.join(map(str, sorted(set(n['PNEUMONIA']))))})"
        auc = r["roc_auc"]
        lines.append(f"| {size} | {r['variant']} | {_cell(r['accuracy'])} | {_cell(r['sensitivity'])} | "
                     f"{_cell(r['specificity'])} | {auc['value']:.3f}"
                     + (f" [{auc['ci'][0]:.3f}, {auc['ci'][1]:.3f}]" if auc.get("ci") else "")
                     + f" | {r['thresholds'][0]:.3f}-{r['thresholds'][1]:.3f} | "
                     + _diff(r.get("vs_source", {}).get("accuracy")) + " |"
                     + "".join(_kept(r, n) for n in sets))
    return "\n".join(lines) + _legend(result)


def _kept(row: dict, name: str) -> str:
    acc, auc = row["source_sets"].get(f"{name}_accuracy"), row["source_sets"].get(f"{name}_roc_auc")
    return f" {100 * acc['mean']:.1f} / {auc['mean']:.3f} |" if acc and auc else " |"


def _legend(result: dict) -> str:
    unit = {r.get("resampled", "patients") for r in result["rows"]}
    return ("\n\nAccuracy etc. in %, pooled over the held-out folds, 95% intervals resampling "
            + " and ".join(sorted(unit)) + "; accuracy vs source: this variant minus the source model on the "
            "same images (paired bootstrap); first-site columns: mean over the fitted models."
            + _nested_legend(result)
            + (f" Warning: {result['warning']}." if result.get("warning") else ""))


def _nested_legend(result: dict) -> str:
    """What the nested rows are, and which variant each training part chose."""
    chosen = [c["chosen"] for r in result["rows"] if r["variant"] == NESTED[0] for c in r.get("nested", [])]
    if not chosen:
        return ""
    counts = ", ".join(f"{name} {chosen.count(name)}x" for name in dict.fromkeys(chosen))
    return (f" Nested choice: in each outer fold, the variant with the highest ROC AUC on the training part's own "
            f"validation patients (never the held fold), so its row estimates what picking a setting this way does, "
            f"without the optimism of reading the best of the other rows (chosen: {counts}).")
