"""Where a model can be trusted: out-of-distribution detectors side by side, the shift check's
power against the sample size, and the label-free accuracy estimates against the truth.

    python studies/ood_study.py RUN_DIR --data ../shared/data/chest_xray \
        --official ../shared/data/official_test_half --nih ../shared/data/nih_half --out runs/ood128

RUN_DIR is a trained task folder (best.pt). When its best.pt carries no statistics (trained
before cxr stored them), they are fitted here exactly as training does (cxr.trust.fit) into a
copy, OUT/best.pt; the run is not changed. Nothing is chosen on a scoring set: every threshold
comes from the run's validation split.

Sets: in-distribution = the dev-test (DATA/test); far = images that are not chest radiographs
(the sample images matplotlib and scikit-learn ship, and made ones: noise, gradients, text,
stripes); transformed dev-test images (inverted, rotated 90 degrees, a heavy crop); near =
--nih (adults, another hospital) and --official (a shift that does no harm); and the robustness
command's corruptions (for the estimates). Detectors: softmax confidence (MSP) and energy from
the logits, pytorch-ood's Mahalanobis (penultimate features, its own unshrunk fit),
MultiMahalanobis (four stages, unshrunk), ViM and KNN, and cxr's own score (four stages,
shrunk covariance, standardised per stage), each scored with pytorch-ood's OODMetrics, each
thresholded at 95% of validation accepted. Writes OUT/ood_study.json and OUT/shift_power.png;
prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("run", type=Path, help="a trained task folder holding best.pt")
    p.add_argument("--data", type=Path, required=True, help="the data set the run was trained on (its test/ is the dev-test)")
    p.add_argument("--official", type=Path, help="a second distribution the model still works on")
    p.add_argument("--nih", type=Path, help="another hospital")
    p.add_argument("--out", type=Path, required=True, help="folder for ood_study.json, shift_power.png and best.pt")
    p.add_argument("--draws", type=int, default=200, help="random draws per sample size (default: 200)")
    p.add_argument("--sizes", default="5,10,20,50,100", help="sample sizes of the shift check (default: 5,10,20,50,100)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--reuse-power", action="store_true", help="keep the shift-check power of an earlier "
                   "OUT/ood_study.json instead of drawing it again (the slowest part)")
    return p.parse_args(argv)


# --- the sets ---------------------------------------------------------------------------------------

def package_images(size: int) -> dict[str, np.ndarray]:
    """Photographs and drawings that Python packages ship, as (S, S) uint8 grayscale."""
    import matplotlib
    from PIL import Image

    from cxr.data.images import resize_square, to_gray

    found = {}
    folder = Path(matplotlib.get_data_path()) / "sample_data"
    for f in sorted(folder.glob("*")):
        if f.suffix.lower() in (".jpg", ".png"):
            found[f"matplotlib {f.name}"] = Image.open(f)
    try:
        from sklearn.datasets import load_sample_images

        sk = load_sample_images()
        for name, img in zip(sk.filenames, sk.images):
            found[f"scikit-learn {Path(name).name}"] = Image.fromarray(img)
    except Exception as e:  # noqa: BLE001 - a missing sample is said, not fatal
        print(f"note: scikit-learn's sample images unavailable ({e})")
    return {k: resize_square(to_gray(v), size) for k, v in found.items()}


def made_images(size: int, n: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = {}
    yy, xx = np.mgrid[0:size, 0:size] / size
    for k in range(n):
        out[f"noise {k}"] = rng.integers(0, 256, (size, size), dtype=np.uint8)
        a = rng.uniform(0, 2 * np.pi)
        out[f"gradient {k}"] = (255 * (np.cos(a) * xx + np.sin(a) * yy - min(0, np.cos(a)) - min(0, np.sin(a)))
                                / (abs(np.cos(a)) + abs(np.sin(a)))).clip(0, 255).astype(np.uint8)
        page = Image.new("L", (size, size), 255)
        draw = ImageDraw.Draw(page)
        words = "the quick brown fox jumps over the lazy dog chest x-ray report pneumonia normal".split()
        for line in range(0, size, max(8, size // 16)):
            draw.text((2, line), " ".join(rng.choice(words, 6)), fill=0)
        out[f"text {k}"] = np.asarray(page)
        out[f"stripes {k}"] = (255 * ((xx * rng.integers(4, 20)) % 1 > 0.5)).astype(np.uint8)
    return out


def transformed(images: torch.Tensor) -> dict[str, torch.Tensor]:
    s = images.shape[-1]
    crop = torch.nn.functional.interpolate(images[..., s // 4: 3 * s // 4, s // 4: 3 * s // 4].float(), size=(s, s),
                                           mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return {"inverted": 255 - images, "rotated 90": torch.rot90(images, 1, (2, 3)), "crop (centre quarter)": crop}


# --- detectors --------------------------------------------------------------------------------------

def detectors(trust, train_feats, train_labels, fc):
    """{name: scores(logits, features) -> (N,) numpy, higher = more unlike training}."""
    from pytorch_ood.detector import KNN, ViM, EnergyBased, Mahalanobis, MaxSoftmax, MultiMahalanobis

    from cxr.trust.features import LAYERS
    from cxr.trust.ood import fit_detector

    maha = Mahalanobis(None).fit_features(train_feats["layer4"], train_labels)
    multi = MultiMahalanobis([torch.nn.Identity()] * 4).fit_structured([train_feats[k] for k in LAYERS], train_labels)
    vim = ViM(None, d=min(256, train_feats["layer4"].shape[1] // 2), w=fc.weight, b=fc.bias).fit_features(
        train_feats["layer4"], train_labels)
    knn = KNN(None, k=50).fit_features(train_feats["layer4"], train_labels)
    penultimate = None  # cxr's shrunk fit on the last stage alone: standardised on validation below

    def mine_last(val):
        nonlocal penultimate
        penultimate = fit_detector(train_feats, train_labels, val, 2, layers=("layer4",))

    table = {
        "MSP (softmax confidence)": lambda z, f: MaxSoftmax.score(z).numpy(),
        "energy": lambda z, f: EnergyBased.score(z).numpy(),
        "Mahalanobis, last stage (pytorch-ood)": lambda z, f: maha.predict_features(f["layer4"]).numpy(),
        "Mahalanobis, last stage, shrunk (cxr)": lambda z, f: penultimate.score(f),
        "multi-layer Mahalanobis (pytorch-ood)": lambda z, f: multi.predict_structured([f[k] for k in LAYERS]).numpy(),
        "ViM (pytorch-ood)": lambda z, f: vim.predict_features(f["layer4"]).numpy(),
        "KNN k=50 (pytorch-ood)": lambda z, f: knn.predict_features(f["layer4"]).numpy(),
        "multi-layer Mahalanobis, shrunk (cxr, shipped)": lambda z, f: trust.detector.score(f),
    }
    return table, mine_last


def ood_metrics(inside: np.ndarray, outside: np.ndarray) -> dict:
    from pytorch_ood.metrics import OODMetrics

    m = OODMetrics()
    m.update(torch.as_tensor(np.r_[inside, outside], dtype=torch.float64),
             torch.as_tensor(np.r_[np.zeros(len(inside)), -np.ones(len(outside))]))
    r = m.compute()
    # FPR at 95% TPR with the in-distribution images as positives (as the report): the share of the
    # set still accepted when the cut accepts 95% of the dev-test; pytorch-ood's FPR95TPR counts the
    # other way round (outliers positive), so it is not used
    cut = np.quantile(inside, 0.95)
    return {"auroc": float(r["AUROC"]), "fpr95": float((np.asarray(outside) <= cut).mean())}


# --- the study --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    from cxr.config import config_from_dict
    from cxr.data.dataset import labels_of
    from cxr.data.folders import get_external_samples
    from cxr.data.loading import get_test_samples, load_images, prepare_splits
    from cxr.evaluation.check import verdict
    from cxr.training.checkpoint import load_checkpoint, model_from_checkpoint
    from cxr.training.shifts import SHIFTS, apply_shift
    from cxr.trust.estimate import confidence, estimate_accuracy
    from cxr.trust.features import forward_with_features
    from cxr.trust.fit import MAX_FIT_IMAGES, Trust, store_trust, stratified_draw
    from cxr.trust.shift import compare

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    ck = load_checkpoint(args.run / "best.pt")
    config = config_from_dict(ck["config"])
    if tuple(ck["classes"]) != ("NORMAL", "PNEUMONIA"):
        raise SystemExit(f"{args.run}: a {'/'.join(ck['classes'])} model; this study measures NORMAL/PNEUMONIA models")
    size = config.image_size
    root = Path(json.loads((args.run / "config.json").read_text())["data"])
    splits = prepare_splits(root, config.val_ratio, config.seed, config.limit, config.classes, config.labels)
    decode = lambda paths, what: load_images(paths, size, args.workers, desc=what, cache_dir=args.cache_dir)  # noqa: E731
    train_images = decode([s.path for s in splits.train], "train")
    val_images = decode([s.path for s in splits.val], "val")
    train_y, val_y = labels_of(splits.train), labels_of(splits.val)
    ckpt = args.out / "best.pt"
    if Trust.from_checkpoint(ck) is None:
        shutil.copy(args.run / "best.pt", ckpt)
        store_trust(ckpt, train_images, train_y, val_images, val_y, args.device, seed=config.seed)
        print(f"fitted the statistics as training does into {ckpt}")
    else:
        ckpt = args.run / "best.pt"
    ck = load_checkpoint(ckpt)
    trust = Trust.from_checkpoint(ck)
    net, _ = model_from_checkpoint(ck)
    threshold, temperature = float(ck.get("threshold", 0.5)), float(ck.get("temperature", 1.0))
    run = lambda images: forward_with_features(net, images, args.device, config.intensity)  # noqa: E731
    fit_idx = stratified_draw(train_y, MAX_FIT_IMAGES, config.seed)  # the images training fitted on
    _, train_feats = run(train_images[fit_idx])
    val_logits, val_feats = run(val_images)
    table, mine_last = detectors(trust, train_feats, train_y[fit_idx], net.fc)
    mine_last(val_feats)
    val_scores = {name: f(val_logits, val_feats) for name, f in table.items()}
    cut = {name: float(np.quantile(v, 0.95, method="higher")) for name, v in val_scores.items()}

    test = get_test_samples(args.data, config.seed, None, config.val_ratio, config.classes, config.labels)
    test_images = decode([s.path for s in test], "dev-test")
    sets: dict[str, tuple[torch.Tensor, np.ndarray | None, str]] = {"dev-test": (test_images, labels_of(test).numpy(), "in")}
    for name, folder in (("official_test_half", args.official), ("nih_half", args.nih)):
        if folder:
            s = get_external_samples(folder)
            sets[name] = (decode([x.path for x in s], name), labels_of(s).numpy(), "near")
    far = {**package_images(size), **made_images(size)}
    sets["not chest X-rays"] = (torch.from_numpy(np.stack(list(far.values())))[:, None], None, "far")
    rng = np.random.default_rng(0)
    pick = torch.from_numpy(rng.choice(len(test_images), 100, replace=False))
    for name, images in transformed(test_images[pick]).items():
        sets[name] = (images, None, "transformed")
    outputs = {}
    for name, (images, y, kind) in sets.items():
        z, f = run(images)
        outputs[name] = {"logits": z, "features": f, "y": y, "kind": kind,
                         "scores": {d: fn(z, f) for d, fn in table.items()}}
    inside = outputs["dev-test"]["scores"]
    per_image = {}
    for name, o in outputs.items():
        per_image[name] = {d: {"flagged": float((s > cut[d]).mean()),
                               **({} if name == "dev-test" else ood_metrics(inside[d], s))}
                           for d, s in o["scores"].items()}

    # the shift check's power: draws of n images against the validation reference
    ref = trust.reference
    ref_probs, ref_scores, ref_feats = ref.probabilities(temperature), ref.scores.numpy(), ref.features.numpy()
    sizes = [int(n) for n in args.sizes.split(",")]
    power = {}
    earlier = args.out / "ood_study.json"
    if args.reuse_power and earlier.is_file():
        kept = json.loads(earlier.read_text())
        power = {k: {int(n): v for n, v in row.items()} for k, row in kept["shift_power"].items()}
    for name in [n for n in ("dev-test", "official_test_half", "nih_half") if n in outputs and n not in power]:
        o = outputs[name]
        probs = torch.softmax(o["logits"].double() / temperature, 1).numpy()
        scores, feats = trust.detector.score(o["features"]), o["features"]["layer4"].numpy()
        power[name] = {}
        for n in sizes:
            if n > len(probs):
                continue
            fired = []
            for k in range(args.draws):
                idx = np.random.default_rng(1000 * n + k).choice(len(probs), n, replace=False)
                r = compare(probs[idx], ref_probs, scores[idx], ref_scores, feats[idx], ref_feats,
                            float((scores[idx] > trust.detector.threshold).mean()), seed=k)
                fired.append(r.shifted)
            power[name][n] = float(np.mean(fired))
        print(f"shift check on {name}: " + ", ".join(f"n={n}: {v:.0%}" for n, v in power[name].items()))
    full = {}
    for name in power:
        o = outputs[name]
        probs = torch.softmax(o["logits"].double() / temperature, 1).numpy()
        scores = trust.detector.score(o["features"])
        r = compare(probs, ref_probs, scores, ref_scores, o["features"]["layer4"].numpy(), ref_feats,
                    float((scores > trust.detector.threshold).mean()))
        full[name] = {"p_value": r.p_value, "shifted": r.shifted, "verdict": r.verdict}

    # label-free accuracy against the truth: the labelled sets and every corruption of the dev-test
    cal = ref.calibration(threshold, temperature, trust.detector.threshold)
    labelled = {n: (o["logits"], o["features"], o["y"]) for n, o in outputs.items() if o["y"] is not None}
    for shift_name in SHIFTS:
        for severity in (1, 2, 3):
            z, f = run(apply_shift(test_images, shift_name, severity, seed=0))
            labelled[f"{shift_name} {severity}"] = (z, f, sets["dev-test"][1])
    estimates = {}
    for name, (z, f, y) in labelled.items():
        probs = torch.softmax(z.double() / temperature, 1).numpy()
        scores = trust.detector.score(f)
        accepted = trust.detector.in_distribution(scores)
        decided = (probs[:, 1] >= threshold).astype(int)
        est = estimate_accuracy(probs, threshold, cal, accepted)
        naive = estimate_accuracy(probs, threshold, cal)
        truth = float((decided == y).mean())
        estimates[name] = {"truth": truth, "truth_accepted": float((decided == y)[accepted].mean()) if accepted.any() else None,
                           "flagged": float((~accepted).mean()), "atc": est.atc, "atc_ci": est.atc_ci, "doc": est.doc,
                           "trusted": est.trusted, "atc_all_images": naive.atc, "doc_all_images": naive.doc,
                           "mean_confidence": float(confidence(probs, threshold).mean()),
                           "verdict": verdict(False, est, None)}
    result = {"run": str(args.run), "checkpoint": str(ckpt), "image_size": size, "thresholds": cut,
              "validation": {"n": int(len(val_y)), "accuracy": cal.accuracy}, "per_image": per_image,
              "set_sizes": {n: len(o["logits"]) for n, o in outputs.items()}, "far_images": sorted(far),
              "shift_power": power, "shift_full_sets": full, "estimates": estimates,
              "seconds": round(time.perf_counter() - t0, 1)}
    for path in [args.out / "ood_study.json", *([args.json] if args.json else [])]:
        path.write_text(json.dumps(result, indent=2, default=float))
    draw_power(power, args.out / "shift_power.png")
    print_tables(result)
    return 0


def draw_power(power: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, row in power.items():
        ax.plot(list(row), list(row.values()), marker="o", label=name + (" (false alarms)" if name == "dev-test" else ""))
    ax.axhline(0.01, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("images checked")
    ax.set_ylabel("share of draws flagged as shifted (p < 0.01)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_tables(r: dict) -> None:
    names = [n for n in r["per_image"] if n != "dev-test"]
    detectors = list(r["per_image"]["dev-test"])
    print("\n| detector | dev-test flagged | " + " | ".join(f"{n}: flagged / AUROC / FPR95" for n in names) + " |")
    print("|---" * (2 + len(names)) + "|")
    for d in detectors:
        cells = [f"{100 * r['per_image'][n][d]['flagged']:.0f}% / {r['per_image'][n][d]['auroc']:.3f} / "
                 f"{r['per_image'][n][d]['fpr95']:.2f}" for n in names]
        print(f"| {d} | {100 * r['per_image']['dev-test'][d]['flagged']:.0f}% | " + " | ".join(cells) + " |")
    print("\n| set | n | " + " | ".join(f"n={n}" for n in next(iter(r["shift_power"].values()))) + " | whole set p |")
    for name, row in r["shift_power"].items():
        print(f"| {name} | {r['set_sizes'][name]} | " + " | ".join(f"{100 * v:.0f}%" for v in row.values())
              + f" | {r['shift_full_sets'][name]['p_value']:.2g} |")
    print("\n| set | truth (all / accepted) | flagged | ATC on accepted [95% CI] | DoC on accepted | ATC error vs "
          "accepted / all | ATC on all images (no flag) |")
    print("|---|---|---|---|---|---|---|")
    for name, e in r["estimates"].items():
        acc = "-" if e["truth_accepted"] is None else f"{100 * e['truth_accepted']:.1f}"
        if e["atc"] is None:
            atc, doc, err = "no estimate", "-", "-"
        else:
            atc = f"{100 * e['atc']:.1f} [{100 * e['atc_ci'][0]:.1f}, {100 * e['atc_ci'][1]:.1f}]"
            doc = f"{100 * e['doc']:.1f}"
            err = f"{100 * (e['atc'] - e['truth_accepted']):+.1f} / {100 * (e['atc'] - e['truth']):+.1f}"
        print(f"| {name} | {100 * e['truth']:.1f} / {acc} | {100 * e['flagged']:.0f}% | {atc} | {doc} | {err} | "
              f"{100 * e['atc_all_images']:.1f} |")


if __name__ == "__main__":
    raise SystemExit(main())
