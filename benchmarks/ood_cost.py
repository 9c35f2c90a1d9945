"""What the out-of-distribution score costs `cxr predict`: the same images predicted by the same
checkpoint with its statistics and without them (the score marked unavailable), alternating in one
process, the median of each.

    python benchmarks/ood_cost.py runs/study/scratch-robust/best.pt ../shared/data/chest_xray/test --n 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a best.pt with out-of-distribution statistics")
    p.add_argument("images", type=Path, help="a folder of images (searched recursively)")
    p.add_argument("--n", type=int, default=256, help="images per run (default: 256)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each (default: 5)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)

    from cxr.deploy.predict import Model, expand_inputs
    from cxr.training.checkpoint import load_checkpoint

    ck = load_checkpoint(args.checkpoint)
    if "trust" not in ck:
        raise SystemExit(f"{args.checkpoint}: holds no out-of-distribution statistics; nothing to compare")
    files = [i.name for i in expand_inputs([args.images]) if i.path is not None][:args.n]
    with_score, without = Model(ck), Model({k: v for k, v in ck.items() if k != "trust"})
    for m in (with_score, without):  # warm-up: decode paths, allocator, threads
        m.predict(files[:32])
    seconds = {"with score": [], "without": []}
    pairs = [("with score", with_score), ("without", without)]
    for k in range(args.repeats):
        for name, m in (pairs if k % 2 == 0 else pairs[::-1]):  # alternate the order: no side goes first always
            t = time.perf_counter()
            m.predict(files)
            seconds[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    best = {k: min(v) for k, v in seconds.items()}  # the least disturbed run of each (a shared machine)
    result = {"images": len(files), "image_size": with_score.image_size, "median_seconds": med,
              "min_seconds": best, "overhead": med["with score"] / med["without"] - 1,
              "overhead_min": best["with score"] / best["without"] - 1, "runs": seconds}
    print(f"{len(files)} images at {with_score.image_size} px: with the score {med['with score']:.2f} s, without "
          f"{med['without']:.2f} s (median of {args.repeats}): overhead {100 * result['overhead']:+.1f}%; "
          f"fastest runs {best['with score']:.2f} s and {best['without']:.2f} s: {100 * result['overhead_min']:+.1f}%")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
