"""`cxr predict --cam` draws each overlay at the input's own width and height: the model reads
every image squashed into a square, and the overlay stretches image and map back together."""

import numpy as np
import pytest
import torch
from PIL import Image

from cxr import load_model
from cxr.deploy.overlays import source_aspect, unsquash

from .helpers import make_run_dir, write_dicom


def test_the_aspect_of_each_kind_of_input(tmp_path):
    Image.new("L", (400, 200)).save(tmp_path / "wide.png")
    assert source_aspect(tmp_path / "wide.png") == 2.0
    assert source_aspect(Image.new("L", (100, 300))) == pytest.approx(1 / 3)
    assert source_aspect(np.zeros((50, 150), np.uint8)) == 3.0  # (H, W)
    assert source_aspect(np.zeros((50, 150, 3), np.uint8)) == 3.0  # (H, W, C)
    assert source_aspect(torch.zeros(3, 50, 150)) == 3.0  # (C, H, W)
    assert source_aspect(tmp_path / "missing.png") == 1.0  # cannot be told: square, as the model read it


def test_a_dicom_aspect_comes_from_its_header(tmp_path):
    write_dicom(tmp_path / "scan.dcm", np.zeros((60, 120), np.uint8))
    assert source_aspect(tmp_path / "scan.dcm") == 2.0


def test_unsquash_keeps_the_shorter_side_and_moves_the_map_with_the_image():
    image = np.zeros((64, 64), np.uint8)
    image[:, :32] = 200  # left half bright
    cam = np.zeros((64, 64), np.float32)
    cam[:, :32] = 1.0  # and hot
    wide, wide_cam = unsquash(image, cam, 2.0)
    assert wide.shape == wide_cam.shape == (64, 128)
    assert wide[:, :60].min() > 150 and wide_cam[:, :60].min() > 0.9 and wide_cam[:, 70:].max() < 0.1
    tall, _ = unsquash(image, cam, 0.5)
    assert tall.shape == (128, 64)
    same, same_cam = unsquash(image, cam, 1.0)
    assert same is image and same_cam is cam


def test_predict_draws_the_overlay_at_the_file_s_shape(tmp_path, monkeypatch):
    run = make_run_dir(tmp_path / "run", threshold=0.5)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 400), np.uint8)).save(tmp_path / "wide.png")
    drawn = []
    monkeypatch.setattr("cxr.reporting.plots.plot_cam_pairs", lambda images, maps, *a, **k: drawn.append(
        (images.shape, maps.shape)))
    records = load_model(run / "best.pt").predict([tmp_path / "wide.png"], cam_dir=tmp_path / "cams")
    assert records[0]["error"] is None and records[0]["cam_file"].endswith("wide.png.cam.png")
    (images_shape, maps_shape), = drawn
    assert images_shape == maps_shape and images_shape[2] == 2 * images_shape[1]  # 2:1 as the file
