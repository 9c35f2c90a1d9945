"""Decoding one radiograph file, of any supported format, to 8-bit grayscale at the model's size.

Training, evaluation, CAM figures and `cxr predict` all go through `load_image`, so a file gives
the same pixels wherever it is read. Supported: JPEG and PNG (8 or 16 bit; grayscale, RGB,
RGBA, palette) and DICOM (uncompressed or with a pixel-data handler pydicom has).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

MAX_PIXELS = 64_000_000  # above this a file is refused as unsafe to decode (decompression bomb);
#                          the largest radiographs are ~4k x 4k = 16 MP
DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageTooLarge(ValueError):
    pass


DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError, KeyError,
                 AttributeError, IndexError, TypeError, NotImplementedError, RuntimeError)


def describe_error(e: BaseException) -> str:
    """A short reason for an error row: what went wrong with the file, in one line."""
    if isinstance(e, (ImageTooLarge, Image.DecompressionBombError)):
        return f"too large to decode safely ({e})".splitlines()[0]
    text = str(e).splitlines()[0] if str(e) else ""
    if type(e) is ValueError and text:  # our own checks say what is wrong in plain words
        return text[:200]
    if "cannot identify image file" in text:
        return "not a readable image (unknown format, empty or corrupt file)"
    if "truncated" in text.lower():  # Pillow: "image file is truncated (...)", "Truncated File Read"
        return "the image file is cut short (an interrupted copy or download?): copy it again from its source"
    return f"{type(e).__name__}: {text}"[:200]


def to_gray(img: Image.Image) -> Image.Image:
    """8-bit grayscale from any mode: 16-bit is scaled (65535 -> 255), colour and alpha dropped
    through ITU-R 601 luma, so the same radiograph saved as L, RGB, RGBA or 16-bit PNG matches."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "L":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA").convert("RGB")  # alpha dropped, not composited: X-rays are opaque
    return img.convert("L")


def _window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 linear VOI window, to [0, 1]."""
    return np.clip((x - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0)


def _first(value) -> float:
    """The first of a multi-valued DICOM number (several windows may be listed), or the number."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _voi_lut(x: np.ndarray, item, ds) -> np.ndarray:
    """The first VOI LUT of a DICOM (PS3.3 C.11.2.1.1) applied to the modality-LUT output `x`,
    to [0, 1]. Done here rather than by pydicom's apply_voi_lut, which (3.0.2) indexes an 8-bit
    LUT with 8-bit indices, so every value above 255 wraps round (a test holds a 4096-entry LUT)."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words in the data set's byte order
        little = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        order = "<" if little is None or little.is_little_endian else ">"
        lut = np.frombuffer(data, dtype=f"{order}u2", count=entries).astype(np.float64)
    else:
        lut = np.asarray(data, dtype=np.float64).reshape(-1)[:entries]
    index = np.clip(np.rint(x) - first, 0, entries - 1).astype(np.int64)
    return lut[index] / (2 ** bits - 1)


def read_dicom(path: Path) -> Image.Image:
    """A DICOM radiograph as 8-bit grayscale: modality LUT (rescale slope/intercept), then the
    VOI LUT or window when the file has one (else the full stored range), MONOCHROME1 inverted."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows * cols > MAX_PIXELS:
        raise ImageTooLarge(f"{cols}x{rows} pixels, limit {MAX_PIXELS:,}")
    raw = ds.pixel_array
    if raw.ndim != 2:
        raise ValueError(f"expected one grayscale frame, got pixel array of shape {raw.shape}")
    x = apply_modality_lut(raw, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        v = _voi_lut(x, ds.VOILUTSequence[0], ds)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        v = _window(x, _first(ds.WindowCenter), _first(ds.WindowWidth))
    else:
        bits = int(getattr(ds, "BitsStored", 8))
        signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
        lo = -(2 ** (bits - 1)) if signed else 0
        hi = lo + 2 ** bits - 1
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
        v = (x - lo) / max(hi - lo, 1e-12)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        v = 1.0 - v
    return Image.fromarray(np.clip(np.rint(v * 255), 0, 255).astype(np.uint8), mode="L")


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """Squash to (size, size) like Resize((size, size)) (bilinear, antialiased), as uint8."""
    return np.array(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode `path` to a (size, size) uint8 grayscale array."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return resize_square(read_dicom(path), size)
    with Image.open(path) as img:
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImageTooLarge(f"{w}x{h} pixels, limit {MAX_PIXELS:,}")
        # JPEG: let the decoder downscale in the DCT domain (1/2..1/8), keeping at least twice the
        # target size so the final antialiased resize decides the pixels. Measured on the 120 shared
        # originals at 224 px: 1.5x faster than a full decode, mean difference 0.2 grey levels
        # (asking for 1x the size: 1.9x faster but 0.7 levels, and a DICOM of the same pixels drifts).
        img.draft("L", (2 * size, 2 * size))
        return resize_square(to_gray(img), size)
