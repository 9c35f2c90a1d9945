"""The GPU-oriented training options, exercised on the CPU: bf16 autocast, torch.compile, staging."""

import pytest
import torch

from cxr.config import make_config
from cxr.errors import CxrError
from cxr.training import machine
from cxr.training.accel import (
    fits_on_device,
    precision_choice,
    resolve_precision,
    stage,
    to_device,
)
from cxr.training.checkpoint import load_checkpoint
from cxr.training.engine import fit, run_epoch, seed_everything
from cxr.training.model import build_model
from cxr.training.preprocess import normalize

from .helpers import fake_images


def test_precision_choice(monkeypatch):
    measured = {}
    monkeypatch.setattr(machine, "measured_cpu_precision", lambda: measured["answer"])
    for answer in ("fp32", "bf16"):  # "auto" on a CPU is what the measurement says
        measured["answer"] = (answer, "measured")
        assert resolve_precision("auto", "cpu") == answer
        assert precision_choice("auto", "cpu") == (answer, "measured")
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert "--precision" in precision_choice("fp32", "cpu")[1]
    with pytest.raises(CxrError, match="unknown precision"):
        resolve_precision("fp16", "cpu")


def test_data_stays_on_the_device_only_when_it_leaves_room():
    assert fits_on_device(262_000_000, 80_000_000_000)
    assert fits_on_device(40, 80) and not fits_on_device(41, 80)


def test_cpu_staging_moves_nothing():
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    assert stage(x, "cpu") is x and to_device(x, "cpu") is x


def test_cuda_staging_keeps_a_split_on_the_host_when_it_would_crowd_the_device(monkeypatch):
    """The memory query of the CUDA branch, without a GPU: a split larger than half the free
    memory is left where it is (batches then go through pinned copies)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (1000, 10_000))
    x = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)  # 1,024 bytes > half of 1,000 free
    assert stage(x, "cuda:0") is x and asked == [torch.device("cuda:0")]


def test_channels_last_changes_nothing_but_the_layout():
    torch.manual_seed(0)
    model = build_model(None).eval()
    x = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        plain = model(normalize(x, "cpu").contiguous())
        last = model.to(memory_format=torch.channels_last)(normalize(x, "cpu").contiguous(memory_format=torch.channels_last))
    assert normalize(x, "cpu").is_contiguous(memory_format=torch.channels_last)  # what cxr feeds on the CPU
    torch.testing.assert_close(last, plain, rtol=1e-4, atol=1e-4)


def train(tmp_path, precision="fp32", compile_model=False, epochs=2, batch_size=8):
    config = make_config("scratch", epochs=epochs, batch_size=batch_size, image_size=32, seed=5)
    seed_everything(config.seed)
    model = build_model(None)
    dtypes = set()
    model.conv1.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    (xt, yt), (xv, yv) = fake_images(32, size=32, seed=1), fake_images(16, size=32, seed=2)
    history = fit(model, config, xt, yt, xv, yv, tmp_path, "cpu", log=lambda s: None,
                  precision=precision, compile_model=compile_model)
    return history, dtypes, model


@pytest.mark.slow
def test_bf16_autocast_runs_convolutions_in_bf16_and_keeps_weights_fp32(tmp_path):
    fp32, fp32_types, _ = train(tmp_path / "fp32", epochs=1)
    bf16, bf16_types, model = train(tmp_path / "bf16", "bf16", epochs=1)
    assert fp32_types == {torch.float32} and bf16_types == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights and optimiser stay fp32
    best = load_checkpoint(tmp_path / "bf16" / "best.pt")
    assert all(v.dtype != torch.bfloat16 for v in best["model"].values())
    # What bf16 computes is compared image by image in the next test: a few training steps amplify
    # rounding chaotically, so only the outcome is compared here (it catches a bf16 run that fails
    # to learn these easy images, nothing finer).
    assert bf16[0]["val_acc"] == fp32[0]["val_acc"]


def test_bf16_pass_computes_what_fp32_computes():
    """Image by image: an untrained network gives every image nearly the same logits, so a mean
    loss would agree even if bf16 scrambled what tells images apart; the margins about their mean
    must agree instead."""
    from cxr.training.accel import autocast

    seed_everything(0)
    model = build_model(None).eval()
    images, labels = fake_images(32, size=64, seed=3)
    with torch.no_grad():
        fp32 = model(normalize(images, "cpu"))
        with autocast("cpu", "bf16"):
            bf16 = model(normalize(images, "cpu"))
    assert bf16.dtype == torch.bfloat16
    margin32 = fp32[:, 1] - fp32[:, 0]
    margin16 = bf16.float()[:, 1] - bf16.float()[:, 0]
    spread32, spread16 = margin32 - margin32.mean(), margin16 - margin16.mean()
    assert float((spread16 - spread32).abs().max()) < 0.1 * float(spread32.std())
    assert float(torch.corrcoef(torch.stack([spread16, spread32]))[0, 1]) > 0.99
    # and through run_epoch, as training's validation pass runs it
    forward = lambda x: model(normalize(x, "cpu"))  # noqa: E731
    a = run_epoch(forward, images, labels, 8, "cpu", precision="fp32")
    b = run_epoch(forward, images, labels, 8, "cpu", precision="bf16")
    assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    # One step (batch = the 32 training images): the train loss is the first forward pass, exact up
    # to the compiler's reordering of sums; the validation pass follows one Adam step, whose
    # sign-like first update amplifies that reordering a little. Longer runs drift apart the way
    # any two float orders do, so they are not compared.
    from torch._dynamo.utils import counters

    eager, _, _ = train(tmp_path / "eager", epochs=1, batch_size=32)
    counters.clear()
    fast, _, model = train(tmp_path / "compiled", compile_model=True, epochs=1, batch_size=32)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo compiled the model: the compiled module ran
    assert fast[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=1e-4)
    assert fast[0]["val_loss"] == pytest.approx(eager[0]["val_loss"], rel=1e-3)
    assert fast[0]["val_acc"] == eager[0]["val_acc"]
    best = load_checkpoint(tmp_path / "compiled" / "best.pt")
    assert set(best["model"]) == set(build_model(None).state_dict())  # no "_orig_mod." prefixes


def test_cuda_batches_are_pinned_then_copied_without_blocking(monkeypatch):
    """No GPU here: the two tensor methods the CUDA branch calls are recorded instead of run."""
    calls = []
    real_to = torch.Tensor.to

    def pin_memory(self):
        calls.append("pin_memory")
        return self

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], (str, torch.device)) and torch.device(args[0]).type == "cuda":
            calls.append(("to", str(args[0]), kwargs.get("non_blocking", False)))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    to_device(torch.zeros(2, dtype=torch.uint8), "cuda:0")
    assert calls == ["pin_memory", ("to", "cuda:0", True)]
    calls.clear()
    x = torch.zeros(2)
    assert to_device(x, "cpu") is x and calls == []  # on the CPU nothing is copied


@pytest.mark.parametrize("deterministic", [False, True])
def test_cudnn_autotuning_on_cuda_unless_deterministic(monkeypatch, deterministic):
    """`_run_options` turns cuDNN's benchmark mode on for CUDA runs (fixed input sizes), off with
    --deterministic; a CUDA device is pretended (nothing runs on it)."""
    from cxr.cli import build_parser
    from cxr.commands.options import run_options as _run_options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: None)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", deterministic)  # the opposite of what is expected
    argv = ["train", "--data", "d", "--out", "o", "--device", "cuda"] + (["--deterministic"] if deterministic else [])
    options = _run_options(build_parser().parse_args(argv))
    assert options.device == torch.device("cuda") and options.precision == "bf16"
    assert torch.backends.cudnn.benchmark is (not deterministic)
