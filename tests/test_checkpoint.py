import os
import pickle

import pytest
import torch

from cxr.config import make_config
from cxr.errors import CheckpointError
from cxr.files import atomic_write
from cxr.training.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from cxr.training.model import build_model


def saved_checkpoint(path, optimizer=True):
    torch.manual_seed(0)
    config = make_config("scratch", image_size=64, epochs=3)
    model = build_model(None)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr) if optimizer else None
    save_checkpoint(path, make_checkpoint(model, config, 2, {"val_loss": 0.25}, 0.25, opt))
    return model, config


def test_round_trip_with_weights_only(tmp_path):
    path = tmp_path / "best.pt"
    model, config = saved_checkpoint(path)
    raw = torch.load(path, weights_only=True)  # the contract: plain data, no code
    assert raw["classes"] == ["NORMAL", "PNEUMONIA"] and raw["epoch"] == 2
    assert raw["config"]["image_size"] == 64 and raw["threshold"] == 0.5
    rebuilt, rebuilt_config = model_from_checkpoint(load_checkpoint(path))
    assert rebuilt_config == config
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "best.pt"
    saved_checkpoint(path)
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_carrying_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "cxr-checkpoint-v1", "x": _Payload(str(marker))}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_plain_state_dict_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(build_model(None).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a cxr checkpoint"):
        load_checkpoint(path)


def test_other_class_order_is_refused(tmp_path):
    path = tmp_path / "best.pt"
    saved_checkpoint(path)
    ck = torch.load(path, weights_only=True)
    ck["classes"] = ["PNEUMONIA", "NORMAL"]
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="classes"):
        load_checkpoint(path)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def crash(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
