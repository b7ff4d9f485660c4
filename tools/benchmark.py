"""Cost of every Z2I method against plain ComfyUI DDIM sampling, as ratios measured in one run.

    PYTHONPATH=.host/pythonpath .venv/bin/python tools/benchmark.py [--steps 10] [--sizes 64,128] [--repeats 3]
        [--write BENCHMARKS.md]

Everything runs in one process on the tiny SD1.5-topology checkpoint through the real ComfyUI host. Each
method's graph is run once to warm up (model load, text encodes, inversion and other upstream nodes are then
cached); then only the method's own node is re-run `repeats` times (a changed unused seed invalidates just
that node) and the median wall time is divided by the median of plain sampling (core KSamplerSelect 'ddim'
through SamplerCustom) of the same size and steps. Machines are noisy: only the ratios mean something.

Per method it also reports UNet forward calls per step (counted by a forward hook, in batch rows: a CFG call
of cond + uncond counts 2) and backward passes per step (a hook on the UNet output's gradient), and the peak
resident memory above the pre-run level (RSS polled every 5 ms).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CKPT = "z2i-tiny-sd15.safetensors"


class Meter:
    """UNet rows/backwards counters and an RSS peak sampler around one run."""

    def __init__(self, unet):
        import psutil
        import torch
        self.proc = psutil.Process()
        self.rows = self.backwards = 0
        self._peak = 0
        self._run = False

        def fwd(module, args, output):
            self.rows += int(args[0].shape[0])
            # a backward pass through the UNet reaches its input (guidance losses need not use its output)
            if isinstance(args[0], torch.Tensor) and args[0].requires_grad:
                args[0].register_hook(self._count_backward)

        self.handle = unet.register_forward_hook(fwd)

    def _count_backward(self, grad):
        self.backwards += 1
        return grad

    def _poll(self):
        while self._run:
            self._peak = max(self._peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        import ctypes
        import gc
        gc.collect()
        try:   # hand freed heap back to the OS so the RSS peak shows this run's own allocations
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.rows = self.backwards = 0
        self.base = self.proc.memory_info().rss
        self._peak = self.base
        self._run = True
        self.t = threading.Thread(target=self._poll, daemon=True)
        self.t.start()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.start
        self._run = False
        self.t.join()
        self.peak_extra = max(0, self._peak - self.base)


def base_graph(size: int, steps: int) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "src": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat on a sofa", "clip": ["ckpt", 1]}},
        "tgt": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a dog on a sofa", "clip": ["ckpt", 1]}},
        "img": {"class_type": "LoadImage", "inputs": {"image": "z2i_example.png"}},
        "scale": {"class_type": "ImageScale", "inputs": {"image": ["img", 0], "upscale_method": "bilinear",
                                                         "width": size, "height": size, "crop": "disabled"}},
        "enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["scale", 0], "vae": ["ckpt", 2]}},
        "inv": {"class_type": "Z2I_DDIMInversion", "inputs": {
            "model": ["ckpt", 0], "positive": ["src", 0], "latent": ["enc", 0], "steps": steps,
            "scheduler": "ddim_uniform", "variant": "current level", "cfg": 1.0, "denoise": 1.0,
            "refine_iterations": 0, "regularize": False, "reg_lambda": 20.0, "reg_iterations": 5, "reg_seed": 0}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": "ddim_uniform",
                                                              "steps": steps, "denoise": 1.0}},
    }


def sampling(sampler: dict, positive="tgt", model=("ckpt", 0), cfg=5.0) -> dict:
    return {"sampler": sampler, "s": {"class_type": "SamplerCustom", "inputs": {
        "model": list(model), "add_noise": False, "noise_seed": 0, "cfg": cfg, "positive": [positive, 0],
        "negative": ["src", 0], "sampler": ["sampler", 0], "sigmas": ["inv", 2], "latent_image": ["inv", 0]}}}


def methods(steps: int) -> dict[str, tuple[dict, str, str]]:
    """name -> (extra nodes, node to time, seed input of that node used to invalidate it)."""
    ddim = {"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}}
    return {
        "plain ComfyUI DDIM (core 'ddim')": (sampling({"class_type": "KSamplerSelect",
                                                        "inputs": {"sampler_name": "ddim"}}), "s", "noise_seed"),
        "Z2I DDIM sampler": (sampling(ddim), "s", "noise_seed"),
        "DDIM inversion": ({}, "inv", "reg_seed"),
        "pix2pix-zero edit (reference branch + guidance)": ({
            "dir": {"class_type": "Z2I_EditDirection", "inputs": {"clip": ["ckpt", 1], "source": "cat",
                                                                  "target": "dog", "num_sentences": 8, "seed": 0}},
            "edit": {"class_type": "Z2I_ApplyEditDirection", "inputs": {"conditioning": ["src", 0],
                                                                        "direction": ["dir", 0], "strength": 1.0}},
            **sampling({"class_type": "Z2I_Pix2PixZeroSampler", "inputs": {
                "xa_guidance": 0.1, "layers": "input,middle,output", "map_precision": "fp32"}}, positive="edit")},
            "s", "noise_seed"),
        "pix2pix-zeroCon edit (+ PatchNCE, 256 patches)": ({
            "dir": {"class_type": "Z2I_EditDirection", "inputs": {"clip": ["ckpt", 1], "source": "cat",
                                                                  "target": "dog", "num_sentences": 8, "seed": 0}},
            "edit": {"class_type": "Z2I_ApplyEditDirection", "inputs": {"conditioning": ["src", 0],
                                                                        "direction": ["dir", 0], "strength": 1.0}},
            **sampling({"class_type": "Z2I_Pix2PixZeroConSampler", "inputs": {
                "lambda_step": 0.1, "lambda_c": 1.0, "lambda_e": 0.5, "feature_layers": "output", "n_patches": 256,
                "tau": 0.07, "seed": 0, "layers": "input,middle,output"}}, positive="edit")}, "s", "noise_seed"),
        "CSG (mixup + posterior guidance; sampler only)": ({
            "mask": {"class_type": "Z2I_CSGMask", "inputs": {
                "model": ["ckpt", 0], "clip": ["ckpt", 1], "inversion": ["inv", 1],
                "caption": "a photo of a cat on a sofa", "word": "cat", "token_level": 2, "mask_level": 1}},
            "mix": {"class_type": "Z2I_CrossAttentionMixup", "inputs": {"model": ["ckpt", 0],
                                                                        "background": ["mask", 0], "strength": 1.0}},
            **sampling({"class_type": "Z2I_CSGSampler", "inputs": {
                "inversion": ["inv", 1], "background": ["mask", 0], "lambda_pre": 15.0, "delta": 1.5,
                "clamp_pull": True}}, model=("mix", 0))}, "s", "noise_seed"),
        "CSG content mask (once per image)": ({
            "mask": {"class_type": "Z2I_CSGMask", "inputs": {
                "model": ["ckpt", 0], "clip": ["ckpt", 1], "inversion": ["inv", 1],
                "caption": "a photo of a cat on a sofa", "word": "cat", "token_level": 2, "mask_level": 1}}},
            "mask", None),
        "AGG (guided 30% of steps, DDS 10)": (sampling({"class_type": "Z2I_AGGSampler", "inputs": {
            "inversion": ["inv", 1], "lambda_reg": 0.1, "guided_until": 0.3, "masked_until": 0.8, "dds_steps": 10,
            "dds_lr": 0.01, "eta": 0.0}}, cfg=5.0), "s", "noise_seed"),
        "Asyrp (edit interval 50%)": ({
            "dir": {"class_type": "Z2I_HDirectionFromPrompts", "inputs": {"model": ["ckpt", 0], "inversion": ["inv", 1],
                                                                          "target": ["tgt", 0]}},
            **sampling({"class_type": "Z2I_AsyrpSampler", "inputs": {
                "direction": ["dir", 0], "scale": 1.0, "unit": "percent", "edit_until": 0.5, "boost_from": 1.0}},
                positive="src", cfg=1.0)}, "s", "noise_seed"),
    }


NOT_IMPLEMENTED: list[str] = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sizes", default="64,128", help="image sizes in pixels (latent = size / 8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", type=Path, help="also write the results as a markdown table to this file")
    args = ap.parse_args()

    import logging
    logging.basicConfig(level=logging.ERROR)
    import torch
    from z2i.headless.host import Host
    host = Host.get()
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        plain_time = None
        for name, (extra, node, seed_input) in methods(args.steps).items():
            prompt = {**base_graph(size, args.steps), **extra}
            res = host.run_prompt(prompt, targets=[node, "ckpt"])          # warm-up: caches everything upstream
            unet = res.output("ckpt", 0).model.diffusion_model
            times, rows, backs, peaks = [], [], [], []
            for r in range(args.repeats):
                if seed_input:
                    prompt[node]["inputs"][seed_input] = r + 1
                else:
                    prompt[node]["inputs"]["token_level"] = [2, 3][r % 2]     # re-run the mask node
                with Meter(unet) as m:
                    host.run_prompt(prompt, targets=[node])
                m.handle.remove()
                times.append(m.elapsed)
                rows.append(m.rows / args.steps)
                backs.append(m.backwards / args.steps)
                peaks.append(m.peak_extra / 2**20)
            t = statistics.median(times)
            if plain_time is None:
                plain_time = t
            results.append({"size": size, "method": name, "seconds": t, "ratio": t / plain_time,
                            "unet_rows_per_step": statistics.median(rows),
                            "backward_per_step": statistics.median(backs),
                            "peak_extra_mb": statistics.median(peaks)})
            print(f"{size:4d}px  {name:50s} {t:7.2f}s  x{t / plain_time:5.2f}  rows/step {results[-1]['unet_rows_per_step']:.1f}"
                  f"  backward/step {results[-1]['backward_per_step']:.1f}  peak +{results[-1]['peak_extra_mb']:.0f} MB",
                  flush=True)
        # pix2pix-zero reference maps: one step held (lockstep) against what storing every step would take
        import comfy.sample
        import comfy.samplers
        prompt = {**base_graph(size, args.steps), **methods(args.steps)["pix2pix-zero edit (reference branch + guidance)"][0]}
        res = host.run_prompt(prompt, targets=["sampler", "inv", "edit", "src", "ckpt"])
        stats = {}
        s = res.output("sampler", 0)
        sampler = comfy.samplers.KSAMPLER(s.sampler_function, extra_options={**s.extra_options, "stats": stats})
        noise = res.output("inv", 0)["samples"]
        with torch.inference_mode():
            comfy.sample.sample_custom(res.output("ckpt", 0), torch.zeros_like(noise), 5.0, sampler, res.output("inv", 2),
                                       res.output("edit", 0), res.output("src", 0), noise)
        one = stats["ref_step_bytes"] / 2**20
        results.append({"size": size, "method": "pix2pix-zero reference maps held", "lockstep_mb": one,
                        "all_steps_mb": one * stats["steps"], "peak_steps": stats["ref_peak_steps"]})
        print(f"{size:4d}px  pix2pix-zero reference maps: {one:.2f} MB held (1 step, peak steps "
              f"{stats['ref_peak_steps']}) vs {one * stats['steps']:.2f} MB to store all {stats['steps']} steps",
              flush=True)
    for name in NOT_IMPLEMENTED:
        print(f"{name}: not implemented yet")
    if args.write:
        write_markdown(args.write, results, args)
    print(json.dumps(results, indent=1))


def write_markdown(path: Path, results: list, args) -> None:
    import torch
    lines = [
        "# Benchmarks", "",
        "Produced by `PYTHONPATH=.host/pythonpath .venv/bin/python tools/benchmark.py "
        f"--steps {args.steps} --sizes {args.sizes} --repeats {args.repeats} --write BENCHMARKS.md` "
        "(see the script's docstring for the method).", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} on CPU, "
        f"fp32; the tiny random SD1.5-topology checkpoint. Only the ratios are meaningful.", "",
        "| image | method | seconds (median) | x plain DDIM | UNet rows / step | backward / step | peak RSS above start |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "seconds" in r:
            lines.append(f"| {r['size']} px | {r['method']} | {r['seconds']:.2f} | {r['ratio']:.2f} | "
                         f"{r['unet_rows_per_step']:.1f} | {r['backward_per_step']:.1f} | {r['peak_extra_mb']:.0f} MB |")
    lines += ["", "pix2pix-zero keeps the reference branch's cross-attention maps for one step at a time:", "",
              "| image | held (lockstep) | would be held storing every step |", "|---|---|---|"]
    for r in results:
        if "lockstep_mb" in r:
            lines.append(f"| {r['size']} px | {r['lockstep_mb']:.2f} MB (peak {r['peak_steps']} step) | "
                         f"{r['all_steps_mb']:.2f} MB |")
    targets = [("DDIM inversion", 1.05), ("Z2I DDIM sampler", 1.02), ("CSG (mixup", 1.3), ("Asyrp", 1.6)]
    labels = {"CSG (mixup": "CSG sampler"}
    lines += ["", "Targets of the benchmark issue (ratio to plain sampling, every size measured):", ""]
    for prefix, limit in targets:
        got = [r["ratio"] for r in results if "seconds" in r and r["method"].startswith(prefix)]
        if got:
            verdict = "met" if max(got) <= limit else "missed"
            lines.append(f"- {labels.get(prefix, prefix)}: at most {limit}x -> {', '.join(f'{g:.2f}x' for g in got)}: {verdict}")
    lines += ["", "What the numbers mean:", "",
              "- Times are the method's own node only (upstream nodes cached), median of the repeats, divided by "
              "plain sampling of the same image size and step count in the same run.",
              "- UNet rows / step counts batch rows through the UNet: CFG (cond + uncond) is 2 rows. Plain sampling, "
              "our DDIM, pix2pix-zero and CSG run at cfg 5; inversion and Asyrp at cfg 1 (their papers' setting), "
              "where ComfyUI skips the unconditional half. pix2pix-zero adds a reference row and a guided row with "
              "one backward pass per step; CSG's mixup adds one source row per step; AGG backpropagates through the CFG call in its guided steps "
              "only (the numbers are per-step averages over all steps).",
              "- Peak RSS is measured after glibc's malloc_trim, so it is the run's own transient memory. Gradient "
              "guidance aliases the inference-mode weights (no copy), so pix2pix-zero's extra is activations "
              "kept for the backward pass and the one step of reference maps.",
              "- The tiny model's 8x8 and 16x16 latents make fixed per-step overheads (callbacks, previews) a "
              "larger share than on a real model at 512 px; ratios near 1 are within the noise of a shared "
              "2-core machine: the spread reaches 10-15% (compare the Z2I DDIM rows, which do exactly core's work)."]
    lines += ["", "Not measured yet: the diffusers StableDiffusionPix2PixZeroPipeline comparison.", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / ".host" / "pythonpath"))
    main()
