"""Write a tiny, randomly initialised SD1.x ControlNet (and, with --gligen-dir, a tiny GLIGEN) that match the tiny
SD1.5 checkpoint and that ComfyUI's own ControlNetLoader / GLIGENLoader accept (no machine here can download
weights).

The network is core's `comfy.cldm.cldm.ControlNet` with the tiny SD1.5 UNet's configuration
(tools/make_tiny_checkpoints.py) and a 3-channel hint, initialised from a fixed seed. Its zero convolutions are
NOT zero (a trained ControlNet's are not either), so the control visibly changes a result. Saved in the
original ControlNet layout (`control_model.*`), re-loaded with `comfy.controlnet.load_controlnet` and checked.

Usage: python tools/make_tiny_controlnet.py OUT_DIR [--comfyui HOST]
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

NAME = "z2i-tiny-controlnet-sd15.safetensors"
SEED = 20261130


def build(out_path: Path) -> None:
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    import comfy.utils
    from make_tiny_checkpoints import UNET_CONFIGS, randomize_

    cfg = {k: v for k, v in UNET_CONFIGS["sd15"].items()
           if k not in ("out_channels", "transformer_depth_output", "use_temporal_attention",
                        "use_temporal_resblock")}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, **cfg)
    randomize_(net, SEED)
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():      # small non-zero "zero" convolutions: the control acts, gently
        for m in [*net.zero_convs, net.middle_block_out]:
            conv = m[0] if isinstance(m, torch.nn.Sequential) else m
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.02)
            conv.bias.zero_()
    sd = {"control_model." + k: v.contiguous().half() if v.is_floating_point() and v.numel() > 1 else v.contiguous()
          for k, v in net.state_dict().items()}
    tmp = out_path.with_name(out_path.stem + ".partial.safetensors")
    comfy.utils.save_torch_file(sd, str(tmp), metadata={"z2i_tiny": "controlnet-sd15", "seed": str(SEED)})
    cn = comfy.controlnet.load_controlnet(str(tmp))
    if cn is None or type(cn).__name__ != "ControlNet":
        raise SystemExit(f"{tmp.name}: ComfyUI did not load it as a ControlNet ({type(cn).__name__})")
    tmp.replace(out_path)
    logging.info("wrote %s (%.0f MB)", out_path, out_path.stat().st_size / 2**20)


GLIGEN_NAME = "z2i-tiny-gligen-sd15.safetensors"
# the tiny SD1.5 UNet's transformer blocks in the order core's GLIGEN numbers them (transformer_index)
GLIGEN_BLOCKS = ([f"input_blocks.{b}.1" for b in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"]
                 + [f"output_blocks.{b}.1" for b in range(3, 12)])


def build_gligen(out_path: Path) -> None:
    """A tiny GLIGEN (box-conditioned gated self-attention per transformer block + the position net) for the
    tiny SD1.5 UNet (320 channels, CLIP-L width 768), in the layout core's GLIGENLoader reads. The gates are
    opened (tanh(alpha) = 0.46) so the boxes visibly act."""
    import comfy.gligen
    import comfy.sd
    import comfy.utils
    from make_tiny_checkpoints import randomize_

    sd = {}
    for i, block in enumerate(GLIGEN_BLOCKS):
        m = comfy.gligen.GatedSelfAttentionDense(320, 768, 8, 40)
        randomize_(m, SEED + 10 + i)
        with torch.no_grad():
            m.alpha_attn.fill_(0.5)
            m.alpha_dense.fill_(0.5)
        sd.update({f"{block}.fuser.{k}": v for k, v in m.state_dict().items()})
    pn = comfy.gligen.PositionNet(768, 768)
    randomize_(pn, SEED + 40)
    sd.update({f"position_net.{k}": v for k, v in pn.state_dict().items()})
    sd = {k: v.contiguous() for k, v in sd.items()}
    tmp = out_path.with_name(out_path.stem + ".partial.safetensors")
    comfy.utils.save_torch_file(sd, str(tmp), metadata={"z2i_tiny": "gligen-sd15", "seed": str(SEED)})
    g = comfy.sd.load_gligen(str(tmp))
    if len(g.model.module_list) != len(GLIGEN_BLOCKS):
        raise SystemExit(f"{tmp.name}: core loaded {len(g.model.module_list)} fusers, expected {len(GLIGEN_BLOCKS)}")
    tmp.replace(out_path)
    logging.info("wrote %s (%.0f MB)", out_path, out_path.stat().st_size / 2**20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--comfyui", default=None, help="ComfyUI folder (default: the one tools/setup.sh made)")
    ap.add_argument("--gligen-dir", type=Path, default=None, help="also write the tiny GLIGEN there")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from z2i.headless.host import find_host, import_comfy
    import_comfy(find_host(args.comfyui))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / NAME
    if not out.exists():
        build(out)
    if args.gligen_dir is not None:
        args.gligen_dir.mkdir(parents=True, exist_ok=True)
        if not (args.gligen_dir / GLIGEN_NAME).exists():
            build_gligen(args.gligen_dir / GLIGEN_NAME)


if __name__ == "__main__":
    main()
