"""Train the toy world's VAE (issue 30): ComfyUI's own TAESD architecture (comfy/taesd/taesd.py, the smallest VAE
ComfyUI detects in a checkpoint), trained on freshly rendered scenes to reconstruct them, deterministically from a
seed.

Each step renders a new batch of scenes (tools/toy_world/world.py: no scene is seen twice), encodes, decodes, and
takes an Adam step on the pixel MSE plus a small penalty on the latents' size (TAESD's decoder soft-clamps its
input at +-3). Afterwards the latents of a fixed set of scenes give a per-channel-free scale and shift such that
the diffusion model sees latents of mean 0 and standard deviation 1 (written into TAESD's vae_scale / vae_shift,
which ComfyUI applies on encode and decode).

Usage: python tools/toy_world/train_vae.py OUT.safetensors [--steps 700] [--batch 16] [--seed 30] [--init W]
Writes OUT (the TAESD state dict, float32) and OUT.json (loss curve, scale, shift, reconstruction figures).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toy_world import world  # noqa: E402

SD15_SCALE = 0.18215           # ComfyUI's SD1.5 latent format multiplies by this after VAE encode


def to_tensor(images) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] in 0..1."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))
    return x.permute(0, 3, 1, 2).float() / 255


def init_(module: torch.nn.Module, seed: int) -> None:
    """torch's default init for every conv (ComfyUI's ops skip it), from a seed."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.Conv2d.reset_parameters(m)


def train(steps: int, batch: int, seed: int, lr: float, log_every: int = 25, init: Path | None = None,
          decoder_only: bool = False):
    import comfy.taesd.taesd as taesd_mod
    import comfy.utils
    torch.use_deterministic_algorithms(True)
    vae = taesd_mod.TAESD(latent_channels=4)
    init_(vae, seed)
    if init is not None:                # a second stage continues from the first's weights (new scenes, new lr)
        vae.load_state_dict(comfy.utils.load_torch_file(str(init)))
    # decoder_only: the encoder (and so every latent the diffusion model was trained on) stays as it is
    params = ([] if decoder_only else list(vae.taesd_encoder.parameters())) + list(vae.taesd_decoder.parameters())
    vae.taesd_encoder.requires_grad_(not decoder_only)
    opt = torch.optim.Adam(params, lr=lr)
    rng = random.Random(seed if init is None else f"{seed}:{init.name}")
    curve = []
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:      # short warm-up, then cosine to a tenth
            warm = min(1.0, (step + 1) / 50)
            g["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x = to_tensor([world.render(world.sample_scene(rng)) for _ in range(batch)])
        with torch.set_grad_enabled(not decoder_only):
            e = vae.taesd_encoder(x)
        y = vae.taesd_decoder(e)
        rec = (y - x).pow(2).mean()
        loss = rec + 1e-3 * e.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            curve.append({"step": step, "mse": float(rec.detach()), "seconds": round(time.time() - t0, 1)})
            print(f"vae step {step}/{steps} mse {float(rec.detach()):.5f} ({time.time() - t0:.0f} s)", flush=True)
    return vae, curve, time.time() - t0


@torch.no_grad()
def calibrate(vae, seed: int, n: int = 512):
    """Latent mean / std over n fresh scenes -> TAESD vae_scale, vae_shift (the model then sees unit-std latents)."""
    rng = random.Random(f"calibrate:{seed}")
    e = torch.cat([vae.taesd_encoder(to_tensor([world.render(world.sample_scene(rng)) for _ in range(64)]))
                   for _ in range(n // 64)])
    mean, std = float(e.mean()), float(e.std())
    # ComfyUI: latent = enc / vae_scale + vae_shift, model input = latent * 0.18215 (decode inverts both); for
    # model input = (enc - mean) / std: vae_scale = 0.18215 std, vae_shift = -mean / vae_scale.
    scale = std * SD15_SCALE
    shift = -mean / scale
    vae.vae_scale.fill_(scale)
    vae.vae_shift.fill_(shift)
    return mean, std


@torch.no_grad()
def reconstruction_report(vae, seed: int, n: int = 200):
    from toy_world.judge import iou, judge
    rng = random.Random(f"holdout:{seed}")
    sc = [world.sample_scene(rng) for _ in range(n)]
    x = to_tensor([world.render(s) for s in sc])
    y = vae.taesd_decoder(vae.taesd_encoder(x)).clamp(0, 1)
    mse = float((y - x).pow(2).mean())
    right, ious = 0, []
    imgs = (y.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for s, im in zip(sc, imgs):
        v = judge(im)
        right += int(v.found and (v.shape, v.colour, v.background) == (s.shape, s.colour, s.background))
        ious.append(iou(v.mask, np.asarray(world.object_mask(s)) >= 128))
    return {"n": n, "mse": mse, "psnr": 10 * math.log10(1 / mse), "judged_right": right,
            "mask_iou_mean": float(np.mean(ious))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", type=Path, default=None, help="continue from these TAESD weights (a second stage)")
    ap.add_argument("--decoder-only", action="store_true", help="train the decoder only (latents unchanged)")
    ap.add_argument("--comfyui", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from z2i.headless.host import find_host, import_comfy
    import_comfy(find_host(args.comfyui))
    import comfy.utils
    vae, curve, secs = train(args.steps, args.batch, args.seed, args.lr, init=args.init,
                              decoder_only=args.decoder_only)
    mean, std = calibrate(vae, args.seed)
    report = reconstruction_report(vae, args.seed)
    print("reconstruction:", report, flush=True)
    sd = {k: v.detach().float().contiguous() for k, v in vae.state_dict().items()}
    comfy.utils.save_torch_file(sd, str(args.out))
    args.out.with_suffix(".json").write_text(json.dumps(
        {"init": None if args.init is None else args.init.name, "decoder_only": args.decoder_only,
         "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, "threads": args.threads,
         "seconds": round(secs), "latent_mean": mean, "latent_std": std, "reconstruction": report,
         "curve": curve}, indent=1))


if __name__ == "__main__":
    main()
