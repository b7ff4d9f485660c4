"""Write a tiny, randomly initialised Stable Diffusion 3 topology checkpoint that ComfyUI's loader accepts.

z2i-tiny-sd3.safetensors: an MMDiT of depth 2 (ComfyUI derives the width from the weights: hidden size = 64 x
depth = 128, 2 heads of 64), patch 2, a 16-channel latent, the pooled CLIP-L + CLIP-G vector (2048) as the adm
input, a context embedder from the 4096-wide SD3 context (CLIP-L and CLIP-G side by side, zero-padded; no T5),
positional embeddings for latents up to 128 x 128 (1024 px); CLIP-L + CLIP-G text encoders (their fixed sizes;
ComfyUI's SD3 text encoder runs without T5) and a 16-channel TAESD (TAESD3's layout) as the VAE. ComfyUI detects
it as SD3 with FLOW model sampling (shift 3).

It is built from a fixed seed with ComfyUI's own classes (the same deterministic init as
tools/make_tiny_checkpoints.py), then reloaded with comfy.sd.load_checkpoint_guess_config and its detected family
asserted. A separate script (and cache key in tools/setup.sh) from the UNet checkpoints, so that a change here
does not rebuild those.

Usage: python tools/make_tiny_sd3.py OUT_DIR [--comfyui DIR]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_checkpoints import SEED, randomize_  # noqa: E402

NAME = "z2i-tiny-sd3.safetensors"
DEPTH = 2
UNET_CONFIG = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": DEPTH, "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 64 * DEPTH}},
    "num_patches": 64 * 64, "pos_embed_max_size": 64, "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}
# Random image-stream weights of a transformer this shallow make the text stream's attention almost uniform;
# the joint attention's q/k projections are scaled so that image-to-text attention is peaky enough for
# attention-based edits to have a measurable effect (as the UNet checkpoints' attn2 q/k).
SHARPEN = 2.0


def build(out_path: Path) -> None:
    import comfy.sd
    import comfy.supported_models as sm
    import comfy.taesd.taesd
    import comfy.utils

    model_config = sm.SD3(dict(UNET_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    randomize_(model.diffusion_model, SEED + 11)
    with torch.no_grad():
        for name, m in model.diffusion_model.named_modules():
            if name.endswith("attn.qkv"):                 # [q; k; v] rows of the joint attention
                width = m.weight.shape[0] // 3
                m.weight[:2 * width].mul_(SHARPEN)
    pref = model_config.text_encoder_key_prefix[0]
    target = model_config.clip_target({f"{pref}clip_l.transformer.text_model.final_layer_norm.weight": None,
                                       f"{pref}clip_g.transformer.text_model.final_layer_norm.weight": None})
    clip = comfy.sd.CLIP(target, parameters=0)
    randomize_(clip.cond_stage_model, SEED + 12)
    clip_sd = clip.get_sd()

    taesd = comfy.taesd.taesd.TAESD(latent_channels=16)
    randomize_(taesd, SEED + 13)
    with torch.no_grad():
        taesd.vae_scale.fill_(model_config.latent_format.scale_factor)
        taesd.vae_shift.fill_(model_config.latent_format.shift_factor)
    vae_sd = taesd.state_dict()

    sd = model.state_dict_for_saving(clip_sd, vae_sd, None)
    sd = {k: (v.contiguous().half() if v.is_floating_point() and v.numel() > 1 else v.contiguous())
          for k, v in sd.items()}
    tmp = out_path.with_name(out_path.stem + ".partial.safetensors")
    comfy.utils.save_torch_file(sd, str(tmp), metadata={"z2i_tiny": "sd3", "seed": str(SEED)})
    check(tmp)
    tmp.replace(out_path)
    logging.info("wrote %s (%.0f MB)", out_path, out_path.stat().st_size / 2**20)


def check(path: Path) -> None:
    import comfy.sd
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    family, mtype = type(model.model.model_config).__name__, model.model.model_type.name
    if (family, mtype) != ("SD3", "FLOW"):
        raise SystemExit(f"{path.name}: ComfyUI detected {family}/{mtype}, expected SD3/FLOW")
    if clip is None or vae is None or vae.latent_channels != 16:
        raise SystemExit(f"{path.name}: CLIP or the 16-channel VAE missing after reload")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--comfyui", default=None, help="ComfyUI folder (default: the one tools/setup.sh made)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from z2i.headless.host import find_host, import_comfy
    import_comfy(find_host(args.comfyui))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / NAME
    if not out.exists():
        build(out)


if __name__ == "__main__":
    main()
