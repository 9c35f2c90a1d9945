"""WiSE-FT after the fact: the source run's weights and a `cxr adapt --finetune` run's weights mixed at
several coefficients, each mix written as a run folder (a copy of the fitted run with the mixed
weights, batch norm re-estimated on images of both sites as `cxr adapt --wise` does) and scored with
`cxr evaluate` on the named sets. Costs no training: one fine-tune read at every coefficient.

    python studies/wise_sweep.py SOURCE_RUN FITTED_RUN OUT [--alphas 0.5,0.7,0.9] \
        [--external NAME=DIR ...] [--device cpu] [--cache-dir DIR]

The batch-norm images: up to 256 of the fine-tune's own site training images (its site_predictions.csv,
role "fit") and 256 of the source run's training split, at random, drawn as `cxr adapt --wise` draws
them (its seed + 2). The operating point is the
fitted run's (the source's rule applied again). Every mix is scored on the dev-test (the source run's
test split) and each --external set; OUT/wise_sweep.md holds the table. Nothing is chosen here: the
coefficient a user keeps must come from validation images (`cxr adapt --evaluate ... --wise-alpha`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from cxr.adaptation.source import replay_images, source_data
from cxr.adaptation.finetune import batchnorm_images
from cxr.adaptation.weights import adabn, wise_mix
from cxr.data.loading import load_images
from cxr.files import read_csv
from cxr.training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="the source run's task folder")
    ap.add_argument("fitted", type=Path, help="a cxr adapt --finetune run folder made from it")
    ap.add_argument("out", type=Path, help="one run folder per coefficient goes here, and wise_sweep.md")
    ap.add_argument("--alphas", default="0.5,0.7,0.9")
    ap.add_argument("--external", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--seed", type=int, help="the seed `cxr adapt --seed` was given (default: the fitted run's "
                    "own, from its checkpoint; 0 if it records none); the batch-norm draw uses seed + 2 as cxr adapt")
    args = ap.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    src, fit = load_checkpoint(args.source / "best.pt"), load_checkpoint(args.fitted / "best.pt")
    model, config = model_from_checkpoint(fit)
    cache = Path(args.cache_dir) if args.cache_dir else None
    site_fit = [Path(r["path"]) for r in read_csv(args.fitted / "site_predictions.csv") if r["role"] == "fit"]
    site_x = load_images(site_fit, config.image_size, 2, desc="decode site fit", cache_dir=cache)
    data = source_data(args.source)
    replay = replay_images(args.source, data, config, workers=2, cache_dir=cache)
    seed = args.seed if args.seed is not None else fit.get("adaptation", {}).get("seed", 0)
    bn = batchnorm_images(site_x, replay, torch.Generator().manual_seed(seed + 2))  # cxr adapt --wise's draw
    rows = []
    for alpha in alphas:
        run = args.out / f"wise{alpha:g}"
        if not (run / "metrics.json").is_file():
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(args.fitted, run, ignore=shutil.ignore_patterns("metrics*.json", "predictions*.csv",
                                                                          "figures", "tensorboard"))
            model.load_state_dict(wise_mix(src["model"], fit["model"], alpha))
            if 0 < alpha < 1:
                adabn(model, bn, config.intensity, args.device)
            ck = dict(fit)
            ck["model"] = {k: v.cpu() for k, v in model.state_dict().items()}
            ck["adaptation"] = {**fit["adaptation"], "wise_after_the_fact": {"alpha": alpha, "bn_images": len(bn)}}
            save_checkpoint(run / "best.pt", ck)
            cli = [sys.executable, "-m", "cxr", "evaluate", str(run), "--device", args.device]
            cli += ["--cache-dir", args.cache_dir] if args.cache_dir else ["--no-cache"]
            subprocess.run(cli, check=True)
            for spec in args.external:
                name, folder = spec.split("=", 1)
                subprocess.run(cli + ["--name", name, "--data", folder], check=True)
        row = {"alpha": alpha}
        for name in ["test"] + [s.split("=", 1)[0] for s in args.external]:
            m = json.loads((run / ("metrics.json" if name == "test" else f"metrics_{name}.json")).read_text())
            pc = m["per_class"]
            row[name] = (100 * m["accuracy"], 100 * pc["NORMAL"]["accuracy"], 100 * pc["PNEUMONIA"]["accuracy"],
                         m["roc_auc"])
        rows.append(row)
    names = [k for k in rows[0] if k != "alpha"]
    lines = ["| WiSE coefficient | " + " | ".join(f"{n}: acc / spec / sens / AUC" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {r['alpha']:g} | " + " | ".join("{:.1f} / {:.1f} / {:.1f} / {:.3f}".format(*r[n]) for n in names)
              + " |" for r in rows]
    (args.out / "wise_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
