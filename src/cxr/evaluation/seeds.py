"""Several seeds per task (`cxr run --seeds 0,1,2`), and what they say together.

`pipeline.run_seeds` trains them. Each seed is a complete run, exactly what `cxr run --seed K` makes alone (its own patient split,
init and batch order), in OUT/<task>/seed<K>/, so evaluate, explain, predict, serve and adapt
work on any of them. The images are decoded once for all seeds (run_options.RunOptions.memo): each
seed's split only picks other rows of the same decoded pool.

Across seeds, per task and per evaluation set (the test split and each external set):
`aggregate` gives mean, sd (n - 1) and min-max of every metric at the stored threshold, with
each seed's value; `seed_comparisons` compares the tasks on the same images twice: by the paired
tests of compare.py on seed-averaged probabilities (each task's P(PNEUMONIA) averaged over its
seeds, at the mean of its seeds' thresholds: an ensemble of the seeds), and by the spread of the
per-seed differences (task A seed K minus task B seed K). Holm's correction runs across every
p-value of a set. OUT/aggregate.json and OUT/comparisons.json hold them; report.py leads with them.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np

from ..errors import CxrError
from .compare import (
    N_BOOTSTRAP,
    align,
    compare_pair,
    read_run,
    resampling_unit,
    same_question,
)
from .paired import apply_holm

METRICS = ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "roc_auc", "pr_auc")
SEED_DIR = re.compile(r"^seed(\d+)$")


def seed_dir(out: Path, task: str, seed: int) -> Path:
    return Path(out) / task / f"seed{seed}"


def seeded_runs(out: Path) -> dict[str, dict[int, Path]]:
    """{task: {seed: folder}} of a multi-seed output folder (evaluated seeds only); {} otherwise."""
    found: dict[str, dict[int, Path]] = {}
    for task_dir in sorted(p for p in Path(out).iterdir() if p.is_dir()) if Path(out).is_dir() else []:
        for d in sorted(task_dir.iterdir()):
            m = SEED_DIR.match(d.name)
            if m and (d / "metrics.json").is_file():
                found.setdefault(task_dir.name, {})[int(m.group(1))] = d
    return found


def layouts(out: Path) -> tuple[list[str], list[str]]:
    """(tasks with a plain run folder OUT/<task>/best.pt, tasks with seed folders OUT/<task>/seed<K>/)."""
    plain, seeded = [], []
    for task_dir in sorted(p for p in Path(out).iterdir() if p.is_dir()) if Path(out).is_dir() else []:
        if (task_dir / "best.pt").is_file() or (task_dir / "metrics.json").is_file():
            plain.append(task_dir.name)
        if any(SEED_DIR.match(d.name) and d.is_dir() for d in task_dir.iterdir()):
            seeded.append(task_dir.name)
    return plain, seeded


def check_layout(out: Path, seeded: bool | None) -> None:
    """One output folder holds one layout: plain runs (OUT/<task>/) or runs of several seeds
    (OUT/<task>/seed<K>/), never both, since the report, summary and aggregate describe one.
    `seeded`: the layout about to be written (None: only check the folder as it is)."""
    plain, seeds = layouts(out)
    if seeded is None and plain and seeds:
        raise CxrError(f"{out}: holds plain runs ({', '.join(plain)}) and runs of several seeds ({', '.join(seeds)}); "
                       "one report describes one layout: move one of them to another folder")
    if seeded and plain:
        raise CxrError(f"{out}: holds plain runs ({', '.join(plain)}); a --seeds run writes OUT/<task>/seed<K>/ and its "
                       "own report: pass another --out")
    if seeded is False and seeds:
        raise CxrError(f"{out}: holds runs of several seeds ({', '.join(seeds)}); a run without --seeds writes "
                       "OUT/<task>/ and its own report: pass another --out (or --seeds to add to them)")


def finished(out: Path, tasks: list[str], seed: int) -> bool:
    """Every task of this seed trained and evaluated (what --resume skips)."""
    return all((seed_dir(out, t, seed) / "metrics.json").is_file() for t in tasks)


def _metrics_files(run: Path) -> dict[str, dict]:
    """{set name: metrics} of one seed's folder: the test split and every external set."""
    out = {}
    for path in sorted(run.glob("metrics*.json")):
        m = json.loads(path.read_text())
        out[m.get("set", {}).get("name", "test")] = m
    return out


def aggregate(runs: dict[str, dict[int, Path]]) -> dict:
    """{task: {set: {metric: {mean, sd, min, max, seeds: {seed: value}}}}} at the stored threshold."""
    result = {}
    for task, by_seed in runs.items():
        per_set: dict[str, dict[str, dict[int, float]]] = {}
        for seed, run in sorted(by_seed.items()):
            for name, m in _metrics_files(run).items():
                block = m.get("at_threshold", {}).get("operating") or multiclass_block(m)
                for metric in (METRICS if "at_threshold" in m else block):
                    value = (block.get(metric) or {}).get("value")
                    if value is not None:
                        per_set.setdefault(name, {}).setdefault(metric, {})[seed] = float(value)
        result[task] = {name: {metric: _summary(values) for metric, values in metrics.items()}
                        for name, metrics in per_set.items()}
    return result


def multiclass_block(m: dict) -> dict:
    """The seed-aggregated cells of a model of more than two classes (multiclass.py): accuracy,
    balanced accuracy, kappa, macro ROC AUC (as roc_auc), each class's sensitivity, and the
    pneumonia reading's accuracy and ROC AUC where there is one."""
    mc = m.get("multiclass")
    if not mc:
        return {}
    overall = dict(mc["overall"])
    block = {**{k: v for k, v in overall.items() if k != "macro_roc_auc"}, "roc_auc": overall["macro_roc_auc"]}
    block.update({f"sensitivity_{c.lower()}": cells["sensitivity"] for c, cells in mc["per_class"].items()})
    reading = m.get("pneumonia_reading", {}).get("at_threshold", {}).get("operating")
    if reading:
        block.update(pneumonia_accuracy=reading["accuracy"], pneumonia_roc_auc=reading["roc_auc"])
    return block


def _summary(values: dict[int, float]) -> dict:
    v = np.array(list(values.values()))
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": len(v),
            "seeds": {str(k): x for k, x in values.items()}}


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")  # one class: undefined


def _seed_differences(a: list[dict], b: list[dict]) -> dict:
    """A seed K minus B seed K for the seeds both have: each metric's mean, sd, min, max."""
    out = {}
    for metric in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        diffs = []
        for ra, rb in zip(a, b):
            y = ra["y"]
            rows = {"accuracy": np.ones_like(y, bool), "sensitivity": y == 1, "specificity": y == 0}.get(metric)
            if metric == "roc_auc":
                diffs.append(_auc(y, ra["prob"]) - _auc(y, rb["prob"]))
            elif not rows.any():  # no image of the class the metric counts
                diffs.append(float("nan"))
            else:
                ok_a = ((ra["prob"] >= ra["threshold"]) == y)[rows]
                ok_b = ((rb["prob"] >= rb["threshold"]) == y)[rows]
                diffs.append(float(ok_a.mean() - ok_b.mean()))
        d = np.array(diffs)
        d = d[~np.isnan(d)]
        if not len(d):  # undefined for every seed
            out[metric] = {"mean": None, "sd": None, "min": None, "max": None, "per_seed": []}
            continue
        out[metric] = {"mean": float(d.mean()), "sd": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                       "min": float(d.min()), "max": float(d.max()), "per_seed": [float(x) for x in d]}
    return out


def seed_comparisons(runs: dict[str, dict[int, Path]], set_name: str | None = None, seed: int = 0) -> dict:
    """The tasks compared on one set (None: test): paired tests on seed-averaged probabilities, and
    the spread of the per-seed differences, in compare.compare_runs's shape (pairs named by task)."""
    tasks = list(runs)
    per_task = {t: [read_run(runs[t][k], set_name) for k in sorted(runs[t])] for t in tasks}
    everyone = [r for t in tasks for r in per_task[t]]
    reading = same_question(everyone)
    groups = align(everyone, set_name)  # the same images, in one order, for every seed of every task
    ensembles = {t: {"run": t, "y": rs[0]["y"], "prob": np.mean([r["prob"] for r in rs], axis=0),
                     "threshold": float(np.mean([r["threshold"] for r in rs]))} for t, rs in per_task.items()}
    pairs = []
    for a, b in itertools.combinations(tasks, 2):
        pair = compare_pair(ensembles[a], ensembles[b], groups, seed)
        common = sorted(set(runs[a]) & set(runs[b]))
        pa = [per_task[a][sorted(runs[a]).index(k)] for k in common]
        pb = [per_task[b][sorted(runs[b]).index(k)] for k in common]
        pair["seed_differences"] = {"seeds": common, **_seed_differences(pa, pb)}
        pairs.append(pair)
    apply_holm([t for p in pairs for t in p["tests"].values()])
    flat = [t for p in pairs for t in p["tests"].values()]
    y = everyone[0]["y"]
    classes = everyone[0]["classes"]
    return {"set": set_name or "test", "images": {c: int((y == i).sum()) for i, c in enumerate(classes)},
            "patients": len(set(groups)),
            "runs": [{"run": t, "seeds": sorted(runs[t]), "threshold": e["threshold"]} for t, e in ensembles.items()],
            "pairs": pairs, "averaged_over_seeds": True,
            "bootstrap": {"resamples": N_BOOTSTRAP, "unit": resampling_unit(everyone[0]["paths"], groups),
                          "seed": seed},
            "correction": f"Holm across all {len(flat)} p-values of this comparison (seed-averaged probabilities, "
                          "each task at the mean of its seeds' thresholds)",
            **({"reading": reading} if reading else {})}


def aggregate_table(agg: dict, metrics=("accuracy", "sensitivity", "specificity", "roc_auc"),
                    titles: dict[str, str] | None = None) -> str:
    """Markdown: per task and set, mean ± sd [min-max] over seeds, then each seed's value
    (`titles`: a column heading for a metric, else its name)."""
    titles = titles or {}
    lines = ["| task | set | seeds | " + " | ".join(titles.get(m, m) for m in metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    for task, sets in agg.items():
        for name, cells in sets.items():
            first = cells[metrics[0]]
            lines.append(f"| {task} | {name} | {first['n']} | " + " | ".join(
                _cell(cells.get(m), m) for m in metrics) + " |")
    return "\n".join(lines)


def _cell(c: dict | None, metric: str) -> str:
    if c is None:
        return "n/a"
    if metric in ("roc_auc", "pr_auc", "pneumonia_roc_auc", "kappa"):
        return f"{c['mean']:.3f} ± {c['sd']:.3f} [{c['min']:.3f}-{c['max']:.3f}]"
    return f"{100 * c['mean']:.1f}% ± {100 * c['sd']:.1f} [{100 * c['min']:.1f}-{100 * c['max']:.1f}]"


def seed_sentences(agg: dict, comparisons: dict) -> list[str]:
    """The conclusions of a multi-seed report: each task's mean accuracy with its spread on every
    set, and for each pair and set what the corrected paired test on seed-averaged probabilities
    says (test split first, then each external set)."""
    out = []
    for task, sets in agg.items():
        for name, cells in sets.items():
            acc, auc = cells.get("accuracy"), cells.get("roc_auc")
            if acc:
                out.append(f"{task} on {name}: accuracy {100 * acc['mean']:.1f}% ± {100 * acc['sd']:.1f} over "
                           f"{acc['n']} seeds ({100 * acc['min']:.1f}-{100 * acc['max']:.1f})"
                           + (f", ROC AUC {auc['mean']:.3f} ± {auc['sd']:.3f}" if auc else "") + ".")
    for name, result in comparisons.items():
        n = sum(result["images"].values())
        for pair in result["pairs"]:
            t, auc_t = pair["tests"]["accuracy"], pair["tests"]["roc_auc"]
            spread = pair["seed_differences"]["accuracy"]
            verdict = (f"{pair['a']} is {'better' if t['difference'] > 0 else 'worse'} than {pair['b']}"
                       if t["p_holm"] < 0.05 else f"no difference in accuracy measurable on {n} images")
            auc_verdict = ("the AUCs differ" if auc_t["p_holm"] < 0.05 else "no AUC difference measurable") \
                if auc_t["p_holm"] is not None else None
            out.append(f"{pair['a']} against {pair['b']} on {name} (seed-averaged): accuracy "
                       f"{100 * t['difference']:+.1f} points (95% CI {100 * t['ci'][0]:+.1f} to {100 * t['ci'][1]:+.1f}, "
                       f"McNemar p = {t['p']:.2g}, Holm {t['p_holm']:.2g}): {verdict}; "
                       + (f"ROC AUC {auc_t['difference']:+.3f} (DeLong p = {auc_t['p']:.2g}, Holm "
                          f"{auc_t['p_holm']:.2g}): {auc_verdict}" if auc_verdict else
                          f"ROC AUC compared: undefined ({auc_t['undefined']})")
                       + f"; per seed the accuracy difference ranged {100 * spread['min']:+.1f} to "
                       f"{100 * spread['max']:+.1f} points.")
    return out
