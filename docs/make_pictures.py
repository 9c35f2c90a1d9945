"""Remake the manual's pictures from the bundled sample: `python docs/make_pictures.py`.

Runs `cxr demo` into a temporary folder (offline it trains `scratch` only), then writes into
docs/images/: the report's first screen (headless Chromium through Selenium, as the report test
does), a CAM gallery and the learning curves of that run. Each PNG is kept under 300 kB. The
TensorBoard picture (tensorboard_scalars.png) was taken by hand from TensorBoard's page in an
earlier session; this script does not remake it. Needs the test extra and Debian chromium +
chromium-driver."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

IMAGES = Path(__file__).resolve().parent / "images"
LIMIT = 300_000


def save_small(src: Path | Image.Image, dest: Path, width: int) -> None:
    image = Image.open(src) if not isinstance(src, Image.Image) else src
    image = image.convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.save(dest, optimize=True)
    while dest.stat().st_size > LIMIT:  # smaller until it fits
        image = image.resize((image.width * 9 // 10, image.height * 9 // 10), Image.LANCZOS)
        image.save(dest, optimize=True)


def screenshot(page: Path, dest: Path) -> None:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options)
    try:
        driver.get(page.resolve().as_uri())
        png = dest.with_suffix(".full.png")
        driver.save_screenshot(str(png))
    finally:
        driver.quit()
    save_small(png, dest, 1000)
    png.unlink()


def main() -> int:
    IMAGES.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        subprocess.run([sys.executable, "-m", "cxr", "demo", "--out", str(out), "--cache-dir", str(Path(tmp) / "cache")],
                       check=True)
        screenshot(out / "report.html", IMAGES / "report.png")
        figures = out / "scratch" / "figures"
        save_small(figures / "cam_pneumonia.png", IMAGES / "cam_gallery.png", 900)
        save_small(figures / "loss.png", IMAGES / "learning_curve.png", 800)
    for p in sorted(IMAGES.glob("*.png")):
        print(f"{p.name}: {p.stat().st_size / 1000:.0f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
