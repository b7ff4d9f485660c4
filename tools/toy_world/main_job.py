"""The main job's edit (tools/main.sh, issue 30): a shipped workflow, run headless by the pack's runner on the
trained toy-world checkpoint, turns a red circle into a red square; writes before_after.png and says what the
judge sees in each.

The workflow is workflows/z2i_pix2pix_zero.json as shipped, with only what a user swaps in before a run set on
the command line (`--set`): the image (a rendered toy scene), the checkpoint, the caption, the edit direction's
words and sentences (the toy world's sentence banks, tools/toy_world/world.py), and the cross-attention guidance
step tuned for this model: the shipped 0.1 (the paper's, for SD1.5) moves the toy model's latent by about 10% of
its norm per step and destroys the image; 0.001 moves it about 0.1% (EVALUATION.md, "What was tuned").

Usage: python tools/toy_world/main_job.py OUT_DIR [--comfyui DIR]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from toy_world import world  # noqa: E402
from toy_world.judge import judge  # noqa: E402

WORKFLOW = REPO / "workflows" / "z2i_pix2pix_zero.json"
SOURCE = world.Scene("circle", "red", "black", cx=32.0, cy=34.0, half=14.0)
TASK = world.TASKS[0]                     # object swap: circle -> square
BANK = 100
TOY_XA_GUIDANCE = 0.001                   # the toy model's step (the shipped workflow's 0.1 is SD1.5's)


def describe(img: np.ndarray) -> str:
    v = judge(img)
    return f"{v.colour} {v.shape} on {v.background}" if v.found else "no object found"


def before_after(src: Image.Image, edit: Image.Image, path: Path, scale: int = 4) -> None:
    s = world.SIZE * scale
    out = Image.new("RGB", (2 * s + 12, s + 26), "white")
    d = ImageDraw.Draw(out)
    for i, (im, label) in enumerate(((src, "before: " + describe(np.asarray(src))),
                                     (edit, "after: " + describe(np.asarray(edit))))):
        out.paste(im.resize((s, s), Image.Resampling.NEAREST), (i * (s + 12), 24))
        d.text((i * (s + 12) + 2, 6), label, fill="black")
    out.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--comfyui", default=None)
    ap.add_argument("--workflow", type=Path, default=WORKFLOW)
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE", help="more --set for the runner")
    args = ap.parse_args()
    out = args.out_dir.resolve()
    inputs = out / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    src_path = inputs / "toy_red_circle.png"
    world.render(SOURCE).save(src_path)
    caption = world.caption(SOURCE)
    sets = {"Source prompt (caption).text": caption,
            "Z2I_EditDirection.source": TASK.source, "Z2I_EditDirection.target": TASK.target,
            "Z2I_EditDirection.source_sentences": "\n".join(world.sentence_bank(TASK.attribute, TASK.source, BANK)),
            "Z2I_EditDirection.target_sentences": "\n".join(world.sentence_bank(TASK.attribute, TASK.target, BANK)),
            "Z2I_Pix2PixZeroSampler.xa_guidance": str(TOY_XA_GUIDANCE)}
    cmd = [sys.executable, "-m", "z2i.run", str(args.workflow), "--checkpoint", "z2i-toy-sd15.safetensors",
           "--input-dir", str(inputs), "--output-dir", str(out), "--quiet"]
    if args.comfyui:
        cmd += ["--comfyui", args.comfyui]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    for item in args.set:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True, env=os.environ.copy())
    edited = sorted(out.glob(f"{src_path.stem}_*.png"), key=lambda p: p.stat().st_mtime)   # the runner's names
    if not edited:
        raise SystemExit(f"the workflow wrote no image into {out}")
    src, edit = Image.open(src_path).convert("RGB"), Image.open(edited[-1]).convert("RGB")
    before_after(src, edit, out / "before_after.png")
    print(f"{caption} -> {TASK.target}: before: {describe(np.asarray(src))}; after: {describe(np.asarray(edit))}")
    print(f"wrote {out / 'before_after.png'}")


if __name__ == "__main__":
    main()
