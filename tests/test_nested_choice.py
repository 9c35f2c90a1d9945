"""`cxr adapt --evaluate K`'s nested choice (adaptation/kfold.py): in each outer fold the variant is
scored on the training part's own validation patients, and never on an image of the held fold."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from cxr.adaptation.settings import AdaptSettings

from .helpers import make_run_dir

SIZE = 32
STEP = 0.01  # the fake logit of site image k is k * STEP


def _run_dir(root: Path) -> Path:
    """A run folder as `cxr train` leaves it (random weights, an operating point chosen on validation)."""
    return make_run_dir(root / "runs" / "scratch", threshold=0.5, rule="youden", temperature=1.0,
                        data=root / "absent")


def _site(root: Path, per_class: int = 18) -> Path:
    """Site images named like the data set's (two images for some patients), distinct noise each."""
    for i in range(per_class):
        for folder, name, level, seed in (("NORMAL", f"IM-{i // 2:04d}-{i % 2 + 1:04d}.png", 90, i),
                                          ("PNEUMONIA", f"person{i // 2}_bacteria_{i}.png", 150, 1000 + i)):
            rng = np.random.default_rng(seed)
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(rng.normal(level, 40, (SIZE, SIZE)), 0, 255).astype(np.uint8), mode="L").save(
                root / folder / name)
    return root


def test_the_nested_choice_scores_each_variant_on_the_training_parts_validation_patients_only(tmp_path,
                                                                                              monkeypatch):
    """Each variant's nested score reads exactly the inner validation patients of its fold (a part of
    the other folds): the images scored are identified through fake logits that encode each site
    image's index, read back from the probabilities the score is computed on."""
    import cxr.adaptation.kfold as kf
    from cxr.adaptation.methods import site_samples

    run, site = _run_dir(tmp_path), _site(tmp_path / "site")
    fold = kf.patient_folds(site_samples(site, unlabeled=False), 3, 0)
    index: dict[str, int] = {}

    def fake_logits(model, images, *args, **kwargs):
        keys = [hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in images]
        ks = [index.setdefault(k, len(index)) for k in keys]
        return np.stack([np.zeros(len(ks)), STEP * np.asarray(ks, dtype=np.float64)], 1).astype(np.float32)

    scored, inner_sets = [], []
    real_split = kf.site_validation_split

    def spy_split(y, patients, ratio, seed):
        fit, val = real_split(y, patients, ratio, seed)
        inner_sets.append(val.copy())
        return fit, val

    def spy_auc(y, p):
        scored.append(sorted(int(round(np.log(p / (1 - p)) / STEP)) for p in np.asarray(p, dtype=np.float64)))
        return 0.5

    monkeypatch.setattr(kf, "predict_logits", fake_logits)
    monkeypatch.setattr(kf, "site_validation_split", spy_split)
    monkeypatch.setattr(kf, "_auc", spy_auc)
    kf.evaluate_adaptation(run, site, tmp_path / "eval", k=3,
                           settings=AdaptSettings(device="cpu", log=lambda _: None))
    assert len(index) == 36 and len(inner_sets) == 3
    others = [np.flatnonzero(fold != f) for f in range(3)]
    inner = [sorted(others[f][inner_sets[f]].tolist()) for f in range(3)]
    assert scored == [inner[f] for f in range(3) for _ in ("keep", "adabn")]
    for f in range(3):
        assert not set(inner[f]) & set(np.flatnonzero(fold == f).tolist())
