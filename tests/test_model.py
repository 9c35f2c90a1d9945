import urllib.error

import pytest
import torch
from torchvision.models import ResNet18_Weights, resnet18, resnet34

from cxr.errors import WeightsError
from cxr.training.model import (
    backbone,
    build_model,
    imagenet_state_dict,
    set_train_mode,
)


def test_scratch_model_has_two_way_head_and_trains_everything():
    model = build_model(None, train_backbone=True)
    assert model.fc.out_features == 2 and model.fc.in_features == 512
    assert all(p.requires_grad for p in model.parameters())


def test_finetune_freezes_everything_but_fc(weights_file):
    model = build_model(imagenet_state_dict(weights_file), train_backbone=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    set_train_mode(model, train_backbone=False)
    assert not model.bn1.training and not model.layer4[1].bn2.training and model.fc.training


def test_weights_file_is_loaded_into_the_backbone(weights_file):
    saved = torch.load(weights_file, weights_only=True)
    model = build_model(imagenet_state_dict(weights_file), train_backbone=False)
    state = model.state_dict()
    for key in ("conv1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight"):
        torch.testing.assert_close(state[key], saved[key])
    assert state["fc.weight"].shape == (2, 512)


def test_backbone_and_fc_compose_to_the_model():
    model = build_model(None).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.fc(backbone(model)(x)), model(x))


def test_wrong_architecture_is_refused_with_the_file_name(tmp_path):
    path = tmp_path / "resnet34.pt"
    torch.save(resnet34().state_dict(), path)
    with pytest.raises(WeightsError, match="not ResNet-18 weights") as e:
        build_model(imagenet_state_dict(path), source=str(path))
    assert str(path) in str(e.value)


def test_wrong_shape_is_refused(tmp_path):
    state = resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="conv1.weight has shape"):
        build_model(imagenet_state_dict(path), source=str(path))


@pytest.mark.parametrize("content", [b"", b"hello", None])
def test_non_state_dict_files_are_refused(tmp_path, content):
    path = tmp_path / "w.pt"
    if content is None:
        torch.save({"model": resnet18().state_dict(), "epoch": 3}, path)  # a checkpoint, not a state dict
    else:
        path.write_bytes(content)
    with pytest.raises(WeightsError) as e:
        imagenet_state_dict(path)
    assert str(path) in str(e.value)


def test_missing_weights_file():
    with pytest.raises(WeightsError, match="not found"):
        imagenet_state_dict("/nonexistent/resnet18.pt")


def test_torchvision_cache_is_the_online_path(tmp_path, monkeypatch):
    """Without --weights, the weights come through torchvision's enum and its hub cache."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    torch.manual_seed(5)
    expected = resnet18().state_dict()
    name = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    (tmp_path / "checkpoints").mkdir()
    torch.save(expected, tmp_path / "checkpoints" / name)
    state = imagenet_state_dict(None)
    torch.testing.assert_close(state["conv1.weight"], expected["conv1.weight"])


def _offline(*args, **kwargs):
    raise urllib.error.URLError("Name or service not known")


def test_offline_without_weights_says_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    with pytest.raises(WeightsError) as e:
        imagenet_state_dict(None)
    msg = str(e.value)
    assert "--weights PATH" in msg and "internet" in msg and str(tmp_path) in msg


def test_offline_the_error_is_all_that_is_said(tmp_path, monkeypatch, capsys):
    """torch.hub printed "Downloading: https://...resnet18..." before finding it was offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    with pytest.raises(WeightsError, match="--weights PATH"):
        imagenet_state_dict(None)
    said = capsys.readouterr()
    assert said.out == "" and said.err == ""


def test_a_download_that_succeeds_still_says_where_it_went(tmp_path, monkeypatch, capsys):
    """Online, the weights still come through torchvision's own download, and its line is shown."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(6)
    expected = resnet18().state_dict()
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, *a, **k: torch.save(expected, dst))
    state = imagenet_state_dict(None)
    torch.testing.assert_close(state["conv1.weight"], expected["conv1.weight"])
    said = capsys.readouterr().out
    assert "Downloading" in said and ResNet18_Weights.IMAGENET1K_V1.url in said and str(tmp_path) in said
