"""The measurements of tools/gpu_check.sh on a CUDA GPU (issue 28): fp16 vs fp32 guidance, batch 1 vs 4, peak VRAM
per method at 512 px. Not a test: it prints and writes a summary table (Markdown) and exits non-zero only when a
run fails. Uses the tests' graph builders on the tiny checkpoints (tools/setup.sh), in ComfyUI booted in process.

    Z2I_DEVICE=cuda python tools/gpu_check.py --out out/gpu_check
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".host" / "pythonpath"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=REPO / "out" / "gpu_check")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    from z2i.headless.host import Host
    from z2i.tests import test_agg_nodes, test_pix2pix_zero
    from z2i.tests.helpers import run_sampler_with_stats, with_settings

    host = Host.get(output_dir=args.out / "images", device=os.environ.get("Z2I_DEVICE", "cuda"))
    ckpt = "z2i-tiny-sd15.safetensors"
    cuda = torch.cuda.is_available()
    rows = []

    def builders(size, batch):
        def p2p(lam):
            p = test_pix2pix_zero.graph(ckpt, lam, steps=args.steps, batch=batch)
            p["scale"]["inputs"].update(width=size, height=size)
            return p, "edit"

        def agg():
            p = test_agg_nodes.graph(ckpt, weight=1.0, steps=args.steps)
            p["scale"]["inputs"].update(width=size, height=size)
            p["rep"]["inputs"]["amount"] = batch
            return p, "tgt"

        def plain():
            p, pos = p2p(0.0)
            p["sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
            return p, pos

        def ddim():
            p, pos = p2p(0.0)
            p["sampler"] = {"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}}
            return p, pos

        return {"plain (core euler)": plain, "Z2I DDIM": ddim, "pix2pix-zero": lambda: p2p(0.1), "AGG": agg}

    def measure(p, pos):
        host.run_prompt(p, targets=["inv"], fresh_cache=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            out, stats = run_sampler_with_stats(host, p, pos, "src" if pos == "tgt" else "pos", 5.0)
        except TypeError:           # a core sampler takes no stats
            out, stats = host.run_prompt(p, targets=["s"], fresh_cache=True).output("s", 0)["samples"], {}
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else float("nan")
        return out, stats, time.perf_counter() - t0, peak

    # peak VRAM per method at the working size, auto / fast / low
    for name, build in builders(args.size, 1).items():
        for mode in ("auto", "fast", "low") if name in ("pix2pix-zero", "AGG") else ("auto",):
            p, pos = build()
            with_settings(p, memory=mode)
            _, stats, secs, peak = measure(p, pos)
            rows.append(("peak VRAM", name, f"{args.size} px, memory {mode}", f"{peak:.0f} MB",
                         f"{secs:.2f} s, mode used {stats.get('memory_mode', '-')}"))
    # batch 1 vs 4
    for name in builders(args.size, 1):
        times = {}
        for batch in (1, 4):
            p, pos = builders(args.size, batch)[name]()
            _, _, secs, peak = measure(p, pos)
            times[batch] = secs
        rows.append(("batch 4 / 4 x batch 1", name, f"{args.size} px", f"{times[4] / (4 * times[1]):.2f}",
                     f"{times[1]:.2f} s / {times[4]:.2f} s"))
    # fp16 vs fp32 guidance
    for name in ("pix2pix-zero", "AGG"):
        ref, _, _, _ = measure(*builders(args.size, 1)[name]())
        p, pos = builders(args.size, 1)[name]()
        p["dt"] = {"class_type": "ModelComputeDtype", "inputs": {"model": ["ckpt", 0], "dtype": "fp16"}}
        for key in ("inv", "s"):
            p[key]["inputs"]["model"] = ["dt", 0]
        half, stats, _, _ = measure(p, pos)
        rel = float((half.float() - ref.float()).norm() / ref.float().norm())
        rows.append(("fp16 vs fp32 edit", name, f"{args.size} px", f"{rel:.2e}",
                     f"loss scaled {stats.get('loss_scaled')}, scale {stats.get('loss_scale')}"))
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    lines = [f"# GPU check ({device}, torch {torch.__version__})", "", "| check | method | case | value | notes |",
             "|---|---|---|---|---|"] + [f"| {' | '.join(r)} |" for r in rows]
    text = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
