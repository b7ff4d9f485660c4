"""Write tiny, randomly initialised Stable Diffusion checkpoints that ComfyUI's own loaders accept.

No machine here can download weights, so the tests and the main job run on checkpoints built from a fixed
seed with ComfyUI's own model classes (shared/design/host-setup.md, "Tiny checkpoints"):

- z2i-tiny-sd15.safetensors  SD1.x topology: 320 channels at every level (channel_mult 1,1,1,1), two
  res blocks per level, cross-attention on the first three levels and in the middle block, so the block ids
  are SD1.5's own (input 1,2,4,5,7,8; middle 0; output 3..11). CLIP-L (fixed size), TAESD VAE.
- z2i-tiny-sd2v.safetensors  the same UNet with SD2's linear projections and 1024-wide context, OpenCLIP-H
  text encoder, marked and detected as v-prediction.
- z2i-tiny-sdxl.safetensors  SDXL topology (Segmind-Vega depth lists [0,0,1,1,2,2]) at 320 channels, with
  a middle transformer, CLIP-L + CLIP-G, TAESD-XL VAE.

Every attn2 `to_q`/`to_k` weight of the SD1.5 and SD2 models is scaled by 4 so cross-attention maps are peaky: with default init they
are nearly uniform and guidance would have no measurable effect. Each file is re-loaded with
`comfy.sd.load_checkpoint_guess_config` and its detected family asserted before the build is accepted.

Usage: python tools/make_tiny_checkpoints.py OUT_DIR [--only sd15,sd2v,sdxl]
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path

import torch

SEED = 20241122
NAMES = {"sd15": "z2i-tiny-sd15.safetensors", "sd2v": "z2i-tiny-sd2v.safetensors",
         "sdxl": "z2i-tiny-sdxl.safetensors"}

_SD_COMMON = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 1, 1, 1], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False, "adm_in_channels": None,
}
UNET_CONFIGS = {
    "sd15": {**_SD_COMMON, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8},
    "sd2v": {**_SD_COMMON, "use_linear_in_transformer": True, "context_dim": 1024, "num_head_channels": 64},
    "sdxl": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2],
        "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "channel_mult": [1, 1, 1],
        "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048,
        "num_head_channels": 64, "use_temporal_attention": False, "use_temporal_resblock": False,
    },
}
# attn2 q/k scale per family (see the module docstring). SDXL's text context is the un-normalised penultimate
# layer of two random encoders and its blocks are deeper: a smaller factor keeps its random UNet smooth enough
# that DDIM inversion converges with the step count as it does on real weights.
SHARPEN = {"sd15": 4.0, "sd2v": 4.0, "sdxl": 1.0}
EXPECTED = {"sd15": ("SD15", "EPS"), "sd2v": ("SD20", "V_PREDICTION"), "sdxl": ("Segmind_Vega", "EPS")}


def randomize_(module: torch.nn.Module, generator_seed: int) -> None:
    """Deterministic init: zero every tensor, then torch's own reset_parameters per layer type.

    ComfyUI's ops override reset_parameters with a no-op and create weights with torch.empty, so the base
    torch methods are called explicitly. Parameters no layer claims get N(0, 0.02).
    """
    torch.manual_seed(generator_seed)
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
        for b in module.buffers():
            if b.is_floating_point():
                b.zero_()
        seen = set()
        for m in module.modules():
            for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Conv1d, torch.nn.GroupNorm,
                         torch.nn.LayerNorm, torch.nn.Embedding):
                if isinstance(m, base):
                    base.reset_parameters(m)
                    seen.update(id(p) for p in m.parameters(recurse=False))
                    break
        for name, p in module.named_parameters():
            if id(p) not in seen and p.is_floating_point():
                if p.ndim == 0:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)


def sharpen_cross_attention_(unet: torch.nn.Module, factor: float = 4.0) -> int:
    n = 0
    with torch.no_grad():
        for name, m in unet.named_modules():
            if name.endswith("attn2"):
                m.to_q.weight.mul_(factor)
                m.to_k.weight.mul_(factor)
                n += 1
    return n


def build(kind: str, out_path: Path) -> None:
    import comfy.model_base as model_base
    import comfy.sd
    import comfy.supported_models as sm
    import comfy.taesd.taesd
    import comfy.utils

    cfg = dict(UNET_CONFIGS[kind])
    config_cls = {"sd15": sm.SD15, "sd2v": sm.SD20, "sdxl": sm.Segmind_Vega}[kind]
    model_config = config_cls(cfg)
    model_config.set_inference_dtype(torch.float32, None)
    if kind == "sd2v":
        model = model_base.BaseModel(model_config, model_type=model_base.ModelType.V_PREDICTION)
    else:
        model = model_config.get_model({})
    randomize_(model.diffusion_model, SEED + 1)
    n_attn = sharpen_cross_attention_(model.diffusion_model, SHARPEN[kind])
    if kind == "sd2v":
        # SD20.model_type() reads v-prediction off this bias's spread (comfy/supported_models.py).
        g = torch.Generator().manual_seed(SEED + 7)
        key = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
        sd_ref = model.diffusion_model.state_dict()
        with torch.no_grad():
            sd_ref[key].copy_(torch.randn(sd_ref[key].shape, generator=g) * 0.2)

    target = model_config.clip_target()
    clip = comfy.sd.CLIP(target, parameters=0)
    randomize_(clip.cond_stage_model, SEED + 2)
    clip_sd = clip.get_sd()

    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    randomize_(taesd, SEED + 3)
    with torch.no_grad():
        taesd.vae_scale.fill_(model_config.latent_format.scale_factor)
        taesd.vae_shift.fill_(0.0)
    vae_sd = taesd.state_dict()

    sd = model.state_dict_for_saving(clip_sd, vae_sd, None)
    sd = {k: (v.contiguous().half() if v.is_floating_point() and v.numel() > 1 else v.contiguous())
          for k, v in sd.items()}
    tmp = out_path.with_name(out_path.stem + ".partial.safetensors")
    comfy.utils.save_torch_file(sd, str(tmp), metadata={"z2i_tiny": kind, "seed": str(SEED)})
    check(tmp, kind)
    tmp.replace(out_path)
    logging.info("wrote %s (%d attn2 layers sharpened, %.0f MB)", out_path, n_attn, out_path.stat().st_size / 2**20)


def check(path: Path, kind: str) -> None:
    import comfy.sd
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    family = type(model.model.model_config).__name__
    mtype = model.model.model_type.name
    want = EXPECTED[kind]
    if (family, mtype) != want:
        raise SystemExit(f"{path.name}: ComfyUI detected {family}/{mtype}, expected {want[0]}/{want[1]}")
    if clip is None or vae is None:
        raise SystemExit(f"{path.name}: CLIP or VAE missing after reload")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--only", default="sd15,sd2v,sdxl")
    ap.add_argument("--comfyui", default=None, help="ComfyUI folder (default: the one tools/setup.sh made)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from z2i.headless.host import find_host, import_comfy
    import_comfy(find_host(args.comfyui))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for kind in args.only.split(","):
        out = args.out_dir / NAMES[kind]
        if out.exists():
            continue
        build(kind, out)


if __name__ == "__main__":
    main()
