#!/usr/bin/env python3
"""Thumbnails for ComfyUI's template browser: workflows/<stem>.jpg from docs/screenshots/<stem>.png.

The browser shows a same-name .jpg beside each workflow of a pack's workflows/ folder. The screenshots are
the real frontend with the workflow loaded and run (tests/test_frontend.py; refresh them with
Z2I_UPDATE_SCREENSHOTS=1). This crops each one to the graph (the canvas area the test fits the graph into,
trimmed to what differs from the canvas background), pads it to 4:3 and scales it to --width pixels.

    .venv/bin/python tools/make_thumbnails.py [--width 400] [--check]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# left, top, right, bottom screen margins that tests/test_frontend.py (FIT_MARGINS) keeps free of the graph
MARGINS = (70, 130, 25, 75)
ASPECT = 4 / 3


def thumbnail(png: Path, width: int) -> Image.Image:
    img = Image.open(png).convert("RGB")
    left, top, right, bottom = MARGINS
    area = img.crop((left, top, img.width - right, img.height - bottom))
    a = np.asarray(area).astype(np.int16)
    colors, counts = np.unique(a.reshape(-1, 3), axis=0, return_counts=True)
    bg = colors[counts.argmax()]                       # the canvas background, the commonest colour
    ys, xs = np.nonzero(np.abs(a - bg).max(axis=2) > 6)
    if len(xs):
        pad = 10
        x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, area.width)
        y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, area.height)
        area = area.crop((x0, y0, x1, y1))
    w, h = area.size
    W, H = (w, round(w / ASPECT)) if w / h >= ASPECT else (round(h * ASPECT), h)
    canvas = Image.new("RGB", (W, H), tuple(int(c) for c in bg))
    canvas.paste(area, ((W - w) // 2, (H - h) // 2))
    return canvas.resize((width, round(width / ASPECT)), Image.LANCZOS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflows", type=Path, default=REPO / "workflows")
    ap.add_argument("--screenshots", type=Path, default=REPO / "docs" / "screenshots")
    ap.add_argument("--width", type=int, default=400)
    ap.add_argument("--check", action="store_true", help="only report workflows without a thumbnail")
    args = ap.parse_args(argv)

    workflows = sorted(args.workflows.glob("*.json"))
    if args.check:
        missing = [p.name for p in workflows if not p.with_suffix(".jpg").is_file()]
        for name in missing:
            print(f"no thumbnail for workflows/{name}", file=sys.stderr)
        return 1 if missing else 0
    failed = 0
    for wf in workflows:
        png = args.screenshots / f"{wf.stem}.png"
        if not png.is_file():
            print(f"no screenshot {png} for {wf.name}: run tests/test_frontend.py first", file=sys.stderr)
            failed += 1
            continue
        out = wf.with_suffix(".jpg")
        thumbnail(png, args.width).save(out, "JPEG", quality=85, optimize=True)
        print(f"{out.relative_to(REPO) if out.is_relative_to(REPO) else out} ({out.stat().st_size // 1024} KB)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
