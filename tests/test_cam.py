import numpy as np
import pytest
import torch

from cxr.reporting.cam import CAM, GradCAM
from cxr.training.model import build_model


@pytest.fixture(params=[True, False], ids=["trainable", "frozen-backbone"])
def model_and_input(request):
    torch.manual_seed(0)
    model = build_model(None, train_backbone=request.param).eval()
    with torch.no_grad():  # a non-trivial head so the two classes differ clearly
        model.fc.weight.mul_(10)
    return model, torch.randn(3, 3, 96, 96)


def test_cam_is_fc_weights_over_layer4(model_and_input):
    model, x = model_and_input
    with torch.no_grad():
        a = model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))))
    expected = torch.einsum("c,nchw->nhw", model.fc.weight[1], a)
    with CAM(model) as cam:
        raw, probs = cam.raw(x, target=1)
    torch.testing.assert_close(raw, expected)
    torch.testing.assert_close(probs, torch.softmax(model(x), 1).detach())


@pytest.mark.parametrize("target", [0, 1, None])
def test_gradcam_equals_cam_up_to_scale(model_and_input, target):
    model, x = model_and_input
    with CAM(model) as cam:
        cam_raw, _ = cam.raw(x, target)
        cam_maps, cam_p = cam(x, target)
    with GradCAM(model) as gradcam:
        grad_raw, _ = gradcam.raw(x, target)
        grad_maps, grad_p = gradcam(x, target)
    h, w = cam_raw.shape[-2:]
    # global average pooling: d logit / d A = fc.weight / (H * W), so Grad-CAM = CAM / (H * W)
    torch.testing.assert_close(grad_raw * (h * w), cam_raw, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad_maps, cam_maps, atol=1e-4)
    np.testing.assert_allclose(grad_p, cam_p)
    assert cam_maps.shape == (3, 96, 96)
    assert cam_maps.min() >= 0 and cam_maps.max() <= 1 and np.allclose(cam_maps.max(axis=(1, 2)), 1)


def test_target_class_changes_the_map(model_and_input):
    model, x = model_and_input
    with CAM(model) as cam:
        normal, _ = cam.raw(x, 0)
        pneumonia, _ = cam.raw(x, 1)
    assert not torch.allclose(normal, pneumonia)


def test_hooks_are_removed_even_after_an_error(model_and_input):
    model, x = model_and_input
    with pytest.raises(ValueError):
        with GradCAM(model) as cam:
            cam(x)
            assert len(model.layer4._forward_hooks) == 1
            raise ValueError("boom")
    assert len(model.layer4._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="with"):
        CAM(model).raw(x)


def test_gallery_captions_state_the_threshold():
    from cxr.reporting.explain import _title

    row = {"path": "a/IM-0001-0001.jpeg", "true_label": "NORMAL", "predicted_label": "NORMAL",
           "prob_pneumonia": "0.887"}
    assert _title(row, 0.897).endswith("P(pneumonia) 0.887 < 0.897")
    assert _title(row, 0.5).endswith("P(pneumonia) 0.887 >= 0.500")
