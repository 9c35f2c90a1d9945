from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.config import CLASSES
from cxr.data.dataset import (
    Sample,
    describe,
    limit_per_class,
    patient_id,
    split_by_patient,
)
from cxr.data.folders import list_split
from cxr.data.images import load_image
from cxr.data.loading import load_images, prepare_splits
from cxr.errors import DataError

from .helpers import write_dicom, write_png


@pytest.mark.parametrize("name, patient", [
    ("person1234_bacteria_5678.jpeg", "person1234"),
    ("person1234_virus_99.jpeg", "person1234"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("IM-0505-0001-0002.jpeg", "IM-0505"),
    ("NORMAL2-IM-0927-0001.jpeg", "NORMAL2-IM-0927"),
    ("NORMAL2-IM-1116-0001-0002.JPEG", "NORMAL2-IM-1116"),
    ("00001280_004.jpeg", "00001280"),  # NIH ChestX-ray8/14: patient, follow-up
    ("00030805_000.png", "00030805"),
    ("0001280_004.png", "0001280_004"),  # seven digits: not NIH's form, its own patient
    ("scan_17.png", "scan_17"),  # unknown naming: the file is its own patient
])
def test_patient_id(name, patient):
    assert patient_id(name) == patient


def test_class_indices_are_fixed_by_name():
    assert CLASSES == ("NORMAL", "PNEUMONIA")


def fake_samples(n_patients=200, seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for p in range(n_patients):
        label = int(p % 4 != 0)  # 25% NORMAL patients, like the data set
        for k in range(int(rng.integers(1, 4))):
            samples.append(Sample(Path(f"/d/{p}_{k}.png"), label, f"p{p}"))
    return samples


def test_split_keeps_patients_whole_and_is_stratified():
    samples = fake_samples()
    train, val = split_by_patient(samples, 0.2, seed=1)
    assert len(train) + len(val) == len(samples)
    assert not {s.patient for s in train} & {s.patient for s in val}
    for label in (0, 1):
        share = sum(s.label == label for s in val) / sum(s.label == label for s in samples)
        assert 0.15 < share < 0.26, (label, share)


def test_split_is_deterministic_for_a_seed_and_order_free():
    samples = fake_samples()
    a = split_by_patient(samples, 0.1, seed=7)
    b = split_by_patient(list(reversed(samples)), 0.1, seed=7)
    c = split_by_patient(samples, 0.1, seed=8)
    assert a == b
    assert {s.patient for s in a[1]} != {s.patient for s in c[1]}


def test_split_rejects_bad_ratio():
    with pytest.raises(ValueError):
        split_by_patient(fake_samples(), 0.0, seed=0)


def test_limit_per_class():
    samples = fake_samples()
    kept = limit_per_class(samples, 5, seed=0)
    assert [sum(s.label == c for s in kept) for c in (0, 1)] == [5, 5]
    assert limit_per_class(samples, None, seed=0) is samples


def test_discovery_labels_by_folder_and_folds_val(tiny_data):
    write_png(tiny_data / "val" / "NORMAL" / "IM-0900-0001.PNG", 1)
    write_png(tiny_data / "val" / "PNEUMONIA" / "person900_virus_1.png", 2)
    (tiny_data / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    splits = prepare_splits(tiny_data, 0.25, seed=0)
    everything = splits.train + splits.val
    assert len(everything) == 18
    assert all(s.label == (s.path.parent.name == "PNEUMONIA") for s in everything)
    assert any("folded into train" in n for n in splits.notes)
    assert any("ignored 1 files" in n for n in splits.notes)
    table = describe({"train": splits.train, "val": splits.val})
    assert "NORMAL images (patients)" in table.splitlines()[0] and len(table.splitlines()) == 3


@pytest.mark.parametrize("breakage, message, folder", [
    (lambda r: (r / "train" / "NORMAL").rename(r / "train" / "normal"), "unexpected class folder", "train/normal"),
    (lambda r: [p.unlink() for p in (r / "train" / "PNEUMONIA").iterdir()], "no .jpeg/.jpg/.png images",
     "train/PNEUMONIA"),
    (lambda r: (r / "train").rename(r / "training"), "folder not found", "train"),
])
def test_discovery_errors_name_the_folder(tiny_data, breakage, message, folder):
    breakage(tiny_data)
    with pytest.raises(DataError, match=message) as e:
        prepare_splits(tiny_data, 0.1, seed=0)
    assert str(e.value).startswith(f"{tiny_data / folder}:")  # the very folder at fault, not only the root
    assert "\n" not in str(e.value)


def test_nested_download_gets_a_hint(tiny_data):
    with pytest.raises(DataError, match="did you mean --data"):
        prepare_splits(tiny_data.parent, 0.1, seed=0)


def test_missing_test_class_folder(tiny_data):
    (tiny_data / "test" / "PNEUMONIA").rename(tiny_data / "test" / "PNEUMONIA_old")
    with pytest.raises(DataError, match="PNEUMONIA_old"):
        list_split(tiny_data, "test")


def _gray_palette(gray: np.ndarray) -> Image.Image:
    """A palette (mode P) image whose index i shows grey level i."""
    img = Image.fromarray(gray, mode="P")
    img.putpalette([v for i in range(256) for v in (i, i, i)])
    return img


def test_every_image_mode_converts_the_same_way(tmp_path):
    gray = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    gray[10:20, 5:30] = 17
    variants = {
        "l.png": Image.fromarray(gray, mode="L"),
        "rgb.png": Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB"),
        "rgba.png": Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 200)]), mode="RGBA"),
        "16bit.png": Image.fromarray(gray.astype(np.uint16) * 257),
        "palette.png": _gray_palette(gray),
    }
    arrays = {}
    for name, img in variants.items():
        img.save(tmp_path / name)
        arrays[name] = load_image(tmp_path / name, 32)
    assert Image.open(tmp_path / "16bit.png").mode.startswith("I")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    for name, a in arrays.items():
        assert a.shape == (32, 32) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, arrays["l.png"], err_msg=name)
    # the same squash as Resize((s, s)): the left-to-right ramp survives, the box is still there
    assert arrays["l.png"][0, 0] < arrays["l.png"][0, -1]


def test_real_jpeg_decodes_to_requested_size(shared_data):
    path = next((shared_data / "train" / "NORMAL").iterdir())
    a = load_image(path, 64)
    assert a.shape == (64, 64) and 20 < a.mean() < 235


def test_unreadable_images_are_all_named(tmp_path):
    good = tmp_path / "good.png"
    write_png(good, 0)
    text = tmp_path / "text.jpeg"
    text.write_text("this is not a picture")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError) as e:
        load_images([good, text, empty, truncated], 32, workers=2)
    msg = str(e.value)
    assert "cannot read 3 image(s)" in msg
    for bad in (text, empty, truncated):
        assert str(bad) in msg
    assert "\n" not in msg
    images = load_images([good, good], 32, workers=2)
    assert images.shape == (2, 1, 32, 32)


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_dicom_voi_lut_sequence_is_applied(tmp_path, vr):
    """A 12-bit DICOM whose VOI LUT sequence maps stored value v to v // 16 (8-bit output) gives
    the 8-bit image it was made from; without the LUT the full 12-bit range would be used."""
    gray = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    gray[10:20, 5:30] = 17
    path = tmp_path / "voi.dcm"
    write_dicom(path, (gray.astype(np.uint16) * 16 + 7), bits=12)
    import pydicom
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    values = np.arange(4096, dtype=np.uint16) // 16
    item.add_new(0x00283006, vr, values.tobytes() if vr == "OW" else [int(v) for v in values])
    ds.VOILUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 100, 50  # ignored: the LUT is preferred
    ds.save_as(path, enforce_file_format=True)
    np.testing.assert_array_equal(load_image(path, 64), gray)


def test_over_64_megapixel_dicom_is_refused_before_decoding(tmp_path):
    from cxr.data.images import ImageTooLarge

    path = tmp_path / "huge.dcm"
    write_dicom(path, np.zeros((4, 4), np.uint8))
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 8100, 8000  # the header claims 64.8 MP; the pixels are never decoded
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageTooLarge, match="8000x8100 pixels"):
        load_image(path, 64)


def test_reduced_size_jpeg_decoding_is_within_half_a_grey_level(shared_data):
    """The JPEG decoder's DCT-domain downscaling (kept at twice the target size) against a full
    decode, on the real full-size radiographs: the README claims 0.2 grey levels on average."""
    originals = shared_data.parent / "chest_xray_originals"
    if not originals.is_dir():
        pytest.skip(f"{originals} not found")
    from cxr.data.images import resize_square, to_gray

    paths = sorted(originals.rglob("*.jpeg"))[:24]
    assert paths
    diffs = []
    for path in paths:
        with Image.open(path) as img:
            full = resize_square(to_gray(img), 224)
        diffs.append(np.abs(load_image(path, 224).astype(float) - full).mean())
    assert 0 < np.mean(diffs) < 0.5, diffs
