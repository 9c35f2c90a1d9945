"""What two splits share: patient ids, byte-identical files, and images identical by content.

A patient id found in two splits is not evidence of a leak by itself: the official download
numbers its patients separately in train/ and test/ (train's `person100` is not test's
`person100`; about 150 ids collide). What leaks a result is the same radiograph in two places,
possibly re-encoded or resized. That is checked by content: each decoded image is reduced to a
32x32 thumbnail, centred and scaled to unit length, and two images whose thumbnails correlate at
`NEAR_DUPLICATE` or more are called copies. Measured on the shared data (128 px decode): different
children's images never exceeded 0.973 (train against dev-test and against the official test
half), while copies resized to 300x260 and re-saved as JPEG at quality 40 kept >= 0.9999.

What it does not catch: a copy that was cropped by ~5%, rotated by ~3 degrees, padded,
mirrored or histogram-equalised falls below the threshold (measured in the review of issue 24);
the thumbnail compares whole frames in place, so anything that moves or remaps the pixels hides
the copy. A clean check is no proof that two sets are disjoint.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from .dataset import Sample

NEAR_DUPLICATE = 0.995  # thumbnail correlation from which two images count as one radiograph
THUMBNAIL = 32


def overlapping_patients(a: list[Sample], b: list[Sample]) -> set[str]:
    return {s.patient for s in a} & {s.patient for s in b}


def file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def duplicates_across(splits: dict[str, list[Sample]], workers: int = 2) -> list[tuple[str, Path, str, Path]]:
    """Pairs of byte-identical files that sit in two different splits: (split, path, split, path)."""
    named = [(name, s.path) for name, samples in splits.items() for s in samples]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        digests = list(pool.map(lambda item: file_digest(item[1]), named))
    first: dict[str, tuple[str, Path]] = {}
    pairs = []
    for (split, path), digest in zip(named, digests):
        if digest in first and first[digest][0] != split:
            pairs.append((*first[digest], split, path))
        first.setdefault(digest, (split, path))
    return pairs


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) uint8 -> (N, 1024) centred unit vectors of 32x32 area-averaged thumbnails."""
    t = F.interpolate(images.float(), size=(THUMBNAIL, THUMBNAIL), mode="area").flatten(1)
    t = t - t.mean(1, keepdim=True)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-6)


def near_duplicates(a: torch.Tensor | list[torch.Tensor], b: torch.Tensor, threshold: float = NEAR_DUPLICATE,
                    chunk: int = 1024) -> list[tuple[int, int, float]]:
    """(i, j, similarity) for every image b[j] whose thumbnail correlates with a[i]'s at
    `threshold` or more: the same radiograph, even re-encoded, resized or slightly re-exposed.
    `a` may be a list of batches (indices run on across them), so they need not be concatenated."""
    ta = torch.cat([thumbnails(x) for x in a]) if isinstance(a, list) else thumbnails(a)
    tb = thumbnails(b)
    pairs = []
    for start in range(0, len(tb), chunk):
        sim = tb[start:start + chunk] @ ta.T
        for j, i in (sim >= threshold).nonzero().tolist():
            pairs.append((i, start + j, float(sim[j, i])))
    return pairs


Images = tuple[list[Sample], torch.Tensor | list[torch.Tensor]]  # samples, decoded (N, 1, S, S) uint8 images


def content_overlap_notes(reference: Images, others: dict[str, Images], reference_name: str = "train"
                          ) -> dict[str, list[str]]:
    """{set name: notes}: a warning for images of each other set that are copies of reference
    images, or a plain note where patient ids collide but no image does (ids numbered per split);
    an empty list where neither. The notes are kept in each set's metrics file and the report."""
    ref_samples, ref_images = reference
    found = {}
    for name, (samples, images) in others.items():
        notes = found.setdefault(name, [])
        pairs = near_duplicates(ref_images, images)
        same_ids = overlapping_patients(ref_samples, samples)
        if pairs:
            listing = "; ".join(f"{samples[j].path.name} = {ref_samples[i].path.name} ({sim:.4f})"
                                for i, j, sim in pairs[:5])
            copied = {j for _, j, _ in pairs}
            notes.append(f"warning: {len(copied)} {name} images are copies of {reference_name} images by content "
                         f"(re-encoded, resized or identical; {listing}{' ...' if len(pairs) > 5 else ''}); "
                         f"{name} results will be optimistic: remove the copies for an honest test")
        elif same_ids:
            notes.append(f"note: {len(same_ids)} patient ids appear in both {reference_name} and {name} (e.g. "
                         f"{', '.join(sorted(same_ids)[:3])}), but no {name} image matches a {reference_name} image "
                         "by content: ids are likely numbered per split (the official download does this), "
                         "so these are different patients")
    return found


def backbone_overlap(weights: Path, provenance: dict, sets: dict[str, Images | tuple[list[Sample], None]],
                     workers: int = 2) -> str | None:
    """A one-line refusal when a backbone pretrained by `cxr pretrain` saw images of a set that
    scores this run (its test split, an external set), by file digest (images.csv) or by content
    (thumbnails.npy, as `near_duplicates`); None when it saw none. A set given without decoded
    images is compared by digest only."""
    import numpy as np

    folder = Path(weights).parent
    try:
        seen = {row.split(",")[-1].strip() for row in (folder / "images.csv").read_text().splitlines()[1:]}
        thumbs = torch.from_numpy(np.load(folder / "thumbnails.npy")).float()
    except (OSError, ValueError) as e:
        return (f"{weights}: its pretraining's image list (images.csv, thumbnails.npy beside it) is unreadable "
                f"({type(e).__name__}), so cxr cannot check that it never saw this run's test images; restore "
                "them from the cxr pretrain output folder")
    for name, (samples, images) in sets.items():
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            same_file = [s.path for s, d in zip(samples, pool.map(lambda s: file_digest(s.path), samples)) if d in seen]
        copies = []
        if images is not None and len(thumbs):
            tb = torch.cat([thumbnails(x) for x in images]) if isinstance(images, list) else thumbnails(images)
            sim = tb @ thumbs.T
            copies = [samples[j].path for j in sorted(set((sim >= NEAR_DUPLICATE).nonzero()[:, 0].tolist()))]
        found = list(dict.fromkeys(same_file + copies))
        if found:
            return (f"{weights}: was pretrained on {len(found)} images of {name}, which scores this run (e.g. "
                    f"{', '.join(p.name for p in found[:3])}); pretrain without them (a folder layout's test/ is "
                    "left out by cxr pretrain; pass its train/ folder, not the scoring set)")
    return None

