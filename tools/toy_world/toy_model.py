"""The toy world's checkpoint (issue 30): expand the committed low-rank factors into the full SD1.5-topology
checkpoint ComfyUI loads, and sample it.

What is committed (tools/toy_world/weights/, about 15 MB, float16): the UNet's trained factors and small layers
(train_unet.py) and the trained TAESD (train_vae.py). The text encoder is not committed: it is the seeded random
CLIP-L that tools/make_tiny_checkpoints.py builds (the UNet learned from its embeddings). `build` multiplies each
factor pair back into its full weight (W = B A, in float32, stored float16 as the tiny checkpoints are), adds the
CLIP and the VAE, writes z2i-toy-sd15.safetensors and reloads it through ComfyUI's own loader, asserting that
ComfyUI detects SD1.5 / epsilon.

    python tools/toy_world/toy_model.py build OUT.safetensors
    python tools/toy_world/toy_model.py sample CKPT OUT_DIR [--n 100]    # the judge on seeded samples
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
WEIGHTS = HERE / "weights"
FACTORS = WEIGHTS / "unet_factors.safetensors"
VAE = WEIGHTS / "vae.safetensors"
NAME = "z2i-toy-sd15.safetensors"


def expand(factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Factor pairs '<layer>.a.weight' / '<layer>.b.weight' (+ '.b.bias') -> '<layer>.weight' (+ '.bias')."""
    out = {}
    for k, v in factors.items():
        if k.endswith(".a.weight"):
            layer = k[: -len(".a.weight")]
            a = v.float()
            b = factors[layer + ".b.weight"].float()
            w = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
            out[layer + ".weight"] = w.reshape(b.shape[0], *a.shape[1:])
            if layer + ".b.bias" in factors:
                out[layer + ".bias"] = factors[layer + ".b.bias"].float()
        elif ".b." in k and k.rsplit(".", 2)[0] + ".a.weight" in factors:
            continue
        else:
            out[k] = v.float()
    return out


def build(out_path: Path, factors_path: Path = FACTORS, vae_path: Path = VAE) -> None:
    import comfy.sd
    import comfy.supported_models as sm
    import comfy.taesd.taesd
    import comfy.utils
    from make_tiny_checkpoints import SEED, randomize_
    from toy_world.train_unet import UNET_CONFIG

    model_config = sm.SD15(dict(UNET_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    unet_sd = expand(comfy.utils.load_torch_file(str(factors_path)))
    missing, unexpected = model.diffusion_model.load_state_dict(unet_sd, strict=False)
    if missing or unexpected:
        raise SystemExit(f"toy UNet weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")

    clip = comfy.sd.CLIP(model_config.clip_target(), parameters=0)
    randomize_(clip.cond_stage_model, SEED + 2)          # the same CLIP the UNet was trained with
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    taesd.load_state_dict(comfy.utils.load_torch_file(str(vae_path)))

    sd = model.state_dict_for_saving(clip.get_sd(), taesd.state_dict(), None)
    sd = {k: (v.contiguous().half() if v.is_floating_point() and v.numel() > 1 else v.contiguous())
          for k, v in sd.items()}
    tmp = out_path.with_name(out_path.stem + ".partial.safetensors")
    comfy.utils.save_torch_file(sd, str(tmp), metadata={"z2i_toy": "sd15"})
    m, c, v, _ = comfy.sd.load_checkpoint_guess_config(str(tmp), output_vae=True, output_clip=True)
    got = (type(m.model.model_config).__name__, m.model.model_type.name)
    if got != ("SD15", "EPS") or c is None or v is None:
        raise SystemExit(f"{out_path.name}: ComfyUI detected {got}, expected SD15/EPS with CLIP and VAE")
    tmp.replace(out_path)
    logging.info("wrote %s (%.0f MB)", out_path, out_path.stat().st_size / 2**20)


def load(ckpt: Path):
    import comfy.sd
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)
    return model, clip, vae


def encode(clip, text: str):
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


@torch.no_grad()
def generate(model, clip, vae, prompts: list[str], seed: int, steps: int = 30, cfg: float = 5.0,
             sampler: str = "ddim", scheduler: str = "ddim_uniform") -> np.ndarray:
    """Text to image with ComfyUI's own sampler: one image per prompt, noise from seed + index. -> uint8 [N,H,W,3]"""
    import comfy.sample
    from toy_world.world import SIZE
    neg = encode(clip, "")
    out = []
    for i, p in enumerate(prompts):
        latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
        noise = comfy.sample.prepare_noise(latent, seed + i)
        s = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, encode(clip, p), neg, latent,
                                denoise=1.0, disable_pbar=True, seed=seed + i)
        img = vae.decode(s)
        out.append((img[0].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
    return np.stack(out)


def sample_check(ckpt: Path, out_dir: Path, n: int = 100, seed: int = 0, steps: int = 30, cfg: float = 5.0) -> dict:
    """n seeded scenes' captions -> images; the judge's verdict on each attribute. Writes a grid PNG and a JSON."""
    from PIL import Image

    from toy_world.judge import judge
    from toy_world.world import caption, sample_scene
    model, clip, vae = load(ckpt)
    rng = random.Random(f"samples:{seed}")
    scenes = [sample_scene(rng) for _ in range(n)]
    imgs = generate(model, clip, vae, [caption(s) for s in scenes], seed, steps=steps, cfg=cfg)
    right = {"shape": 0, "colour": 0, "background": 0, "all": 0, "found": 0}
    for s, im in zip(scenes, imgs):
        v = judge(im)
        ok = [v.found and getattr(v, a) == getattr(s, a) for a in ("shape", "colour", "background")]
        for a, o in zip(("shape", "colour", "background"), ok):
            right[a] += int(o)
        right["all"] += int(all(ok))
        right["found"] += int(v.found)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = 10
    rows = (n + cols - 1) // cols
    h, w = imgs.shape[1:3]
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = im
    Image.fromarray(grid).save(out_dir / "samples.png")
    report = {"n": n, "seed": seed, "steps": steps, "cfg": cfg, "right": right,
              "captions": [caption(s) for s in scenes]}
    (out_dir / "samples.json").write_text(json.dumps(report, indent=1))
    return report


def loss_figure(out: Path) -> None:
    """The model card's training curves (from the JSON files the trainers wrote next to the weights). matplotlib is
    a benchmark-only dependency: installed into the benchmark's own folder on first use."""
    import peer_pix2pix_zero
    peer_pix2pix_zero.ensure_bench_deps()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    vae_steps, vae_mse, offset = [], [], 0
    for name in ("vae_stage1.json", "vae_stage2.json", "vae_decoder.json"):
        p = WEIGHTS / name
        if p.exists():
            curve = json.loads(p.read_text())["curve"]
            vae_steps += [offset + c["step"] for c in curve]
            vae_mse += [c["mse"] for c in curve]
            offset = vae_steps[-1] + 1
    axes[0].semilogy(vae_steps, vae_mse)
    axes[0].set(title="VAE (TAESD): pixel MSE", xlabel="step (all stages)")
    unet = json.loads((WEIGHTS / "unet.json").read_text())["curve"]
    axes[1].plot([c["step"] for c in unet], [c["mse"] for c in unet])
    axes[1].set(title="UNet: epsilon MSE (mean of 50 steps)", xlabel="step", ylim=(0, None))
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out", type=Path)
    b.add_argument("--factors", type=Path, default=FACTORS)
    b.add_argument("--vae", type=Path, default=VAE)
    s = sub.add_parser("sample")
    s.add_argument("ckpt", type=Path)
    s.add_argument("out_dir", type=Path)
    s.add_argument("--n", type=int, default=100)
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--cfg", type=float, default=5.0)
    f = sub.add_parser("figure")
    f.add_argument("out", type=Path)
    for p in (b, s):
        p.add_argument("--comfyui", default=None)
    args = ap.parse_args()
    if args.cmd == "figure":
        loss_figure(args.out)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from z2i.headless.host import find_host, import_comfy
    import_comfy(find_host(args.comfyui))
    if args.cmd == "build":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        build(args.out, args.factors, args.vae)
    else:
        print(json.dumps(sample_check(args.ckpt, args.out_dir, args.n, steps=args.steps, cfg=args.cfg)["right"]))


if __name__ == "__main__":
    main()
