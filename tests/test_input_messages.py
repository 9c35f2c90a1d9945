"""What a user reads for a broken input: a cut-short image, a random file given as a checkpoint."""

from __future__ import annotations

import os
import random
import warnings

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
    # many draws: torch.load fails on random bytes in several ways (UnpicklingError, IndexError,
    # KeyError, UnicodeDecodeError) and each must read the same, with no warning before it
    for seed in range(300):
        data = random.Random(seed).randbytes(600)
        if data[:1] in (b"\x80", b"P"):  # those two would start a pickle or a zip, the formats torch saves
            data = b"\x00" + data[1:]
        (tmp_path / "random.pt").write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(CheckpointError, match="random.pt: not a checkpoint .*corrupt, truncated or another"):
                load_checkpoint(tmp_path / "random.pt")
    (tmp_path / "odd.pt").write_bytes(b"\x80\xbf" + random.Random(0).randbytes(598))  # a pickle of no known protocol
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match="odd.pt: not a checkpoint"):
            load_checkpoint(tmp_path / "odd.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(tmp_path / "evil.pt")
    for seed in range(50):  # a pickle's first bytes, then garbage: a corrupt file, not a crafted one
        (tmp_path / "garbled.pt").write_bytes(b"\x80\x02" + random.Random(seed).randbytes(598))
        with pytest.raises(CheckpointError, match="garbled.pt: truncated or corrupted checkpoint"):
            load_checkpoint(tmp_path / "garbled.pt")
    torch.save({"weights": torch.zeros(1000)}, tmp_path / "whole.pt")  # a real saved file, cut short
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:1500])
    with pytest.raises(CheckpointError, match="cut.pt: truncated or corrupted checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    write_png(tmp_path / "x.png", 1)  # an image stays an image's message
    with pytest.raises(CheckpointError, match="is an image"):
        load_checkpoint(tmp_path / "x.png")
