"""Build the bundled sample (src/cxr/sample/) from the development copy of the data set:
100 images per class from train/ and 50 per class from test/ (the dev-test, patient-disjoint
from train), one image per patient where the class has enough patients, chosen with a fixed
seed. Never from official_test_half. The files are copied byte for byte (224x224 JPEGs).

    python tools/make_sample.py --data ../shared/data/chest_xray
"""

from __future__ import annotations

import argparse
import random
import shutil
from collections import defaultdict
from pathlib import Path

from cxr.config import CLASSES
from cxr.data.folders import list_split

COUNTS = {"train": 100, "test": 50}
OUT = Path(__file__).resolve().parents[1] / "src" / "cxr" / "sample"


def pick(samples, n: int, rng: random.Random):
    by_patient = defaultdict(list)
    for s in samples:
        by_patient[s.patient].append(s)
    patients = sorted(by_patient)
    rng.shuffle(patients)
    chosen = [rng.choice(sorted(by_patient[p], key=lambda s: s.path.name)) for p in patients[:n]]
    rest = sorted((s for s in samples if s not in chosen), key=lambda s: s.path.name)
    rng.shuffle(rest)
    return chosen + rest[:n - len(chosen)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray"))
    p.add_argument("--seed", type=int, default=2018)
    args = p.parse_args()
    rng = random.Random(args.seed)
    for split, n in COUNTS.items():
        samples = list_split(args.data, split)
        for label, name in enumerate(CLASSES):
            folder = OUT / split / name
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            for s in pick([s for s in samples if s.label == label], n, rng):
                shutil.copyfile(s.path, folder / s.path.name)
    total = sum(f.stat().st_size for f in OUT.rglob("*.jp*g"))
    print(f"wrote {OUT}: {sum(1 for _ in OUT.rglob('*.jp*g'))} images, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
