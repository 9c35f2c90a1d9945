"""What a user reads for a broken input: a cut-short image, a random file given as a checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

from cxr.data.images import load_image
from cxr.errors import CheckpointError
from cxr.training.checkpoint import load_checkpoint

from .helpers import write_png


def test_a_truncated_image_says_it_is_cut_short(tmp_path):
    from cxr.data.images import DECODE_ERRORS, describe_error
    from PIL import Image

    Image.new("L", (64, 64), 120).save(tmp_path / "full.jpeg", quality=95)
    data = (tmp_path / "full.jpeg").read_bytes()
    (tmp_path / "cut.jpeg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DECODE_ERRORS) as e:
        load_image(tmp_path / "cut.jpeg", 32)
    assert "cut short" in describe_error(e.value) and "copy it again" in describe_error(e.value)


def test_random_bytes_as_a_checkpoint_read_as_a_corrupt_file_not_an_attack(tmp_path):
    (tmp_path / "random.pt").write_bytes(os.urandom(600))
    with pytest.raises(CheckpointError, match="not a checkpoint .*corrupt, truncated or another kind of file"):
        load_checkpoint(tmp_path / "random.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(tmp_path / "evil.pt")
    write_png(tmp_path / "x.png", 1)  # an image stays an image's message
    with pytest.raises(CheckpointError, match="is an image"):
        load_checkpoint(tmp_path / "x.png")
