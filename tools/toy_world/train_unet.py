"""Train the toy world's diffusion model (issue 30): a shallow SD1.5-topology UNet with low-rank weights.

The network is ComfyUI's own UNetModel at SD1.5's widths (320 model channels, 768-wide context, 8 heads: what
ComfyUI detects as SD1.x), made as shallow as the detection allows (channel_mult 1,1: an 8x8 and a 4x4 level,
one res block per level, one transformer block on each level and in the middle; for 64 px images). Every large
linear and conv weight W [out, in(, k, k)] is trained as a product W = B A of rank R (A: in*k*k -> R, B: R -> out,
run as two layers), which cuts the compute several times; the small layers (conv_in, out, norms, biases) are
trained as they are. tools/toy_world/toy_model.py expands the factors into full weights and writes the
checkpoint ComfyUI loads.

Data: scenes rendered from a seed (tools/toy_world/world.py), encoded once by the trained toy VAE
(train_vae.py) into unit-std latents; captions drawn per sample: the canonical caption, one of the sentence
bank's phrasings filled with the scene's own attributes, or (10%) the empty prompt for classifier-free
guidance. The text encoder is the seeded random CLIP-L of the tiny checkpoints (tools/make_tiny_checkpoints.py);
its embedding of every caption is computed once through ComfyUI's own encode and cached.

Objective: SD1.5's DDPM (scaled-linear betas 0.00085..0.012, 1000 steps), epsilon prediction, min-SNR-5
weighting, AdamW with warm-up and cosine decay, gradient clipping, an EMA of the weights (what is exported).

Usage: python tools/toy_world/train_unet.py VAE.safetensors OUT_DIR [--steps N] [--batch B] [--rank R]
Writes OUT_DIR/unet_factors.safetensors (EMA weights, factors + small layers, float16) and OUT_DIR/unet.json
(config, loss curve, time). Resumable: OUT_DIR/state.pt is written every few minutes.
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

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "in_channels": 4, "model_channels": 320, "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1], "channel_mult": [1, 1], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
    "adm_in_channels": None, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
}
MIN_FACTOR_DIM = 256           # a weight is factorised when both its sides (out, in*k*k) are at least this


# -- low-rank layers ---------------------------------------------------------------------------------------------
class LowRank(torch.nn.Module):
    """W = B @ A for a Linear or Conv2d, run as two layers (A keeps the kernel, stride, padding; B is 1x1)."""

    def __init__(self, layer: torch.nn.Module, rank: int, zero: bool, gen: torch.Generator):
        super().__init__()
        conv = isinstance(layer, torch.nn.Conv2d)
        out_f = layer.out_channels if conv else layer.out_features
        in_f = layer.in_channels if conv else layer.in_features
        if conv:
            self.a = torch.nn.Conv2d(in_f, rank, layer.kernel_size, layer.stride, layer.padding, bias=False)
            self.b = torch.nn.Conv2d(rank, out_f, 1, bias=layer.bias is not None)
        else:
            self.a = torch.nn.Linear(in_f, rank, bias=False)
            self.b = torch.nn.Linear(rank, out_f, bias=layer.bias is not None)
        fan_in = self.a.weight[0].numel()
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(self.a.weight.shape, generator=gen) / math.sqrt(fan_in))
            if zero:
                self.b.weight.zero_()
            else:
                self.b.weight.copy_(torch.randn(self.b.weight.shape, generator=gen) / math.sqrt(rank)
                                    / math.sqrt(3))
            if self.b.bias is not None:
                self.b.bias.zero_()
        self.shape = tuple(layer.weight.shape)

    def forward(self, x):
        return self.b(self.a(x))

    def full(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        a = self.a.weight.reshape(self.a.weight.shape[0], -1).float()
        b = self.b.weight.reshape(self.b.weight.shape[0], -1).float()
        w = (b @ a).reshape(self.shape)
        return w, (None if self.b.bias is None else self.b.bias.float())


def _zero_init(name: str) -> bool:
    """Residual branches' last layers start at zero (the block starts as identity): the res blocks' second conv,
    the transformers' proj_out and the attention outputs."""
    return name.endswith("out_layers.3") or name.endswith("proj_out") or name.endswith("to_out.0") \
        or name.endswith("ff.net.2")


def build_unet(rank: int, seed: int):
    """ComfyUI's UNetModel with the toy config, its large layers replaced by LowRank, from a seed."""
    import comfy.model_base  # noqa: F401
    import comfy.supported_models as sm
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    cfg = dict(UNET_CONFIG)
    model_config = sm.SD15(cfg)
    unet_cfg = dict(model_config.unet_config)
    unet_cfg.pop("disable_unet_model_creation", None)
    import comfy.ops
    unet = UNetModel(**unet_cfg, device="cpu", operations=comfy.ops.disable_weight_init)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():               # torch's default init for the layers that stay full (ComfyUI skips it)
        for name, m in unet.named_modules():
            for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
                if isinstance(m, base):
                    base.reset_parameters(m)
                    break
        out = unet.out[-1]
        out.weight.zero_()
        out.bias.zero_()
    factored = []
    for name, m in list(unet.named_modules()):
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w = m.weight
        if min(w.shape[0], w[0].numel()) < MIN_FACTOR_DIM:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, LowRank(m, rank, _zero_init(name), gen))
        factored.append(name)
    return unet, factored


def full_state_dict(unet) -> dict[str, torch.Tensor]:
    """The factored UNet's weights as the full UNetModel's state dict (keys as ComfyUI names them)."""
    sd = {}
    lowrank = {n: m for n, m in unet.named_modules() if isinstance(m, LowRank)}
    for n, m in lowrank.items():
        w, b = m.full()
        sd[n + ".weight"] = w
        if b is not None:
            sd[n + ".bias"] = b
    for k, v in unet.state_dict().items():
        owner = k.rsplit(".", 2)[0]
        if owner in lowrank:
            continue
        sd[k] = v.float()
    return sd


# -- data ----------------------------------------------------------------------------------------------------------
def caption_templates() -> list[str]:
    """The canonical caption and every sentence-bank phrasing, as templates over {shape} {colour} {background}."""
    out = ["a {colour} {shape} on a {background} background"]
    for attr, phrases in world.PHRASES.items():
        key = {"shape": "shape", "colour": "colour", "background": "background"}[attr]
        for p in phrases:
            t = p.replace("{v}", "{" + key + "}")
            if t not in out:
                out.append(t)
    return out


def tiny_clip():
    """The seeded random CLIP-L of tools/make_tiny_checkpoints.py (the same weights the checkpoint carries)."""
    import comfy.sd
    import comfy.supported_models as sm
    from make_tiny_checkpoints import SEED, randomize_
    target = sm.SD15(dict(UNET_CONFIG)).clip_target()
    clip = comfy.sd.CLIP(target, parameters=0)
    randomize_(clip.cond_stage_model, SEED + 2)
    with torch.no_grad():               # the checkpoint stores it in float16: embed with exactly those weights
        for p in clip.cond_stage_model.parameters():
            if p.is_floating_point():
                p.copy_(p.half().float())
    return clip


@torch.no_grad()
def embed(clip, texts: list[str]) -> torch.Tensor:
    out = []
    for t in texts:
        cond = clip.encode_from_tokens(clip.tokenize(t))
        out.append(cond[0].float())
    return torch.stack(out)


def make_latents(vae, n: int, seed: int, batch: int = 64):
    """n scenes from the seed, their unit-std latents (as the UNet sees them inside ComfyUI) and attributes."""
    from train_vae import SD15_SCALE, to_tensor
    rng = random.Random(f"train:{seed}")
    scenes = [world.sample_scene(rng) for _ in range(n)]
    lat = []
    with torch.no_grad():
        for i in range(0, n, batch):
            x = to_tensor([world.render(s) for s in scenes[i:i + batch]])
            lat.append(vae.encode(x * 2 - 1) * SD15_SCALE)       # ComfyUI: encode(-1..1), then * scale_factor
    return torch.cat(lat), scenes


def sd15_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


# -- training ------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vae", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scenes", type=int, default=16000)
    ap.add_argument("--seed", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench", type=int, default=0, help="time this many steps and stop")
    ap.add_argument("--comfyui", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from z2i.headless.host import find_host, import_comfy
    import_comfy(find_host(args.comfyui))
    import comfy.taesd.taesd as taesd_mod
    import comfy.utils
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    unet, factored = build_unet(args.rank, args.seed)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"unet: {n_params / 1e6:.2f}M trained parameters, {len(factored)} layers at rank {args.rank}", flush=True)

    templates = caption_templates()
    cache = args.out_dir / "captions.pt"
    if cache.exists():
        texts, emb = torch.load(cache)
    else:
        clip = tiny_clip()
        texts = [""]
        for shape in world.SHAPES:
            for colour in sorted(world.COLOURS):
                for bg in world.BACKGROUNDS:
                    for t in templates:
                        s = t.format(shape=shape, colour=colour, background=bg)
                        if s not in texts:
                            texts.append(s)
        t0 = time.time()
        emb = embed(clip, texts).half()
        del clip
        torch.save((texts, emb), cache)
        print(f"embedded {len(texts)} captions in {time.time() - t0:.0f} s", flush=True)
    index = {t: i for i, t in enumerate(texts)}

    lat_cache = args.out_dir / "latents.pt"
    if lat_cache.exists():
        lat, attrs = torch.load(lat_cache)
    else:
        vae = taesd_mod.TAESD(latent_channels=4)
        vae.load_state_dict(comfy.utils.load_torch_file(str(args.vae)))
        t0 = time.time()
        lat, scenes = make_latents(vae, args.scenes, args.seed)
        attrs = [(s.shape, s.colour, s.background) for s in scenes]
        torch.save((lat, attrs), lat_cache)
        print(f"encoded {len(attrs)} scenes in {time.time() - t0:.0f} s; latent mean {float(lat.mean()):.3f} "
              f"std {float(lat.std()):.3f}", flush=True)
    canon = torch.tensor([index[templates[0].format(shape=a, colour=c, background=b)] for a, c, b in attrs])
    per_template = torch.tensor([[index[t.format(shape=a, colour=c, background=b)] for t in templates]
                                 for a, c, b in attrs])

    acp = sd15_alphas_cumprod().float()
    snr = acp / (1 - acp)
    weight = torch.clamp(snr, max=5.0) / snr                # min-SNR-5, epsilon prediction

    params = [p for p in unet.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(args.seed + 1)
    curve, start = [], 0
    state_path = args.out_dir / "state.pt"
    if state_path.exists() and not args.bench:
        st = torch.load(state_path)
        unet.load_state_dict(st["unet"])
        opt.load_state_dict(st["opt"])
        for e, v in zip(ema, st["ema"]):
            e.copy_(v)
        gen.set_state(st["gen"])
        curve, start = st["curve"], st["step"]
        print(f"resumed at step {start}", flush=True)
    unet.train()
    t0, last_save, run_loss = time.time(), time.time(), []
    steps = args.bench or args.steps
    for step in range(start, steps):
        warm = min(1.0, (step + 1) / 200)
        lr = args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, lat.shape[0], (args.batch,), generator=gen)
        x0 = lat[idx]
        u = torch.rand(args.batch, generator=gen)
        tmpl = torch.randint(0, len(templates), (args.batch,), generator=gen)
        cap = torch.where(u < 0.5, canon[idx], per_template[idx, tmpl])
        cap = torch.where(u > 0.9, torch.zeros_like(cap), cap)
        ctx = emb[cap].float()
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(xt, t.float(), context=ctx)
        per = (pred - eps).pow(2).mean(dim=(1, 2, 3))
        loss = (per * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - d)
        run_loss.append(float(per.mean().detach()))
        if step % 50 == 0 or step == steps - 1:
            el = time.time() - t0
            curve.append({"step": step, "mse": float(np.mean(run_loss)), "lr": lr, "seconds": round(el, 1)})
            run_loss = []
            rate = (step + 1 - start) / max(el, 1e-9)
            print(f"step {step}/{steps} mse {curve[-1]['mse']:.4f} lr {lr:.2e} {el:.0f} s "
                  f"({1 / rate:.2f} s/step, eta {(steps - step - 1) / rate / 60:.0f} min)", flush=True)
        if not args.bench and (time.time() - last_save > 300 or step == steps - 1):
            torch.save({"unet": unet.state_dict(), "opt": opt.state_dict(), "ema": ema, "gen": gen.get_state(),
                        "curve": curve, "step": step + 1}, state_path)
            last_save = time.time()
    if args.bench:
        return
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    factors = {k: v.detach().half().contiguous() for k, v in unet.state_dict().items()}
    comfy.utils.save_torch_file(factors, str(args.out_dir / "unet_factors.safetensors"),
                                metadata={"rank": str(args.rank), "config": json.dumps(UNET_CONFIG)})
    (args.out_dir / "unet.json").write_text(json.dumps(
        {"config": UNET_CONFIG, "rank": args.rank, "factored_layers": len(factored), "params": n_params,
         "steps": steps, "batch": args.batch, "lr": args.lr, "scenes": args.scenes, "seed": args.seed,
         "threads": args.threads, "captions": len(texts), "seconds_total": round(time.time() - t_start),
         "curve": curve}, indent=1))
    print("done", flush=True)


if __name__ == "__main__":
    main()
