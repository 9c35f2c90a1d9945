"""`cxr pretrain`: self-supervised pretraining on unlabelled X-rays, a backbone every finetune* preset
loads, resume after SIGKILL on the same loss curve, the refusal to score images the pretraining saw,
and views that stay in range and differ between the two branches."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from cxr.cli import main
from cxr.config import PRESETS, PretrainSpec, make_config
from cxr.data.folders import SAMPLE_ROOT
from cxr.files import read_csv

pytest.importorskip("lightly")

TINY = ["--image-size", "32", "--batch-size", "16", "--precision", "fp32", "--no-cache", "--workers", "2"]


def pretrain(*args) -> int:
    return main(["pretrain", *map(str, args), *TINY])


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "pt"
    assert pretrain("--data", "sample", "--out", out, "--epochs", "2", "--keep-every", "1") == 0
    return out


@pytest.mark.slow
def test_pretraining_writes_a_backbone_with_its_provenance(backbone_dir):
    state = torch.load(backbone_dir / "backbone.pt", weights_only=True)
    from torchvision.models import resnet18

    expected = {k for k in resnet18().state_dict() if not k.startswith("fc.")}
    assert set(state) == expected  # a torchvision resnet18 state dict without fc
    prov = json.loads((backbone_dir / "provenance.json").read_text())
    assert prov["method"] == "simclr" and prov["epochs_done"] == 2 and prov["spec"]["seed"] == 0
    train_images = sorted((SAMPLE_ROOT / "train").rglob("*.jpeg"))
    assert prov["images"] == len(train_images) == len(read_csv(backbone_dir / "images.csv"))
    assert prov["sources"][0]["data"] == str(SAMPLE_ROOT.resolve()) and len(prov["sources"][0]["digest"]) == 64
    listed = {Path(r["path"]).parent.parent.name for r in read_csv(backbone_dir / "images.csv")}
    assert listed == {"train"}  # the sample's test/ is left out
    history = read_csv(backbone_dir / "history.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2] and all(float(r["loss"]) > 0 for r in history)
    # the snapshot of the last epoch is the backbone itself; the first differs (it trained on)
    last, first = (torch.load(backbone_dir / f"backbone_epoch{e}.pt", weights_only=True) for e in (2, 1))
    assert all(torch.equal(last[k], state[k]) for k in state)
    assert not torch.equal(first["conv1.weight"], state["conv1.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("task", [t for t, p in PRESETS.items() if p["pretrained"]])
def test_every_finetune_preset_loads_the_backbone(backbone_dir, task):
    from cxr.starting_weights import pretrained_weights
    from cxr.training.model import build_model

    config = make_config(task)
    state = pretrained_weights([config], backbone_dir / "backbone.pt")
    model = build_model(state, config.train_backbone)
    saved = torch.load(backbone_dir / "backbone.pt", weights_only=True)
    for name, tensor in model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(tensor, saved[name]), name


@pytest.mark.slow
def test_a_run_from_the_backbone_names_its_provenance(backbone_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--data", "sample", "--tasks", "finetune", "--weights", str(backbone_dir / "backbone.pt"),
                 "--image-size", "32", "--epochs", "1", "--out", str(out), "--no-cache", "--n", "2"])
    assert code == 0
    said = capsys.readouterr().out
    assert "intensity 'none'" in said and "--intensity equalize" in said  # the preset normalises otherwise
    config = json.loads((out / "finetune" / "config.json").read_text())
    assert config["backbone"]["method"] == "simclr" and config["backbone"]["epochs"] == 2
    report = (out / "report.md").read_text()
    assert "backbone pretrained self-supervised (simclr, 2 epochs at 32 px" in report
    import cxr

    card = cxr.load_model(out / "finetune" / "best.pt").describe_operating_point()
    assert "on 200 unlabelled images" in card and prov_digest(backbone_dir)[:12] in card
    # scoring the run later on a set its backbone's pretraining saw is refused too (cxr evaluate, as cxr adapt's
    # sets of the first site): one line naming the set, and no metrics written
    ext = tmp_path / "ext"
    for name in ("NORMAL", "PNEUMONIA"):
        (ext / name).mkdir(parents=True)
        for f in sorted((SAMPLE_ROOT / "test" / name).glob("*.jpeg"))[:3]:
            shutil.copy(f, ext / name / f.name)
    seen = sorted((SAMPLE_ROOT / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    shutil.copy(seen, ext / "PNEUMONIA" / seen.name)
    capsys.readouterr()
    code = main(["evaluate", str(out / "finetune"), "--name", "ext", "--data", str(ext), "--no-cache"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "was pretrained on 1 images of external set ext" in err and seen.name in err
    assert not (out / "finetune" / "metrics_ext.json").exists()
    (ext / "PNEUMONIA" / seen.name).unlink()
    assert main(["evaluate", str(out / "finetune"), "--name", "ext", "--data", str(ext), "--no-cache"]) == 0
    assert (out / "finetune" / "metrics_ext.json").is_file()


def test_a_backbone_that_is_not_here_cannot_be_checked_and_says_so(tmp_path):
    from cxr.data.unlabelled import refuse_seen_by_recorded_backbone

    said = []
    refuse_seen_by_recorded_backbone({"backbone": {"file": str(tmp_path / "moved" / "backbone.pt")}}, {}, log=said.append)
    assert len(said) == 1 and "is not here, so no check" in said[0] and "moved" in said[0]
    refuse_seen_by_recorded_backbone({}, {}, log=said.append)  # no backbone recorded: nothing to check or say
    assert len(said) == 1


def prov_digest(folder: Path) -> str:
    return json.loads((folder / "provenance.json").read_text())["sources"][0]["digest"]


@pytest.mark.slow
def test_a_backbone_that_saw_the_test_split_is_refused(tmp_path, capsys):
    seen = tmp_path / "seen"
    shutil.copytree(SAMPLE_ROOT / "train" / "NORMAL", seen / "a")
    # one test image, re-encoded and resized: a copy by content, not by file
    test_image = sorted((SAMPLE_ROOT / "test" / "PNEUMONIA").glob("*.jpeg"))[3]
    Image.open(test_image).convert("L").resize((300, 260)).save(seen / "a" / "copy.png")
    assert pretrain("--data", seen, "--out", tmp_path / "pt", "--epochs", "1") == 0
    capsys.readouterr()
    out = tmp_path / "run"
    code = main(["run", "--data", "sample", "--tasks", "finetune", "--weights", str(tmp_path / "pt" / "backbone.pt"),
                 "--image-size", "32", "--epochs", "1", "--out", str(out), "--no-cache"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "was pretrained on 1 images of the test split" in err and test_image.name in err
    assert not (out / "finetune").exists()  # refused before anything trains or is written


@pytest.mark.slow
def test_a_backbone_that_saw_an_external_set_is_refused_by_file(tmp_path, capsys):
    seen = tmp_path / "seen"
    shutil.copytree(SAMPLE_ROOT / "train" / "NORMAL", seen / "a")
    shutil.copy(sorted((SAMPLE_ROOT / "test" / "NORMAL").glob("*.jpeg"))[0], seen / "a" / "same.jpeg")
    external = tmp_path / "external"
    shutil.copytree(SAMPLE_ROOT / "test", external)
    assert pretrain("--data", seen, "--out", tmp_path / "pt", "--epochs", "1") == 0
    # the sample's own test split is clean here: only the external set holds the seen image
    from cxr.data.dataset import Sample
    from cxr.data.overlap import backbone_overlap

    samples = [Sample(p, 0, p.stem) for p in sorted((external / "NORMAL").glob("*.jpeg"))]
    refusal = backbone_overlap(tmp_path / "pt" / "backbone.pt", {}, {"external set ext": (samples, None)})
    assert refusal is not None and "1 images of external set ext" in refusal
    clean = [Sample(p, 0, p.stem) for p in sorted((external / "PNEUMONIA").glob("*.jpeg"))]
    assert backbone_overlap(tmp_path / "pt" / "backbone.pt", {}, {"external set ext": (clean, None)}) is None


def test_views_stay_in_range_and_differ_between_branches():
    from cxr.training.augment import augment
    from cxr.training.pretrain import views

    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 1, 48, 48), dtype=torch.uint8)
    u = augment(x, "views", torch.Generator().manual_seed(1))
    assert u.dtype == torch.uint8 and u.shape == x.shape
    v1, v2 = views(x, "cpu", "equalize", torch.Generator().manual_seed(1))
    assert v1.shape == v2.shape == (6, 3, 48, 48) and torch.isfinite(v1).all() and torch.isfinite(v2).all()
    lo, hi = (0 - 0.485) / 0.229, (1 - 0.406) / 0.225  # ImageNet normalisation of [0, 1]
    assert v1.min() >= lo - 1e-4 and v1.max() <= hi + 1e-4
    for i in range(6):  # every image's two views differ
        assert not torch.allclose(v1[i], v2[i])
    again = views(x, "cpu", "equalize", torch.Generator().manual_seed(1))
    assert torch.equal(again[0], v1) and torch.equal(again[1], v2)  # the generator decides


def test_the_two_methods_train_and_byol_moves_its_target():
    from cxr.training.pretrain import SelfSupervised

    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    byol = SelfSupervised(PretrainSpec(method="byol", momentum=0.5))
    before = byol.target["backbone"].conv1.weight.clone()
    loss = byol.loss(byol(x1, x2), byol.targets(x1, x2))
    loss.backward()
    assert torch.isfinite(loss) and byol.backbone.conv1.weight.grad is not None
    assert byol.target["backbone"].conv1.weight.grad is None  # the target does not learn by gradient
    with torch.no_grad():
        byol.backbone.conv1.weight.add_(1.0)
    byol.step_target(0, 10)
    assert not torch.equal(byol.target["backbone"].conv1.weight, before)
    simclr = SelfSupervised(PretrainSpec(method="simclr"))
    z = simclr(x1, x2)
    assert z.shape == (16, 128) and torch.isfinite(simclr.loss(z, None))


@pytest.mark.slow
def test_an_earlier_pretraining_is_not_overwritten_and_resume_checks_the_settings(backbone_dir, tmp_path, capsys):
    out = tmp_path / "pt"
    shutil.copytree(backbone_dir, out)
    assert pretrain("--data", "sample", "--out", out, "--epochs", "3") == 2
    assert "--resume" in capsys.readouterr().err
    assert pretrain("--data", "sample", "--out", out, "--epochs", "3", "--resume", "--method", "byol") == 2
    assert "different settings (method)" in capsys.readouterr().err
    assert pretrain("--data", "sample", "--out", out, "--epochs", "2", "--resume") == 2
    assert "already pretrained for 2 epochs" in capsys.readouterr().err


def _cxr(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cxr", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_killed_pretraining_resumes_on_the_same_loss_curve(tmp_path):
    args = ["pretrain", "--data", "sample", "--epochs", "3", *TINY]
    straight = tmp_path / "straight"
    proc = _cxr(*args, "--out", straight)
    assert proc.wait(600) == 0, proc.communicate()[1][-2000:]
    out = tmp_path / "killed"
    proc = _cxr(*args, "--out", out)
    deadline = time.time() + 300
    while not ((out / "history.csv").is_file() and len(read_csv(out / "history.csv")) >= 1):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "the first epoch never ended"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(read_csv(out / "history.csv"))
    assert 1 <= done < 3, "the kill came too late to test anything"
    proc = _cxr(*args, "--out", out, "--resume")
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert f"resuming after epoch {done}" in stdout
    a, b = read_csv(straight / "history.csv"), read_csv(out / "history.csv")
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == ["1", "2", "3"]
    for x, y in zip(a, b):
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), rel=1e-5)
    s, k = (torch.load(d / "backbone.pt", weights_only=True) for d in (straight, out))
    assert all(torch.allclose(s[n].float(), k[n].float(), atol=1e-5) for n in s)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr"])  # its negatives are gathered across processes; BYOL's loss is local
def test_torchrun_pretrains_on_two_processes(tmp_path, method):
    out = tmp_path / "pt"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "cxr", "pretrain", "--data", "sample", "--out", str(out), "--epochs", "2",
                           "--method", method, "--device", "cpu", *TINY], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["processes"] == 2 and prov["epochs_done"] == 2
    history = read_csv(out / "history.csv")
    assert [r["epoch"] for r in history] == ["1", "2"]
    # SimCLR's NT-Xent starts near log(2 x batch - 1); BYOL's is a negative cosine similarity, in [-1, 1]
    low, high = (0, 100) if method == "simclr" else (-1, 1)
    assert all(low < float(r["loss"]) <= high for r in history)
    state = torch.load(out / "backbone.pt", weights_only=True)
    assert "conv1.weight" in state and "bn1.running_mean" in state  # plain BatchNorm again, not the synced kind
    assert done.stdout.count("pretrain epoch 1/2") == 1  # rank 0 alone reports
