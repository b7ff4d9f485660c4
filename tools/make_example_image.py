"""Write assets/z2i_example.png, the example image the pack ships (procedural: no photo, no licence question).

A 128x128 smooth two-tone background with a red square "object" in the middle: small (about 2 KB), enough for
every workflow to run out of the box, and an honest placeholder for the user's own picture. The pack copies it
into ComfyUI's input folder when it loads (nodes/__init__.py, only if absent), so the shipped workflows' Load
Image nodes find it on a stock ComfyUI.

Usage: python tools/make_example_image.py [--check]   (--check: fail if the committed file differs)
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "assets" / "z2i_example.png"
SIZE = 128


def example_pixels(size: int = SIZE) -> np.ndarray:
    """uint8 [size, size, 3]: sinusoidal red/green ramps, a blue x*y ramp, a flat red-orange square."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1.0)
    img = np.stack([0.5 + 0.5 * np.sin(6 * x), 0.5 + 0.5 * np.cos(5 * y), x * y], -1)
    lo, hi = round(size * 40 / 128), round(size * 90 / 128)
    img[lo:hi, lo:hi] = [0.9, 0.3, 0.2]
    return (img * 255).astype("uint8")


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(example_pixels()).save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    data = png_bytes()
    if args.check:
        if not OUT.is_file() or not np.array_equal(np.asarray(Image.open(OUT).convert("RGB")), example_pixels()):
            sys.exit(f"{OUT.relative_to(REPO)} is out of date: run python tools/make_example_image.py")
        return
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_bytes(data)
    print(f"wrote {OUT.relative_to(REPO)} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
