"""Checkpoints written before the package was split into subpackages still load.

`OLD` is every entry but the weights of a best.pt made by the flat layout (commit 97a7c31:
`make_checkpoint(build_model(None), make_config("scratch"), 3, ...)` with a threshold and a
temperature chosen, dumped with json). The weights are torchvision's ResNet-18 with a 2-way `fc`,
the same keys the old `model.build_model` gave. Checkpoints are plain dicts, so no module path is
stored in them; this test keeps it that way."""

import copy

import numpy as np
import torch
import torchvision

from cxr import load_model
from cxr.training.checkpoint import load_checkpoint

OLD = {
    "best_val_loss": 0.31, "classes": ["NORMAL", "PNEUMONIA"],
    "config": {"augment": "none", "batch_size": 32, "calibrate": False, "class_weights": "none", "classes": None,
               "epochs": 10, "image_size": 224, "intensity": "none", "label_smoothing": 0.0, "labels": "pneumonia",
               "limit": None, "lr": 0.001, "optimizer": "adam", "patience": None, "pretrained": False,
               "schedule": "constant", "seed": 0, "select_by": "val_loss", "target_sensitivity": None,
               "task": "scratch", "threshold_rule": "youden", "train_backbone": True, "val_ratio": 0.1,
               "warmup_epochs": 0, "weight_decay": 0.0},
    "epoch": 3, "format": "cxr-checkpoint-v1", "metrics": {"val_auc": 0.95, "val_loss": 0.31}, "optimizer": None,
    "temperature": 1.3, "threshold": 0.42,
    "versions": {"cxr": "0.1.0", "torch": "2.14.1+cu130", "torchvision": "0.29.1+cu130"},
}


def test_a_checkpoint_of_the_flat_layout_loads_and_predicts(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=2).eval()
    ck = copy.deepcopy(OLD) | {"model": net.state_dict()}
    path = tmp_path / "best.pt"
    torch.save(ck, path)

    loaded = load_checkpoint(path)
    assert loaded["config"] == OLD["config"] and loaded["threshold"] == 0.42
    model = load_model(path)
    assert (model.task, model.threshold, model.temperature, model.image_size) == ("scratch", 0.42, 1.3, 224)
    for name, tensor in net.state_dict().items():
        assert torch.equal(model.net.state_dict()[name], tensor), name

    image = (np.random.default_rng(0).random((224, 224)) * 255).astype(np.uint8)
    record = model.predict(image)[0]
    assert record["error"] is None
    # the same network by hand: grey to 3 channels, ImageNet normalisation, temperature, softmax
    x = torch.from_numpy(image).float().div(255).expand(1, 3, 224, 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        p = torch.softmax(net((x - mean) / std) / 1.3, 1)[0, 1].item()
    assert abs(record["prob_pneumonia"] - p) < 1e-4
    assert record["label"] == ("PNEUMONIA" if record["prob_pneumonia"] >= 0.42 else "NORMAL")
