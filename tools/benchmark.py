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

The peer (`--peer`, the default): the same tiny weights through diffusers' StableDiffusionPix2PixZeroPipeline
(tools/peer_pix2pix_zero.py: diffusers is installed for the benchmark only, into its own cache folder; the
modules are built from configs in code and loaded with the checkpoint's tensors, converted locally and checked
against ComfyUI's modules; nothing is downloaded). Our full pix2pix-zero edit (DDIM Inversion with the
noise regulariser, the pix2pix-zero sampler, VAE Decode) against the pipeline's invert() + __call__() with
the same inputs, steps, guidance and regulariser, in the same process and measured the same way, alternating
runs. `--only-peer` measures just plain DDIM sampling and the peer comparison, and with `--write` replaces
only the peer section of an existing file. tools/benchmark.sh sets up, then runs this script.
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
        self.rows = self.backwards = self.calls = 0
        self._peak = 0
        self._run = False

        def fwd(module, args, output):
            self.rows += int(args[0].shape[0])
            self.calls += 1
            # a backward pass through the UNet reaches its input (guidance losses need not use its output);
            # direction training needs no input gradient: there the backward starts at the output
            if isinstance(args[0], torch.Tensor) and args[0].requires_grad:
                args[0].register_hook(self._count_backward)
            elif isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._count_backward)

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
        self.rows = self.backwards = self.calls = 0
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


def base_graph(size: int, steps: int, ckpt: str = CKPT) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
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


CSG_CACHED = "CSG (mixup + posterior guidance; sampler only, source maps from the mask pass)"
CSG_PAPER = "CSG paper form (one-pass mixup, inversion trajectory; sampler only)"


def csg_graph(cached: bool = False, paper: bool = False) -> tuple:
    """CSG's mask, mixup and sampler: the official code's form (the nodes' defaults: reconstruction source run in
    lockstep, two-pass mixup; the inversion stays 'current level', shared by every method here), or the paper's
    (inversion trajectory, one-pass mixup, the span word map); `cached`: the sampler reads the mask pass's maps
    (and, in the code's form, its reconstruction) instead of running a source row."""
    source = "inversion trajectory (paper Alg. 1)" if paper else "reconstruction (official code)"
    mask = {"model": ["ckpt", 0], "clip": ["ckpt", 1], "inversion": ["inv", 1], "caption": "a photo of a cat on a sofa",
            "word": "cat", "token_level": 2, "mask_level": MASK_LEVEL[0], "source_pass": source,
            "word_map": "token span, bilinear at mask level (ours)" if paper else
            "first token, bicubic at token level (official code)"}
    sampler = {"inversion": ["inv", 1], "background": ["mask", 0], "lambda_pre": 15.0, "delta": 1.5,
               "clamp_pull": True, "source_trajectory": source}
    if cached:
        mask["source_maps"] = "keep"
        sampler["source_maps"] = ["mask", 3]
    return ({"mask": {"class_type": "Z2I_CSGMask", "inputs": mask},
             "mix": {"class_type": "Z2I_CrossAttentionMixup", "inputs": {
                 "model": ["ckpt", 0], "background": ["mask", 0], "strength": 1.0,
                 "passes": "one pass (ours)" if paper else "two passes (official code)"}},
             **sampling({"class_type": "Z2I_CSGSampler", "inputs": sampler}, model=("mix", 0))}, "s", "noise_seed")


def agg_guided(steps: int) -> float:
    """AGG's guided_until: 30% of the steps (3 of 10: the first has no inversion target, so 2 guided, 0.2 backward
    passes a step). Below 10 steps 30% would round to the untargeted first step alone (no guidance at all at 4
    steps), so the first 2 steps (a step count): one guided step, 0.25 backward passes a step at 4 steps."""
    return 0.3 if steps >= 10 else 2.0


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
        "CSG (mixup + posterior guidance; sampler only)": csg_graph(),
        CSG_CACHED: csg_graph(cached=True),
        CSG_PAPER: csg_graph(paper=True),
        "CSG content mask (once per image)": ({
            "mask": {"class_type": "Z2I_CSGMask", "inputs": {
                "model": ["ckpt", 0], "clip": ["ckpt", 1], "inversion": ["inv", 1],
                "caption": "a photo of a cat on a sofa", "word": "cat", "token_level": 2, "mask_level": MASK_LEVEL[0]}}},
            "mask", None),
        "AGG (guided 30% of steps, DDS 10)": (sampling({"class_type": "Z2I_AGGSampler", "inputs": {
            "inversion": ["inv", 1], "lambda_reg": 0.1, "guided_until": agg_guided(steps), "masked_until": 0.8,
            "dds_steps": 10,
            "dds_lr": 0.01, "eta": 0.0}}, cfg=5.0), "s", "noise_seed"),
        "Asyrp (edit interval 50%)": ({
            "dir": {"class_type": "Z2I_HDirectionFromPrompts", "inputs": {"model": ["ckpt", 0], "inversion": ["inv", 1],
                                                                          "target": ["tgt", 0]}},
            **sampling({"class_type": "Z2I_AsyrpSampler", "inputs": {
                "direction": ["dir", 0], "scale": 1.0, "unit": "percent", "edit_until": 0.5, "boost_from": 1.0}},
                positive="src", cfg=1.0)}, "s", "noise_seed"),
        "AGG + CLIP style loss (tiny open_clip, 8 cutouts)": ({
            "oc": {"class_type": "Z2I_OpenCLIPLoader", "inputs": {"name": "z2i-tiny-clip.safetensors",
                                                                  "architecture": "auto (config beside the weights)"}},
            **sampling({"class_type": "Z2I_AGGSampler", "inputs": {
                "inversion": ["inv", 1], "lambda_reg": 0.1, "guided_until": 0.3, "masked_until": 0.8, "dds_steps": 10,
                "dds_lr": 0.01, "eta": 0.0, "style_clip": ["oc", 0], "vae": ["ckpt", 2], "style_source": "a photo",
                "style_target": "an oil painting", "lambda_style": 1.0, "cutouts": 8}}, positive="src", cfg=1.0)},
            "s", "noise_seed"),
        "h-space direction training (global, 1 image, 1 pass, first 50%)": ({
            "oc": {"class_type": "Z2I_OpenCLIPLoader", "inputs": {"name": "z2i-tiny-clip.safetensors",
                                                                  "architecture": "auto (config beside the weights)"}},
            "train": {"class_type": "Z2I_HDirectionTrain", "inputs": {
                "model": ["ckpt", 0], "vae": ["ckpt", 2], "clip_loss_model": ["oc", 0], "latent": ["enc", 0],
                "positive": ["src", 0], "source_text": "a photo of a cat", "target_text": "a photo of a dog",
                "kind": "global", "steps": steps, "edit_until": 0.5, "iterations": 1, "lr": 0.05, "lambda_clip": 0.8,
                "lambda_recon": -1.0, "hidden": 512, "seed": 0}}}, "train", "seed"),
    }


# Gradient-guided methods: measured in each memory mode given with --memory-modes (Z2I GPU Settings node)
GUIDED = ("pix2pix-zero edit", "pix2pix-zeroCon edit", "AGG (guided", "h-space direction training")
# Not measured with --batch (the trainer's latent batch is its training set, not a batch of edits)
NO_BATCH = ("h-space direction training", "DDIM inversion", "CSG content mask")


def variants(table: dict, modes: list[str], batch: int) -> dict:
    """The methods table with, for each guided method, one entry per memory mode (the GPU Settings node after the
    checkpoint) and, with batch > 1, one entry per method with the example image repeated `batch` times."""
    out = {}
    for name, (extra, node, seed) in table.items():
        guided = name.startswith(GUIDED)
        for mode in (modes if guided else ["auto"]):
            label = name if mode == "auto" else f"{name} [memory {mode}]"
            out[label] = (with_memory(extra, mode), node, seed)
            if batch > 1 and mode == "auto" and not name.startswith(NO_BATCH):
                ex = dict(with_memory(extra, mode))
                ex["rep"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["scale", 0], "amount": batch}}
                ex["enc"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["rep", 0], "vae": ["ckpt", 2]}}
                out[f"{label} [batch {batch}]"] = (ex, node, seed)
    return out


def with_memory(extra: dict, mode: str) -> dict:
    """extra with a Z2I GPU Settings node (memory `mode`) between the checkpoint and every node of extra using it."""
    if mode == "auto":
        return extra
    ex = {k: {**v, "inputs": dict(v["inputs"])} for k, v in extra.items()}
    for v in ex.values():
        for key, val in v["inputs"].items():
            if val == ["ckpt", 0] or (key == "model" and val == ["ckpt", 0]):
                v["inputs"][key] = ["gpu", 0]
    ex["gpu"] = {"class_type": "Z2I_GPUSettings", "inputs": {"model": ["ckpt", 0], "memory": mode,
                                                             "batch": "batched"}}
    return ex


MASK_LEVEL = [1]          # --mask-level: the CSG content mask's mask_level in every CSG row

NOT_IMPLEMENTED: list[str] = []
PLAIN = "plain ComfyUI DDIM (core 'ddim')"
SDXL_CKPT = "z2i-tiny-sdxl.safetensors"
# The rows measured at every size; the tiny open_clip rows (32 px CLIP input) say nothing at large sizes, and SDXL
# gets the methods of the performance issue (plus its baseline).
SMALL_ONLY = ("AGG + CLIP style loss", "h-space direction training")
SDXL_METHODS = (PLAIN, "pix2pix-zero edit", CSG_CACHED, "Asyrp")
LARGE = 256              # from this side up, --large-repeats applies
CAPTION = "a photo of a cat on a sofa"
PEER_CFG = 5.0          # the edit's guidance scale, both sides (the main table's cfg)
PEER_XA = 0.1           # cross-attention guidance step: our xa_guidance = the pipeline's default
OURS = "Z2I: DDIM Inversion (diffusers variant, regularised) + pix2pix-zero sampler (official-code form) + VAE Decode"
OURS_SINGLE = "Z2I: the same with the pix2pix-zero sampler's single-latent form"
SHIPPED = "diffusers pipeline: invert() + __call__(), UNet as from_pretrained leaves it"
FROZEN = "diffusers pipeline, UNet frozen by the caller (requires_grad_(False))"


def peer_graph(size: int, steps: int) -> dict:
    """Our full pix2pix-zero edit with the pipeline's settings: regularised inversion (its defaults: lambda 20
    for both terms, 5 iterations of 5 rolls; the "diffusers (exact)" variant, which reproduces it), the edit at
    cfg 5 with the caption as the negative (the CFG-neutral reference of reference-parity.md section 7), xa
    guidance 0.1 in the sampler's default (official-code) form, decoded."""
    g = base_graph(size, steps)
    g["inv"]["inputs"].update({"variant": "diffusers (exact)", "regularize": True, "reg_lambda": 20.0,
                               "reg_iterations": 5})
    return {**g,
            "dir": {"class_type": "Z2I_EditDirection", "inputs": {"clip": ["ckpt", 1], "source": "cat",
                                                                  "target": "dog", "num_sentences": 8, "seed": 0}},
            "edit": {"class_type": "Z2I_ApplyEditDirection", "inputs": {"conditioning": ["src", 0],
                                                                        "direction": ["dir", 0], "strength": 1.0}},
            "sampler": {"class_type": "Z2I_Pix2PixZeroSampler", "inputs": {
                "xa_guidance": PEER_XA, "layers": "input,middle,output", "map_precision": "fp32",
                "guidance_form": "both halves (official code)"}},
            "s": {"class_type": "SamplerCustom", "inputs": {
                "model": ["ckpt", 0], "add_noise": False, "noise_seed": 0, "cfg": PEER_CFG, "positive": ["edit", 0],
                "negative": ["src", 0], "sampler": ["sampler", 0], "sigmas": ["inv", 2],
                "latent_image": ["inv", 0]}},
            "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["s", 0], "vae": ["ckpt", 2]}}}


_PIPE: dict = {}


def run_peer(host, size: int, steps: int, repeats: int, plain_time: float, results: list) -> None:
    """Our full edit against diffusers' pipeline on the same weights and inputs; appends rows to results."""
    import peer_pix2pix_zero as peer
    prompt = peer_graph(size, steps)
    res = host.run_prompt(prompt, targets=["dec", "ckpt", "src", "enc", "dir"])   # warm-up
    model, vae = res.output("ckpt", 0), res.output("ckpt", 2)
    src = res.output("src", 0)[0][0].float()
    raw = res.output("enc", 0)["samples"].float()
    delta = res.output("dir", 0).delta.float()
    scale = model.get_model_object("latent_format").scale_factor
    if "pipe" not in _PIPE:
        ckpt = host.folder_paths.get_full_path("checkpoints", CKPT)
        pipe = peer.build_pipeline(ckpt, model.model.model_config.unet_config, host.host_dir)
        _PIPE["check"] = peer.check_conversion(pipe, model, vae, CAPTION, src, raw[..., :16, :16])  # 128 px
        _PIPE["pipe"] = pipe
        print("diffusers conversion, max |difference| from ComfyUI's modules: "
              + ", ".join(f"{k} {v:.1e}" for k, v in _PIPE["check"].items()), flush=True)
    pipe = _PIPE["pipe"]
    latent = (raw * scale).contiguous()

    single = json.loads(json.dumps(prompt))
    single["sampler"]["inputs"]["guidance_form"] = "single latent (paper Alg. 1)"
    full = size < LARGE       # from LARGE up: our default form against the pipeline as shipped only
    if full:
        host.run_prompt(single, targets=["dec"])            # warm-up

    def ours(graph):
        def go(r):
            graph["inv"]["inputs"]["reg_seed"] = r + 1      # re-runs inversion, sampler and decode
            graph["s"]["inputs"]["noise_seed"] = r + 1
            host.run_prompt(graph, targets=["dec"])
        return go

    def diffusers(frozen):
        def go(r):
            pipe.unet.requires_grad_(not frozen)
            peer.reset(pipe)                                 # a fresh pipeline: no stored maps, no .grad
            peer.edit(pipe, latent, src, src, delta, steps, PEER_CFG, PEER_XA, r + 1, size)   # negative = caption
        return go

    runs = {OURS: (ours(prompt), model.model.diffusion_model), OURS_SINGLE: (ours(single), model.model.diffusion_model),
            SHIPPED: (diffusers(False), pipe.unet), FROZEN: (diffusers(True), pipe.unet)}
    if not full:
        runs = {k: v for k, v in runs.items() if k in (OURS, SHIPPED)}
    if full:
        for name, (fn, _) in runs.items():
            if name not in (OURS, OURS_SINGLE):
                fn(-1)                                       # warm-up (the pipeline rewires its UNet once)
    else:            # the rewiring needs no full-size edit: 2 steps on a 64 px crop of the latent
        pipe.unet.requires_grad_(True)
        peer.reset(pipe)
        peer.edit(pipe, latent[..., :8, :8].contiguous(), src, src, delta, 2, PEER_CFG, PEER_XA, 0, 64)
    meas = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:     # rotate the order between repeats
            fn, unet = runs[name]
            with Meter(unet) as m:
                fn(r)
            m.handle.remove()
            meas[name].append((m.elapsed, m.rows / steps, m.backwards / steps, m.peak_extra / 2**20))
    for name in names:
        t = statistics.median(x[0] for x in meas[name])
        row = {"size": size, "peer": True, "method": name, "seconds": t, "ratio": t / plain_time,
               "unet_rows_per_step": statistics.median(x[1] for x in meas[name]),
               "backward_per_step": statistics.median(x[2] for x in meas[name]),
               "peak_extra_mb": statistics.median(x[3] for x in meas[name])}
        results.append(row)
        print(f"{size:4d}px  {name:78s} {t:7.2f}s  x{t / plain_time:5.2f}  rows/step {row['unet_rows_per_step']:.1f}"
              f"  backward/step {row['backward_per_step']:.1f}  peak +{row['peak_extra_mb']:.0f} MB", flush=True)
    for form, mine in (("official-code form", OURS), ("single-latent form", OURS_SINGLE)):
        ratios = {"size": size, "peer_ratios": True, "form": form, "conversion": dict(_PIPE["check"])}
        if mine not in meas:
            continue
        for label, other in (("", SHIPPED), ("_frozen", FROZEN)):
            if other not in meas:
                ratios["time" + label] = ratios["mem" + label] = None
                continue
            ratios["time" + label] = statistics.median(a[0] / b[0] for a, b in zip(meas[mine], meas[other]))
            mem = [a[3] / b[3] for a, b in zip(meas[mine], meas[other]) if b[3] >= 1.0]
            ratios["mem" + label] = statistics.median(mem) if mem else None    # a peak under 1 MB: no ratio
        results.append(ratios)
        print(f"{size:4d}px  ours ({form}) / diffusers: time {ratios['time']:.2f}x, peak RSS {fmt(ratios['mem'])} "
              f"(frozen UNet: {fmt(ratios['time_frozen'])}, {fmt(ratios['mem_frozen'])})", flush=True)


def fmt(v, spec=".2f", unit="x") -> str:
    return "not measured" if v is None else f"{v:{spec}}{unit}"


def fixed_mmap_threshold(size: int = 128 * 1024) -> None:
    """glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, after which such blocks come
    from the heap and stay in the RSS when freed: the RSS then keeps the largest transient of any earlier run. A fixed
    threshold (mallopt M_MMAP_THRESHOLD, as MALLOC_MMAP_THRESHOLD_=131072 does) returns every large tensor's memory
    on free, so each method's peak is its own live memory."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, size)      # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--large-steps", type=int, default=4,
                    help=f"steps at image sides of {LARGE} px and more and on SDXL (every ratio divides by plain "
                         "sampling with the same steps)")
    ap.add_argument("--sizes", default="256,512",
                    help="image sizes in pixels for the tiny SD1.5 checkpoint (latent = size / 8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large-repeats", type=int, default=1,
                    help=f"repeats at image sides of {LARGE} px and more (one run there takes seconds to minutes)")
    ap.add_argument("--sdxl-sizes", default="1024",
                    help="image sizes for the tiny SDXL checkpoint (plain DDIM, pix2pix-zero, CSG with the mask "
                         "pass's maps (its default), Asyrp; the inversion is measured with --methods); empty for none")
    ap.add_argument("--peer-sizes", default="512",
                    help=f"sizes (of --sizes) at which the diffusers peer is measured (from {LARGE} px up: our "
                         "default form against the pipeline as shipped only)")
    ap.add_argument("--methods", default="",
                    help="comma-separated prefixes of the method names to measure (plain DDIM always runs); empty "
                         "for all")
    ap.add_argument("--mask-level", type=int, default=1,
                    help="the CSG Content Mask's mask_level in the CSG rows (0 = the node's default, full latent "
                         "resolution: above a 91x91 mask its smoothing runs as a linear-memory second pass)")
    ap.add_argument("--memory-modes", default="auto",
                    help="memory modes of the gradient-guided methods (Z2I GPU Settings): comma-separated of auto, "
                         "fast, low; auto is the row without the node")
    ap.add_argument("--batch", type=int, default=1,
                    help="also measure every method (not the inversion, the mask pass or training) on a batch of "
                         "this many images, against this many times the batch-1 run")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "benchmark.png",
                    help="with --write: the plot of cost ratio and extra memory against image side")
    ap.add_argument("--write", type=Path, help="also write the results as a markdown table to this file")
    ap.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                    help="compare pix2pix-zero with diffusers' StableDiffusionPix2PixZeroPipeline on the same "
                         "weights (installs tools/requirements-bench.txt into the benchmark's cache folder once)")
    ap.add_argument("--only-peer", action="store_true",
                    help="measure only plain DDIM sampling and the peer comparison; with --write, replace only "
                         "the peer section of the existing file")
    args = ap.parse_args()
    MASK_LEVEL[0] = args.mask_level
    if args.only_peer and not args.peer:
        ap.error("--only-peer needs --peer")
    if args.peer:
        import peer_pix2pix_zero
        peer_pix2pix_zero.ensure_bench_deps()

    import logging
    logging.basicConfig(level=logging.ERROR)
    fixed_mmap_threshold()
    import torch
    from z2i.headless.host import Host
    host = Host.get()
    results = []
    runs = [("SD1.5", CKPT, int(s)) for s in args.sizes.split(",") if s.strip()]
    runs += [("SDXL", SDXL_CKPT, int(s)) for s in args.sdxl_sizes.split(",") if s.strip() and not args.only_peer]
    peer_sizes = {int(s) for s in args.peer_sizes.split(",") if s.strip()}
    only = [m.strip() for m in args.methods.split(",") if m.strip()]
    t_start = time.perf_counter()
    for family, ckpt, size in runs:
        plain_time = plain_peak = None
        large = size >= LARGE or family != "SD1.5"
        repeats = args.large_repeats if large else args.repeats
        steps = args.large_steps if large else args.steps
        table = variants(methods(steps), [m.strip() for m in args.memory_modes.split(",") if m.strip()], args.batch)
        for name, (extra, node, seed_input) in table.items():
            if args.only_peer and name != PLAIN:
                continue
            if only and not name.startswith(PLAIN) and not name.startswith(tuple(only)):
                continue
            if family == "SDXL" and not (name == CSG_CACHED or name.startswith(
                    tuple(m for m in SDXL_METHODS if m != CSG_CACHED))):
                continue
            if size >= LARGE and name.startswith(SMALL_ONLY):
                continue
            prompt = {**base_graph(size, steps, ckpt), **extra}
            # warm-up: everything upstream of the timed node (model load, encodes, inversion, masks), not the node
            res = host.run_prompt(prompt, targets=[k for k in prompt if k not in (node, "s")] + ["ckpt"])
            unet = res.output("ckpt", 0).model.diffusion_model
            held = None
            if name == CSG_CACHED:
                held = res.output("mask", 3).nbytes / 2**20
            times, rows, backs, peaks, calls = [], [], [], [], []
            if name == PLAIN and repeats == 1:
                # the denominator of every ratio: one untimed step first, so that it does not carry the one-time
                # costs of a new size (kernel selection, allocator growth) that the methods' rows then do not
                warm = json.loads(json.dumps(prompt))
                warm["warm_sigmas"] = {"class_type": "BasicScheduler", "inputs": {
                    "model": ["ckpt", 0], "scheduler": "ddim_uniform", "steps": 1, "denoise": 1.0}}
                warm[node]["inputs"]["sigmas"] = ["warm_sigmas", 0]
                host.run_prompt(warm, targets=[node])
            for r in range(repeats):
                if seed_input:
                    prompt[node]["inputs"][seed_input] = r + 1
                else:
                    prompt[node]["inputs"]["token_level"] = [3, 2][r % 2]     # re-run the mask node (warm-up used 2)
                with Meter(unet) as m:
                    host.run_prompt(prompt, targets=[node])
                m.handle.remove()
                times.append(m.elapsed)
                rows.append(m.rows / steps)
                calls.append(m.calls / steps)
                backs.append(m.backwards / steps)
                peaks.append(m.peak_extra / 2**20)
            t = statistics.median(times)
            peak = statistics.median(peaks)
            if plain_time is None:
                plain_time, plain_peak = t, peak
            results.append({"family": family, "size": size, "method": name, "seconds": t, "ratio": t / plain_time,
                            "unet_rows_per_step": statistics.median(rows),
                            "unet_calls_per_step": statistics.median(calls),
                            "backward_per_step": statistics.median(backs),
                            "peak_extra_mb": peak, "above_plain_mb": peak - plain_peak, "repeats": repeats,
                            "steps": steps,
                            **({"maps_held_mb": held} if held is not None else {})})
            print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] "
                  f"{family:5s} {size:4d}px  {name:50s} {t:7.2f}s  x{t / plain_time:5.2f}  rows/step "
                  f"{results[-1]['unet_rows_per_step']:.1f}  backward/step {results[-1]['backward_per_step']:.1f}  "
                  f"peak +{peak:.0f} MB ({peak - plain_peak:+.0f} MB vs plain)", flush=True)
        if family != "SD1.5":
            continue
        if args.peer and size in peer_sizes:
            run_peer(host, size, steps, repeats, plain_time, results)
            print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] peer at {size} px done", flush=True)
        if args.only_peer or large or (only and not "pix2pix-zero edit".startswith(tuple(only))):
            continue        # the held reference maps are counted on the small sizes (a full extra edit each)
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
    args.minutes = (time.perf_counter() - t_start) / 60
    print(f"benchmark took {args.minutes:.1f} minutes", flush=True)
    if args.write:
        write_markdown(args.write, results, args)
    print(json.dumps(results, indent=1))


PEER_HEADING = "## pix2pix-zero against diffusers' StableDiffusionPix2PixZeroPipeline"


def command(args, only_peer=False) -> str:
    extra = " --only-peer" if only_peer else ("" if args.peer else " --no-peer")
    parts = [f"--steps {args.steps} --large-steps {args.large_steps} --sizes {args.sizes} --repeats {args.repeats} "
             f"--large-repeats {args.large_repeats} --sdxl-sizes '{args.sdxl_sizes}' --peer-sizes '{args.peer_sizes}'"]
    if args.methods:
        parts.append(f"--methods '{args.methods}'")
    if args.memory_modes != "auto":
        parts.append(f"--memory-modes {args.memory_modes}")
    if args.batch > 1:
        parts.append(f"--batch {args.batch}")
    return ("PYTHONPATH=.host/pythonpath .venv/bin/python tools/benchmark.py "
            f"{' '.join(parts)}{extra} --write BENCHMARKS.md")


def peer_markdown(results: list, args) -> list[str]:
    import diffusers
    import torch
    rows = [r for r in results if r.get("peer")]
    ratios = [r for r in results if r.get("peer_ratios")]
    plain = {r["size"]: r["seconds"] for r in results if r.get("method") == PLAIN}
    lines = [PEER_HEADING, "",
             f"Produced by `{command(args, args.only_peer)}` (or `bash tools/benchmark.sh` with the same arguments), "
             f"in the same process and on the same machine as plain sampling; diffusers {diffusers.__version__} "
             "(benchmark-only: tools/requirements-bench.txt, tools/peer_pix2pix_zero.py).", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} on CPU, fp32, "
             "both sides; the tiny random SD1.5-topology checkpoint. Only the ratios are meaningful.", "",
             "| image | full edit (inversion + edit + decode) | seconds (median) | x plain DDIM | UNet rows / step "
             "| backward / step | peak RSS above start |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} px | {r['method']} | {r['seconds']:.2f} | {r['ratio']:.2f} | "
                     f"{r['unet_rows_per_step']:.1f} | {r['backward_per_step']:.1f} | {r['peak_extra_mb']:.0f} MB |")
    lines += ["", "| image | our sampler's form | plain DDIM seconds | time ours / diffusers | peak RSS ours / diffusers "
                  "| time ours / diffusers, frozen UNet | peak RSS ours / diffusers, frozen UNet |",
              "|---|---|---|---|---|---|---|"]
    for r in ratios:
        lines.append(f"| {r['size']} px | {r.get('form', '')} | {plain.get(r['size'], float('nan')):.2f} | "
                     f"{fmt(r['time'], unit='')} | {fmt(r['mem'], unit='')} | {fmt(r['time_frozen'], unit='')} | "
                     f"{fmt(r['mem_frozen'], unit='')} |")
    check = ratios[0]["conversion"] if ratios else {}
    lines += ["", "Conversion check, before any timing (the same inputs through ComfyUI's modules and the converted "
                  "ones; the benchmark stops above 1e-5): max |difference| of UNet eps (t = 901, 501, 1) "
                  f"{check.get('unet', float('nan')):.1e}, text encoder output {check.get('text_encoder', float('nan')):.1e}, "
                  f"TAESD decode {check.get('vae_decode', float('nan')):.1e}.", "",
              "Targets of the reference-parity issue (the default, official-code form / the pipeline as shipped, "
              "every size measured):", ""]
    for key, limit, what in (("time", 0.75, "time"), ("mem", 0.5, "peak memory")):
        main = [r for r in ratios if r.get("form", "official-code form") == "official-code form" and r[key] is not None]
        got = [r[key] for r in main]
        frozen = [r[key + "_frozen"] for r in main if r[key + "_frozen"] is not None]
        if got:
            verdict = "met" if max(got) <= limit else "missed"
            each = ", ".join(f"{g:.2f}x ({r['size']} px)" for g, r in zip(got, main))
            lines.append(f"- pix2pix-zero full edit {what}: at most {limit}x the diffusers pipeline's -> {each}"
                         f": {verdict}" + (f" (against the frozen UNet, where measured: "
                                          f"{', '.join(f'{g:.2f}x' for g in frozen)}: "
                                          f"{'met' if max(frozen) <= limit else 'missed'})" if frozen else ""))
    lines += ["", "What the comparison means:", "",
              "- Same weights and inputs on both sides: the tiny checkpoint's tensors (converted locally, checked "
              "above; nothing downloaded), ComfyUI's text embeddings of the caption, which is also the negative "
              "prompt on both sides (the CFG-neutral reference of the official code), the same cat -> dog direction (8 template sentences a side, built once and given to "
              "the pipeline as target_embeds with zero source_embeds), and VAE Encode's latent, scaled, as the image "
              "to invert (the pipeline would sample the VAE posterior; ComfyUI takes its mode).",
              f"- Same settings: {args.steps} DDIM steps below {LARGE} px and {args.large_steps} from {LARGE} px up, "
              "on the same grid both ways; inversion at cfg 1 with "
              "pix2pix-zero's noise regulariser at the pipeline's defaults (lambda 20 for both terms, 5 iterations "
              f"of 5 rolls; our DDIM Inversion's 'diffusers (exact)' variant, which reproduces the pipeline's "
              f"inversion to 1e-4, tests/test_diffusers_parity.py); the edit at cfg {PEER_CFG:g} "
              f"with cross-attention guidance {PEER_XA:g} (our xa_guidance, the pipeline's "
              "cross_attention_guidance_amount), every cross-attention layer.",
              "- Timed from the latent to the decoded image, text encodes and model loading excluded on both sides "
              "(ours: Z2I DDIM Inversion, the sampler and VAE Decode re-run, their upstream nodes cached; diffusers: "
              "invert() then __call__(), whose invert() always decodes its noise as well). Runs alternate between the "
              f"four (from {LARGE} px up: the first and third only, after a 2-step warm-up of the pipeline on a 64 px crop), in a rotating order; x "
              "plain DDIM divides by plain sampling of the same size and steps in the same run.",
              "- UNet rows / step count both phases over the step count: the pipeline's inversion adds 1 row, its edit "
              "6 (a reference pass, a guided pass with the backward pass and a recomputed pass, each on both CFG "
              "halves); ours adds 1 and 5 in the official-code form (a reference row on the caption, the two guided "
              "rows in one batched call with one backward pass, and the two recomputed rows in one batched call; "
              "backward / step counts backward calls) or 4 in the single-latent form (a reference "
              "row, one guided row with its backward pass, and the CFG pair at the guided latent).",
              "- Peak RSS above start is the Meter's, as in the main table. The pipeline keeps every step's reference "
              "maps (both CFG halves) from its reference loop until its edit loop pops them; ours keeps one step. As "
              "shipped, the UNet's parameters require grad (diffusers' from_pretrained does not freeze them), so the "
              "pipeline's backward passes also compute and accumulate weight gradients of every layer outside the "
              "self-attention; the frozen rows are what a caller gets after unet.requires_grad_(False) (the pipeline "
              "still enables the cross-attention layers' gradients). Before each run the pipeline's stored maps and "
              "gradients are cleared, the state of a freshly loaded pipeline."]
    return lines


def gpu_markdown(results: list) -> list[str]:
    """Memory modes (x plain, memory above plain's peak, UNet calls per step) and batch N against N x batch 1."""
    mine = [r for r in results if "seconds" in r and not r.get("peer")]
    modal = [r for r in mine if "[memory " in r["method"] or (r["method"].startswith(GUIDED) and "[" not in r["method"])]
    lines = []
    if any("[memory " in r["method"] for r in modal):
        lines += ["", "Memory modes of the gradient-guided methods (Z2I GPU Settings; the row without a mode is "
                      "auto):", "", "| model | image | method | memory mode | x plain DDIM | UNet calls / step | "
                      "UNet rows / step | backward / step | above plain sampling's peak |", "|---|---|---|---|---|---|---|---|---|"]
        for r in modal:
            if "[batch" in r["method"]:
                continue
            name, _, mode = r["method"].partition(" [memory ")
            lines.append(f"| {r.get('family', 'SD1.5')} | {r['size']} px | {name} | {mode.rstrip(']') or 'auto'} | "
                         f"{r['ratio']:.2f} | {r.get('unet_calls_per_step', float('nan')):.1f} | "
                         f"{r['unet_rows_per_step']:.1f} | {r['backward_per_step']:.1f} | "
                         f"{r.get('above_plain_mb', 0):+.0f} MB |")
    batched = [r for r in mine if "[batch " in r["method"]]
    if batched:
        one = {(r.get("family"), r["size"], r["method"]): r for r in mine}
        lines += ["", "Batches (the default 'batched' mode: the images of a batch in one UNet call per branch):", "",
                  "| model | image | method | batch | seconds | batch-1 seconds | batch / (N x batch 1) | UNet calls "
                  "/ step, batch 1 -> N | UNet rows / step, batch 1 -> N |", "|---|---|---|---|---|---|---|---|---|"]
        for r in batched:
            base, _, n = r["method"].rpartition(" [batch ")
            n = int(n.rstrip("]"))
            b1 = one.get((r.get("family"), r["size"], base))
            if b1 is None:
                continue
            lines.append(f"| {r.get('family', 'SD1.5')} | {r['size']} px | {base} | {n} | {r['seconds']:.2f} | "
                         f"{b1['seconds']:.2f} | {r['seconds'] / (n * b1['seconds']):.2f} | "
                         f"{b1.get('unet_calls_per_step', float('nan')):.1f} -> "
                         f"{r.get('unet_calls_per_step', float('nan')):.1f} | {b1['unet_rows_per_step']:.1f} -> "
                         f"{r['unet_rows_per_step']:.1f} |")
    return lines


def write_markdown(path: Path, results: list, args) -> None:
    import torch
    peer = peer_markdown(results, args) if any(r.get("peer") for r in results) else \
        ["Not measured in this run (--no-peer): the diffusers StableDiffusionPix2PixZeroPipeline comparison."]
    if args.only_peer:
        old = path.read_text() if path.exists() else "# Benchmarks\n"
        for marker in (PEER_HEADING, "Not measured yet: the diffusers", "Not measured in this run (--no-peer)"):
            if marker in old:
                old = old[:old.index(marker)]
                break
        path.write_text(old.rstrip("\n") + "\n\n" + "\n".join(peer) + "\n")
        return
    lines = [
        "# Benchmarks", "",
        f"Produced by `{command(args)}` (see the script's docstring for the method; `bash tools/benchmark.sh` "
        "with the same arguments sets up first).", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} on CPU, "
        f"fp32; the tiny random SD1.5- and SDXL-topology checkpoints. Only the ratios are meaningful. Steps: "
        f"{args.steps} below {LARGE} px, {args.large_steps} from {LARGE} px up and on SDXL; repeats: {args.repeats} "
        f"below {LARGE} px, {args.large_repeats} from {LARGE} px up. The whole run took "
        f"{getattr(args, 'minutes', float('nan')):.0f} minutes.", "",
    ]
    if args.write and args.plot:
        rel = os.path.relpath(args.plot, args.write.resolve().parent)
        lines += [f"![cost ratio and extra memory against image side]({rel})", ""]
    lines += [
        "| model | image | steps | method | seconds (median) | x plain DDIM | UNet rows / step | backward / step "
        "| peak RSS above start | above plain sampling's peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "seconds" in r and not r.get("peer"):
            held = f" (maps kept: {r['maps_held_mb']:.0f} MB)" if "maps_held_mb" in r else ""
            lines.append(f"| {r.get('family', 'SD1.5')} | {r['size']} px | {r.get('steps', args.steps)} | "
                         f"{r['method']} | {r['seconds']:.2f} | "
                         f"{r['ratio']:.2f} | {r['unet_rows_per_step']:.1f} | {r['backward_per_step']:.1f} | "
                         f"{r['peak_extra_mb']:.0f} MB | {r.get('above_plain_mb', 0):+.0f} MB{held} |")
    lines += gpu_markdown(results)
    lines += ["", "pix2pix-zero keeps the reference branch's cross-attention maps for one step at a time:", "",
              "| image | held (lockstep) | would be held storing every step |", "|---|---|---|"]
    for r in results:
        if "lockstep_mb" in r:
            lines.append(f"| {r['size']} px | {r['lockstep_mb']:.2f} MB (peak {r['peak_steps']} step) | "
                         f"{r['all_steps_mb']:.2f} MB |")
    targets = [("DDIM inversion", 1.05), ("Z2I DDIM sampler", 1.02), (CSG_CACHED, 1.3),
               ("CSG (mixup + posterior guidance; sampler only)", 1.3), ("Asyrp", 1.6)]
    labels = {CSG_CACHED: "CSG sampler, source maps from the mask pass",
              "CSG (mixup + posterior guidance; sampler only)": "CSG sampler, lockstep source row"}
    lines += ["", "Targets of the performance issues (ratio to plain sampling of the same model and size, every size "
                  "measured):", ""]
    mine = [r for r in results if "seconds" in r and not r.get("peer")]
    for prefix, limit in targets:
        got = [r for r in mine if r["method"] == prefix or (prefix not in labels and r["method"].startswith(prefix))]
        if got:
            verdict = "met" if max(r["ratio"] for r in got) <= limit else "missed"
            lines.append(f"- {labels.get(prefix, prefix)}: at most {limit}x -> "
                         + ", ".join(f"{r['ratio']:.2f}x ({r['family']} {r['size']})" for r in got) + f": {verdict}")
    big = [r for r in mine if r.get("family") == "SD1.5" and r["size"] == 512 and r["method"] != PLAIN]
    if big:
        worst = max(big, key=lambda r: r["above_plain_mb"])
        over = [r["method"].split(" (")[0] for r in big if r["above_plain_mb"] > 600]
        lines.append(f"- peak memory above plain sampling's peak at 512 px (tiny SD1.5): at most 0.6 GB for every "
                     f"method -> largest {worst['above_plain_mb']:.0f} MB ({worst['method'].split(' (')[0]}): "
                     f"{'met' if not over else 'missed by ' + ', '.join(over)}")
    lines += ["", "What the numbers mean:", "",
              "- Times are the method's own node only (upstream nodes cached), median of the repeats, divided by "
              "plain sampling of the same image size and step count in the same run.",
              "- UNet rows / step counts batch rows through the UNet: CFG (cond + uncond) is 2 rows. Plain sampling, "
              "our DDIM, pix2pix-zero and CSG run at cfg 5; inversion and Asyrp at cfg 1 (their papers' setting), "
              "where ComfyUI skips the unconditional half. pix2pix-zero in its default (official-code) form runs a "
              "reference row, the two CFG halves' guided rows (in one batched call with one backward pass below 256 px; "
              "one half after the other from 256 px, so one half's graph is alive at a time; only the edited "
              "half at the first step, where the caption half's gradient is zero) and re-evaluates both halves at "
              "their moved latents in one batched call; CSG's mixup adds one source row per step; AGG backpropagates through the CFG call in its guided steps "
              "only (the numbers are per-step averages over all steps).",
              "- The two CLIP-loss rows use the tiny random open_clip (32 px input), so they show the structure of "
              "the cost (a VAE decode and a CLIP pass with backward per evaluation), not what a ViT-B/32 on a 512 px "
              "decode costs. AGG + style runs at cfg 1 with the caption as its only prompt and decodes x0 in the "
              "MCG step and in each of the 10 DDS steps of a guided step. Direction training is timed for the whole "
              "node (its inversion, then per editing step one no-grad source row, one no-grad edited row and one "
              "edited row with delta_h and a backward pass from the UNet output to delta_h); it runs once per "
              "direction, not per image edited.",
              "- Peak RSS is measured after glibc's malloc_trim with a fixed mmap threshold (tools/benchmark.py "
              "fixed_mmap_threshold), so it is the run's own live memory. Gradient guidance aliases the "
              "inference-mode weights (no copy); the layers of a guided call on 32x32 latent positions and more "
              "(256 px and up on SD1.5) recompute their activations in the backward pass instead of keeping them "
              "(nodes/_compose.py CHECKPOINT_POSITIONS), so pix2pix-zero's extra is the small layers' "
              "activations, the checkpointed layers' inputs, one layer's recomputation and one step of "
              "reference maps.",
              "- The tiny model's 8x8 and 16x16 latents make fixed per-step overheads (callbacks, previews) a "
              "larger share than on a real model at 512 px; ratios near 1 are within the noise of a shared "
              "2-core machine: the spread reaches 10-15% (compare the Z2I DDIM rows, which do exactly core's work)."]
    lines += [""] + peer + [""]
    path.write_text("\n".join(lines))
    if args.plot:
        plot(args.plot, mine, args, lines)


def plot(path: Path, rows: list, args, lines: list[str]) -> None:
    """Cost ratio and memory above plain sampling's peak against image side, one line per method: drawn by
    tools/plot_benchmark.py (matplotlib, installed into the benchmark's own folder like diffusers), which can also
    redraw it from the written table; the title names the machine of the markdown's 'Machine:' line."""
    import plot_benchmark
    rows = [{**r, "steps": r.get("steps", args.steps)} for r in rows]
    plot_benchmark.plot(path, rows, plot_benchmark.machine_of("\n".join(lines)))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / ".host" / "pythonpath"))
    main()
