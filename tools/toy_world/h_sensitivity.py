"""How much the toy model's output depends on its h-space (EVALUATION.md, the Asyrp rows): Asyrp edits by shifting
the bottleneck features h (the middle block's output); if the UNet's decoder hardly reads h, no shift can edit.

For one noisy latent at timestep 500 and a caption, prints |h_target - h_source| / |h| for the caption with one
word swapped, and the relative change of the predicted noise when h is shifted by 10%, 50% and 100% of its norm
along a random direction and along the caption-derived one.

Usage: python tools/toy_world/h_sensitivity.py [CHECKPOINT] [--comfyui DIR]   (PYTHONPATH=.host/pythonpath)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SOURCE, TARGET = "a red circle on a black background", "a red square on a black background"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", type=Path, default=Path(__file__).resolve().parents[2]
                    / ".host/ComfyUI/models/checkpoints/z2i-toy-sd15.safetensors")
    ap.add_argument("--comfyui", default=None)
    args = ap.parse_args()
    from z2i.headless.host import find_host, import_comfy
    import_comfy(find_host(args.comfyui))
    from toy_world.toy_model import encode, load
    model, clip, _ = load(args.checkpoint)
    unet = model.model.diffusion_model
    ctx = {k: encode(clip, text)[0][0] for k, text in (("source", SOURCE), ("target", TARGET))}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor([500.0])
    state = {"shift": None, "h": None}

    def hook(module, inputs, output):            # the middle block's last layer: its output is Asyrp's h
        state["h"] = output.detach().clone()
        return output if state["shift"] is None else output + state["shift"]

    handle = unet.middle_block[-1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            e_src = unet(x, t, context=ctx["source"])
            h = state["h"]
            e_tgt = unet(x, t, context=ctx["target"])
            d = state["h"] - h
            rel = lambda e: float((e - e_src).norm() / e_src.norm())  # noqa: E731
            print(f"|h_target - h_source| / |h| = {float(d.norm() / h.norm()):.4f}; "
                  f"the predicted noise moves by {rel(e_tgt):.4f} between the two captions")
            rnd = torch.randn(h.shape, generator=gen)
            for s in (0.1, 0.5, 1.0):
                out = []
                for name, direction in (("random", rnd), ("derived", d)):
                    state["shift"] = s * h.norm() * direction / direction.norm()
                    out.append(f"{name} {rel(unet(x, t, context=ctx['source'])):.2e}")
                    state["shift"] = None
                print(f"h shifted by {s:.0%} of |h|: relative change of the predicted noise: {', '.join(out)}")
    finally:
        handle.remove()


if __name__ == "__main__":
    main()
