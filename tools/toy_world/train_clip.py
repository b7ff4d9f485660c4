"""Train a tiny open_clip on the toy world (issue 30), for the CLIP losses that need a CLIP which knows the world:
Asyrp's trained h-space direction (directional CLIP loss, Eq. 4) in tools/evaluate.py. The tiny open_clip the
tests use (tools/make_tiny_open_clip.py) is random: its text direction "circle -> square" means nothing.

The model is open_clip's own `CLIP` class from a config (vision: 64 px, patch 8, 3 layers of width 128; text: 3
layers of width 128 with CLIP's vocabulary, so open_clip's bundled tokenizer works offline), trained
contrastively from a seed on freshly rendered scenes (tools/toy_world/world.py) and their canonical captions. A
batch holds each caption about twice, so the targets are soft: every image whose caption equals a text counts as
its match. Images are normalised with CLIP's mean and standard deviation, as the pack's loss feeds them
(guidance/clip_loss.py). Written where the pack's loader reads it: DEST/z2i-toy-clip.safetensors with the
sidecar config DEST/z2i-toy-clip.json. Not committed (26 MB): tools/evaluate.py trains it on first use (about
15 minutes on one core) and keeps it, keyed by a hash of this file and world.py.

Usage: python tools/toy_world/train_clip.py DEST_DIR [--steps 600] [--batch 128] [--seed 30]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toy_world import world  # noqa: E402

NAME = "z2i-toy-clip"
CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": world.SIZE, "layers": 3, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
MEAN = (0.48145466, 0.4578275, 0.40821073)       # CLIP's (open_clip OPENAI_DATASET_MEAN / STD)
STD = (0.26862954, 0.26130258, 0.27577711)


def code_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes() + (Path(__file__).parent / "world.py").read_bytes()
                          ).hexdigest()[:16]


def images(scenes) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(world.render(s), dtype=np.uint8) for s in scenes]))
    x = x.permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def train(steps: int, batch: int, seed: int, lr: float = 1e-3, log_every: int = 50):
    import open_clip
    torch.manual_seed(seed)
    model = open_clip.CLIP(**CONFIG)
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=CONFIG["text_cfg"]["context_length"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    rng = random.Random(f"clip:{seed}")
    curve, t0 = [], time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        scenes = [world.sample_scene(rng) for _ in range(batch)]
        caps = [world.caption(s) for s in scenes]
        fi = F.normalize(model.encode_image(images(scenes)), dim=-1)
        ft = F.normalize(model.encode_text(tok(caps)), dim=-1)
        logits = model.logit_scale.exp() * fi @ ft.t()
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % log_every == 0 or step == steps - 1:
            curve.append({"step": step, "loss": float(loss.detach()), "seconds": round(time.time() - t0, 1)})
            print(f"clip step {step}/{steps} loss {float(loss.detach()):.4f} ({time.time() - t0:.0f} s)", flush=True)
    return model.eval(), tok, curve, time.time() - t0


@torch.no_grad()
def zero_shot(model, tok, seed: int, n: int = 256) -> dict:
    """Held-out scenes: for each attribute, the caption with the right value among the four that differ only there
    is the nearest text (chance: 25%)."""
    rng = random.Random(f"clip-holdout:{seed}")
    scenes = [world.sample_scene(rng) for _ in range(n)]
    fi = F.normalize(model.encode_image(images(scenes)), dim=-1)
    values = {"shape": world.SHAPES, "colour": tuple(world.COLOURS), "background": world.BACKGROUNDS}
    out = {}
    for attr, vals in values.items():
        right = 0
        for i, s in enumerate(scenes):
            ft = F.normalize(model.encode_text(tok([world.caption(s.with_(**{attr: v})) for v in vals])), dim=-1)
            right += int(vals[int((ft @ fi[i]).argmax())] == getattr(s, attr))
        out[attr] = right / n
    return out


def ensure(dest: Path, steps: int = 600, batch: int = 128, seed: int = 30, log=print) -> Path:
    """DEST/z2i-toy-clip.safetensors (+ .json), trained once per version of this file and world.py."""
    import safetensors.torch
    weights, cfg = dest / f"{NAME}.safetensors", dest / f"{NAME}.json"
    stamp = dest / f"{NAME}.trained.json"
    key = {"code": code_hash(), "steps": steps, "batch": batch, "seed": seed}
    if weights.exists() and cfg.exists() and stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        return weights
    dest.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.enable_grad():
        model, tok, curve, secs = train(steps, batch, seed)
    acc = zero_shot(model, tok, seed)
    log(f"toy CLIP: {secs:.0f} s, zero-shot accuracy on held-out scenes {acc}")
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    cfg.write_text(json.dumps(CONFIG, indent=1))
    safetensors.torch.save_file(sd, str(weights), metadata={"z2i": "tiny open_clip trained on the toy world"})
    stamp.write_text(json.dumps({"key": key, "seconds": round(secs), "zero_shot": acc, "curve": curve}, indent=1))
    return weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(ensure(args.dest, args.steps, args.batch, args.seed))


if __name__ == "__main__":
    main()
