"""One visible configuration: the study's hyper-parameters as defaults, and the task presets.

A task is a named preset (how the model is initialised and what trains) plus the shared
training settings. Command-line flags override fields; nothing else changes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

CLASSES = ("NORMAL", "PNEUMONIA")  # class index = position; P(PNEUMONIA) is what we report


@dataclass(frozen=True)
class TaskConfig:
    task: str = "scratch"       # preset name; also the run folder's name
    pretrained: bool = False    # start from torchvision's ImageNet ResNet-18 weights
    train_backbone: bool = True  # False: only `fc` trains; the backbone is frozen, in eval mode
    lr: float = 1e-3            # Adam learning rate (study: 1e-3 from scratch, 1e-4 fine-tuning)
    batch_size: int = 32        # study's batch size
    epochs: int = 10            # study's epoch count
    image_size: int = 224       # square input side; images are squashed like Resize((s, s))
    val_ratio: float = 0.1      # share of train patients held out for validation (by patient)
    seed: int = 0               # one seed for the split, the init and the batch order
    limit: int | None = None    # at most this many images per class in each split (quick trials)
    class_weights: str = "none"  # "balanced": loss weighted by inverse class frequency of train
    target_sensitivity: float | None = None  # operating point on validation: None = threshold_rule
    threshold_rule: str = "youden"  # "youden": maximise J on validation; "0.5": the model's own decision
    # (argmax), for a model trained class-balanced: on a near-separable validation split Youden's J is
    # flat over a wide gap and the threshold it lands on swings with a few images (README, Results)
    calibrate: bool = False     # fit a softmax temperature on validation (stored in the checkpoint)
    # The robust recipe's knobs (issue: shift robustness); off by default, as in the study.
    augment: str = "none"       # "light" | "strong": on-device intensity/geometry/noise (augment.py)
    intensity: str = "none"     # "equalize" | "standardize": per-image normalisation (preprocess.py)
    label_smoothing: float = 0.0  # soft targets: discourages over-confident logits
    optimizer: str = "adam"     # "adamw": Adam with decoupled weight decay
    weight_decay: float = 0.0   # with adamw
    schedule: str = "constant"  # "cosine": cosine decay per step after a linear warm-up
    warmup_epochs: int = 0      # linear warm-up length, with the cosine schedule
    select_by: str = "val_loss"  # "val_auc": the highest validation ROC AUC; "last": the last epoch
    patience: int | None = None  # stop after this many epochs without a better selection metric
    site_weights: tuple | None = None  # several training sources (sites.py): ((site, share), ...) multiplying each
    #                                    site's equal share of the loss; None: one source, or equal shares
    labels: str = "pneumonia"   # the question (labels.py): "pneumonia" (the study's), "subtype" (bacterial vs
    #                             viral, pneumonia images only) or "three-way" (normal / bacterial / viral)
    classes: str | None = None  # with a CSV manifest as --data: its label names mapped onto CLASSES ("a=NORMAL,b=PNEUMONIA")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["site_weights"] is None:  # one training source: the study's keys, as they always were
            del d["site_weights"]
        return d


# The recipe that holds up on the official test distribution, chosen by experiment
# (benchmarks/generalisation_study.py; README, Results): each image histogram-equalised, then
# augmented (random crops of 35-100% of the area so framing cannot tell the class, tilt, exposure
# and contrast), the loss class-balanced and the decision the model's own (threshold 0.5: Youden's J
# on a near-separable validation split lands almost anywhere), label smoothing, AdamW with a cosine
# schedule over 20 epochs (crops of 35-100% are a hard task: 20 epochs beat 10 on the official half,
# README, Results), and the last epoch kept (the schedule anneals to zero; selection on a saturated
# validation split is noise).
_ROBUST = dict(augment="frame", intensity="equalize", class_weights="balanced", threshold_rule="0.5",
               label_smoothing=0.1, optimizer="adamw", weight_decay=0.05, schedule="cosine", warmup_epochs=1,
               epochs=20, select_by="last")

# The study's two tasks. Their settings are the defaults above; improvements belong in new presets.
PRESETS: dict[str, dict] = {
    "scratch": dict(pretrained=False, train_backbone=True, lr=1e-3),
    "finetune": dict(pretrained=True, train_backbone=False, lr=1e-4),
    # Beyond the study: ImageNet init, every layer trains (published results on this data set put
    # full fine-tuning well ahead of a frozen backbone).
    "finetune-full": dict(pretrained=True, train_backbone=True, lr=1e-4),
    # Robust recipes: made to hold up under acquisition shifts (different machines and sites),
    # chosen on validation and on the shift benchmark run on validation (see the README).
    "scratch-robust": dict(pretrained=False, train_backbone=True, lr=1e-3, **_ROBUST),
    "finetune-full-robust": dict(pretrained=True, train_backbone=True, lr=1e-4, **_ROBUST),
}


# Where a preset's recipe was chosen, so every report that shows its numbers can say so.
_HALF = ("official_test_half (half of the official test split, by patient): recipes were compared on it "
         "(README, Results), so numbers on that set are optimistic for this one")
RECIPE_CHOSEN_ON: dict[str, str] = {"scratch-robust": _HALF, "finetune-full-robust": _HALF}

# `cxr adapt --finetune`: supervised fine-tuning at a site (finetune.py); chosen and measured in the
# README (Fitting a model to another site).
TRAIN_CHOICES = ("fc", "last", "all")


@dataclass(frozen=True)
class FinetuneSpec:
    train: str = "all"          # what trains: fc (the head), last (layer4 + head), all
    epochs: int = 20            # over the site's training images; 5-fold at nih_half: 10 epochs at 1e-4 still
    #                             rose at the end (67.8% / AUC 0.730), 20 at 3e-4 did best (72.5% / 0.780)
    lr: float = 3e-4            # AdamW; 1e-3 learnt the site no better (0.747) and kept less of the first (README)
    weight_decay: float = 0.05  # the robust presets' value
    batch_size: int = 32        # the study's
    replay: float = 0.5         # share of every batch drawn from the source run's training images (0: none)
    val_ratio: float = 0.2      # share of the site's patients held out to choose the epoch and threshold
    l2sp: float = 0.0           # L2-SP (Li et al. 2018): loss + l2sp/2 * ||w - w_source||^2 instead of weight decay
    wise: bool = False          # WiSE-FT (Wortsman et al. 2022): mix source and fine-tuned weights, the
    #                             coefficient chosen on validation of both sites, batch norm re-estimated
    wise_alpha: float | None = None  # WiSE-FT at this fixed coefficient instead (the paper's default is 0.5):
    #                             for when no validation set shows the forgetting (the source's is saturated)
    lp_epochs: int = 0          # LP-FT (Kumar et al. 2022): this many head-only epochs first, then `train`
    soup: int = 1               # a uniform model soup (Wortsman et al. 2022): this many fine-tunes from the
    #                             source (seeds apart), their weights averaged, batch norm re-estimated

    def __post_init__(self):
        if self.train not in TRAIN_CHOICES:
            raise ValueError(f"train must be one of {', '.join(TRAIN_CHOICES)}, got {self.train!r}")
        if not 0 <= self.replay < 1:
            raise ValueError(f"replay must be in [0, 1), got {self.replay}")
        if not (self.l2sp >= 0 and self.l2sp < float("inf")):
            raise ValueError(f"l2sp must be a finite number >= 0, got {self.l2sp}")
        if not 0 <= self.lp_epochs < self.epochs:
            raise ValueError(f"lp_epochs must be at least 0 and below epochs ({self.epochs}), got {self.lp_epochs}")
        if self.wise_alpha is not None and not (self.wise and 0 <= self.wise_alpha <= 1):
            raise ValueError(f"wise_alpha goes with wise and lies in [0, 1], got {self.wise_alpha!r}")
        if not (isinstance(self.soup, int) and self.soup >= 1):
            raise ValueError(f"soup must be a whole number of fine-tunes >= 1, got {self.soup!r}")

    @property
    def name(self) -> str:
        return (f"finetune-{self.train}" + (f"+replay{self.replay:g}" if self.replay else "")
                + (f"+l2sp{self.l2sp:g}" if self.l2sp else "") + (f"+lp{self.lp_epochs}" if self.lp_epochs else "")
                + (f"+soup{self.soup}" if self.soup > 1 else "") + (("+wise" + (f"{self.wise_alpha:g}" if self.wise_alpha is not None else "")) if self.wise else ""))

    def to_dict(self) -> dict:
        return asdict(self)


# On-device augmentation presets (augment.py applies them; here so that --help needs no torch).
AUGMENT_PRESETS: dict[str, dict | None] = {
    "none": None,
    "light": dict(p=0.5, brightness=0.08, contrast=(0.8, 1.2), gamma=(0.8, 1.25), rotate=5.0,
                  zoom=(0.9, 1.1), noise=0.0, blur=0.0),
    "strong": dict(p=0.8, brightness=0.2, contrast=(0.6, 1.4), gamma=(0.6, 1.6), rotate=10.0,
                   zoom=(0.8, 1.2), noise=8.0, blur=1.5),
    # Every image: a random resized crop (area 70-100%, aspect 0.85-1.15), a tilt of up to 10
    # degrees, exposure x0.7-1.3 and contrast x0.7-1.3 about the image mean (ColorJitter's 0.3).
    "crop": dict(p=1.0, exposure=(0.7, 1.3), contrast=(0.7, 1.3), rotate=10.0,
                 crop_area=(0.7, 1.0), crop_aspect=(0.85, 1.15), noise=0.0, blur=0.0),
    # The same with framing varied much more (area 35-100%, aspect 0.75-1.33): in the training
    # images NORMAL radiographs are framed wider (neck, shoulders, black surround) than PNEUMONIA
    # ones, and in the official test split they are not, so the field of view must not decide.
    "frame": dict(p=1.0, exposure=(0.7, 1.3), contrast=(0.7, 1.3), rotate=10.0,
                  crop_area=(0.35, 1.0), crop_aspect=(0.75, 1.33), noise=0.0, blur=0.0),
}

# `cxr pretrain`'s two views of each radiograph (pretrain.py draws them with augment.py): a random
# resized crop of 35-100% of the area (the robust presets' framing), a tilt of up to 10 degrees,
# exposure and contrast x0.6-1.4, gamma 0.7-1.4, detector blur (one sigma of 0.1-1 px per batch) and mild noise.
# No flips (a mirrored chest is not a chest: the heart sits on the other side) and no colour jitter
# (the images are grey).
AUGMENT_PRESETS["views"] = dict(p=1.0, exposure=(0.6, 1.4), contrast=(0.6, 1.4), gamma=(0.7, 1.4), rotate=10.0,
                                crop_area=(0.35, 1.0), crop_aspect=(0.75, 1.33), noise=4.0, blur=1.0)

PRETRAIN_METHODS = ("simclr", "byol")


@dataclass(frozen=True)
class PretrainSpec:
    """Self-supervised pretraining (`cxr pretrain`, pretrain.py)."""

    method: str = "simclr"      # SimCLR (Chen et al. 2020) or BYOL (Grill et al. 2020): pretrain.py
    epochs: int = 20
    batch_size: int = 64        # images per step (two views each)
    lr: float = 1e-3            # AdamW, cosine decay per step after one epoch of linear warm-up
    weight_decay: float = 1e-4
    image_size: int = 128
    intensity: str = "equalize"  # as the robust presets see images (preprocess.py); the run that uses the
    #                              backbone is told when its task normalises otherwise
    temperature: float = 0.2    # SimCLR's NT-Xent temperature (MoCo v2's and MoCo-CXR's value)
    momentum: float = 0.99      # BYOL's target network: from this to 1 over training (cosine)
    seed: int = 0

    def __post_init__(self):
        if self.method not in PRETRAIN_METHODS:
            raise ValueError(f"method must be one of {', '.join(PRETRAIN_METHODS)}, got {self.method!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# `--quick`: a CPU-sized run of any task (smaller images, fewer epochs); its measured cost against
# the full settings is in the README (Results, "--quick").
QUICK = dict(image_size=128, epochs=5)

# `cxr demo`: the study's epochs on the bundled sample at a smaller image size, so a first report takes
# about 35 s on 2 CPU cores (docs/speed.md); on the sample's 100 test images 160 px scored as 224 px did
# (docs/getting-started.md). `cxr demo --image-size 224` trains at the study's size.
DEMO_IMAGE_SIZE = 160

STUDY_TASKS = ("scratch", "finetune")  # what `cxr run` trains unless --tasks says otherwise


def make_config(task: str, **overrides) -> TaskConfig:
    """The preset `task` with every override that is not None applied on top."""
    if task not in PRESETS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(PRESETS)}")
    known = {f.name for f in fields(TaskConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown config fields: {sorted(unknown)}")
    chosen = {k: v for k, v in overrides.items() if v is not None}
    return replace(TaskConfig(task=task, **PRESETS[task]), **chosen)


def config_from_dict(d: dict) -> TaskConfig:
    known = {f.name for f in fields(TaskConfig)}
    values = {k: v for k, v in d.items() if k in known}
    if values.get("site_weights") is not None:  # JSON lists back to the frozen config's tuples
        values["site_weights"] = tuple(tuple(pair) for pair in values["site_weights"])
    return TaskConfig(**values)
