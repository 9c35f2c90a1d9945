"""`cxr pretrain`'s guards before any work (a temperature that cannot train, a manifest whose test
split is not fixed yet) and the provenance a kept epoch's backbone carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr.cli import main
from cxr.config import PretrainSpec, make_config
from cxr.data.unlabelled import PROVENANCE_FORMAT, pretraining_images, read_provenance
from cxr.errors import CxrError, DataError

from .helpers import write_png


def _images(root: Path, n: int = 12) -> Path:
    for i in range(n):
        write_png(root / ("NORMAL" if i % 2 else "PNEUMONIA") / f"person{i}_bacteria_{i}.png", i)
    return root


@pytest.mark.parametrize("temperature", ["0", "-0.2", "nan"])
def test_a_temperature_that_cannot_train_is_one_line_and_writes_nothing(tmp_path, capsys, temperature):
    """0 divided by zero inside lightly (a traceback, images.csv and thumbnails.npy left in OUT);
    -0.2 trained the objective inverted, silently."""
    out = tmp_path / "out"
    try:
        code = main(["pretrain", "--data", str(_images(tmp_path / "d")), "--out", str(out), "--temperature",
                     temperature, "--epochs", "1", "--image-size", "32", "--batch-size", "4", "--no-cache",
                     "--device", "cpu", "--workers", "1"])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "--temperature" in err and "above 0" in err and "Traceback" not in err
    assert not out.exists()


def test_the_pretraining_model_refuses_a_temperature_that_cannot_train():
    pytest.importorskip("lightly")
    from cxr.training.pretrain import SelfSupervised

    with pytest.raises(CxrError, match="above 0"):
        SelfSupervised(PretrainSpec(temperature=0.0))


def _manifest(path: Path, splits: list[str]) -> Path:
    rows = []
    for i, split in enumerate(splits):
        image = path.parent / "images" / f"person{i}_bacteria_{i}.png"
        write_png(image, i)
        rows.append(f"images/{image.name},{'PNEUMONIA' if i % 2 else 'NORMAL'},p{i},{split}")
    path.write_text("path,label,patient,split\n" + "\n".join(rows) + "\n")
    return path


def test_pretraining_refuses_a_manifest_whose_test_split_a_run_would_carve_from_its_rows(tmp_path, capsys):
    """Rows without a split, and no test row: a run on the manifest takes its test images from those
    rows, so pretraining on them would see them. Refused before anything is read or written."""
    manifest = _manifest(tmp_path / "m.csv", [""] * 12)
    with pytest.raises(DataError, match="m.csv: 12 rows have no split and none is test"):
        pretraining_images([manifest])
    out = tmp_path / "out"
    assert main(["pretrain", "--data", str(manifest), "--out", str(out), "--epochs", "1", "--image-size", "32",
                 "--batch-size", "4", "--no-cache", "--device", "cpu", "--workers", "1"]) == 2
    assert "give every row a split" in capsys.readouterr().err and not out.exists()


def test_pretraining_reads_a_manifests_rows_but_its_test_split(tmp_path):
    """With a test split named, rows without one go to train in a run: pretraining may read them."""
    manifest = _manifest(tmp_path / "m.csv", [""] * 8 + ["train"] * 2 + ["test"] * 2)
    paths, _, _ = pretraining_images([manifest])
    assert len(paths) == 10 and not any(p.name.startswith(("person10_", "person11_")) for p in paths)


def test_a_kept_epochs_backbone_carries_its_own_epochs(tmp_path):
    """--keep-every: backbone_epoch1.pt was pretrained for 1 epoch, whatever provenance.json says of
    the last (the model card said 2 epochs for backbone_epoch1.pt)."""
    from cxr.run_options import RunOptions
    from cxr.starting_weights import backbone_card

    spec = PretrainSpec(epochs=2)
    (tmp_path / "provenance.json").write_text(json.dumps({
        "format": PROVENANCE_FORMAT, "method": "simclr", "spec": spec.to_dict(), "epochs_done": 2, "images": 12,
        "sources": []}))
    assert read_provenance(tmp_path / "backbone_epoch1.pt")["epochs_done"] == 1
    assert read_provenance(tmp_path / "backbone.pt")["epochs_done"] == 2
    card = backbone_card(make_config("finetune"), RunOptions(weights=tmp_path / "backbone_epoch1.pt"))
    assert card["backbone"]["epochs"] == 1
