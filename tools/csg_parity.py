"""CSG parity: the authors' official code (GitHub Hleephilip/CSG) next to the pack, stage by stage.

Usage (from the repository root, with the test venv and the host's pythonpath):

    PYTHONPATH=.host/pythonpath .venv/bin/python tools/csg_parity.py --official /tmp/csg-official \
        [--size 64] [--steps 10] [--lam 10] [--cfg 5] [--caption "a photo of a cat on a sofa"] \
        [--task cat2dog] [--seed N] [--mask-res N] [--threads 1] [--json OUT]

`--official` is a checkout of Hleephilip/CSG (the folder that holds src/utils/edit_pipeline.py), e.g.
`git clone https://github.com/Hleephilip/CSG /tmp/csg-official`. The official code is NOT shipped with the pack
and never imported by it: only this tool loads it, from that folder, without changing a byte of it. diffusers
comes from the benchmark's own folder (tools/peer_pix2pix_zero.ensure_bench_deps, installed once by
tools/setup.sh).

What runs
---------
Both sides use the pack's tiny random SD1.5 checkpoint (z2i-tiny-sd15). The in-process ComfyUI host loads it;
tools/peer_pix2pix_zero.build_pipeline converts it to diffusers modules (UNet2DConditionModel, CLIPTextModel,
tokenizer, AutoencoderTiny) and check_conversion proves the conversion against ComfyUI's own modules. The input
latent is ComfyUI's VAE Encode of the example image z2i_example.png scaled to --size (TAESD: deterministic), or
with --seed N a unit-variance randn latent (LoadLatent from a private input folder); either is handed to both
sides bit for bit.

1. Official side, the code's own functions: `DDIMInversion.__call__` (utils/ddim_inv.py) with its
   `DDIMInverseScheduler` (utils/scheduler.py), guidance_scale 1, as inversion.py calls it; then
   `EditingPipeline.__call__` (utils/edit_pipeline.py) as edit_real_images.py calls it: the typed caption,
   target prompt and word index from `make_target_prompt` (utils/target_prompt.py), guidance_scale = --cfg,
   negative_prompt = the caption, mask_res, posterior_guidance = --lam, mixup_type ['cross-attention', 'noise'].
   Captured without touching the code: every `scheduler.step` call (inversion latents; reference-pass latents
   x_src_t = the code's x_src_t_list; edit latents per step), the inputs of `decode_latents` (the final
   reconstruction and edit latents), the `torch.einsum('ij,bcj->bci', A, M_bar)` call (the time-averaged
   self-attention A, the clamped word map M_bar and the smoothed mask M_hat) and the token matching dict.
2. Pack side, through the real host: Z2I DDIM Inversion variant "CSG code (N-2 steps)"; Z2I CSG Mask with
   source_pass "reconstruction (official code)", word_map "first token, bicubic at token level (official code)",
   token_level 2, mask_level 0; Z2I Cross-Attention Mixup with passes "two passes (official code)",
   mask_normalisation "per layer (official code)"; Z2I CSG Sampler with source_trajectory "reconstruction
   (official code)", lambda_pre = --lam, delta 1.5, clamp_pull and hard_mask_guard off; SamplerCustom with
   add_noise off, cfg = --cfg, positive = the target caption, negative = the caption, the inversion's noise and
   sigmas. Per-step latents come from the sampler's callback (core's sample_custom with the node's SAMPLER, the
   same call SamplerCustom makes; its result is checked against SamplerCustom's); the reference pass is the same
   CSG SAMPLER run with lambda_pre 0 on the unpatched model and the caption as both prompts (the code's
   CFG-neutral reconstruction).
3. Negative controls, to show the scale of a real algorithmic difference: the official code with
   posterior_guidance 0 and no mixup (mixup_type []), and the pack's paper form (variant "current level",
   source_pass / source_trajectory "inversion trajectory (paper Alg. 1)", word map "token span ... (ours)",
   "one pass (ours)"), each compared with the official code's final latent.

Units: the code's latents are VP latents (scaled by 0.18215). ComfyUI's model-space latent is
x = x_VP * sqrt(1 + sigma^2) (callback x; the inversion's trajectory), its LATENT outputs are that divided by the
latent scale; the sampler's result on a schedule ending at sigma(0) is already the VP latent (guidance.ddim.finish).
The schedule: as tests/test_diffusers_parity.py, the code's schedulers get ComfyUI's alphas_cumprod =
1 / (1 + sigma^2) of the model's sigmas (the two libraries round the cumprod differently by up to 1.3e-5
relative; --stock-schedule keeps diffusers' own).

Sizes: the code's mask reads the cross-attention layers with HW <= mask_res^2 and reshapes those at exactly
mask_res^2 (16 at 512 px: latent / 4). The default --mask-res is latent / 4 (2 at 64 px, 4 at 128 px), the
same layers as the pack's token_level 2. Any size whose latent is a multiple of 8 runs (the tiny UNet has 3
downsamplings).

Shims (runtime only; the official files stay untouched)
--------------------------------------------------------
The code targets diffusers 0.12.1 / transformers 4.2x (docs/CSG_OFFICIAL_CODE.md section 7). For diffusers
0.42 / transformers 5:
- `diffusers.models.attention.CrossAttention` is gone: set to a subclass of `attention_processor.Attention`
  named `CrossAttention`, and every Attention module of the converted UNet is re-classed to it, so the code's
  `type(m).__name__ == "CrossAttention"` checks (cross_attention.py:96, edit_pipeline.py:138, :251) find them.
  The subclass's `prepare_attention_mask` takes the code's two-argument call (the new signature needs
  batch_size; the mask is None for SD, returned as is).
- `diffusers.utils.randn_tensor` -> `diffusers.utils.torch_utils.randn_tensor`; `transformers.
  CLIPFeatureExtractor` -> `CLIPImageProcessor` (import-time names only; neither is called: latents are given,
  there is no safety checker).
- `clip` (openai-clip: its `pkg_resources` import fails on setuptools >= 81) is a stub module: target_prompt.py
  imports it, but only its fallback for a source word that is not a whole caption word uses it (then the stub
  raises). `lavis` (BLIP captioning in inversion.py) is not imported at all: the caption is typed.
- The code's modules import each other as top-level `base_pipeline` / `cross_attention` (after
  `sys.path.insert(0, "src/utils")`, relative to its cwd): they are loaded from the checkout by file path and
  registered under those names; the rest under `csg_official_*` (ComfyUI owns the top-level `utils`).
- The tiny checkpoint's VAE is TAESD (AutoencoderTiny), whose config has no `block_out_channels` (used only for
  the default height): registered as 4 levels (factor 8). The inversion's `vae.encode(x).latent_dist.sample()`
  (a random VAE sample in the code) is replaced, on that instance and for that call only, by ComfyUI's VAE
  Encode latent, so both sides start from the same tensor; decoded images are not compared (the code decodes
  with 1 / 0.18215, TAESD takes scaled latents).

--mask-override replaces the smoothed mask M_hat on both sides by the same synthetic soft object map (the code:
the result of its einsum, whose computed value is still recorded and compared; the pack: a LoadImageMask of the
same 8-bit PNG, inverted, as the background of the mixup and the sampler). On the random tiny UNet the
self-attention smoothing makes M_hat nearly uniform (e.g. 0.674..0.683 at 64 px), so after the code's per-layer
max normalisation the mixup mixes in well under 1 % of the source maps: its effect on the final latent is then
only ~1e-3, and the parity of the default run checks it to that scale only. With the override it is exercised
(the "pull only" control shows the mixup's share).

Output: one line per stage, relative L2 = ||ours - official|| / ||official|| (and max|diff| / std(official),
which is inflated for the nearly uniform masks: read the relative L2 there), the first stage above 1e-4, then
the negative controls. The exit code is 0 unless something crashes. `--json OUT` writes the numbers.
The issue's bar: the final latent within 1e-4 relative L2 of the official code at 64 px / 10 steps and
128 px / 25 steps.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
CKPT = "z2i-tiny-sd15.safetensors"
BAR = 1e-4

CODE = {"variant": "CSG code (N-2 steps)", "source": "reconstruction (official code)",
        "word_map": "first token, bicubic at token level (official code)", "passes": "two passes (official code)"}
PAPER = {"variant": "current level", "source": "inversion trajectory (paper Alg. 1)",
         "word_map": "token span, bilinear at mask level (ours)", "passes": "one pass (ours)"}


def log(msg: str) -> None:
    print(f"[csg_parity] {msg}", file=sys.stderr, flush=True)


# -- shims and loading of the official code --------------------------------------------------------------------
def install_shims():
    """The import-time names the code needs from diffusers 0.12 / transformers 4 / openai-clip (see the module
    docstring). Returns the CrossAttention class the UNet's attention modules are re-classed to."""
    import diffusers.models.attention as dm_attention
    import diffusers.utils
    import transformers
    from diffusers.models.attention_processor import Attention

    existing = getattr(dm_attention, "CrossAttention", None)
    if existing is not None and getattr(existing, "_z2i_shim", False):
        return existing

    class CrossAttention(Attention):
        """diffusers' Attention under its 0.12 name, with the 0.12 two-argument prepare_attention_mask."""
        _z2i_shim = True

        def prepare_attention_mask(self, attention_mask, target_length, batch_size=None, out_dim=3):
            if attention_mask is None:
                return None
            return super().prepare_attention_mask(attention_mask, target_length,
                                                  batch_size or attention_mask.shape[0], out_dim)

    if existing is None:
        dm_attention.CrossAttention = CrossAttention
    if not hasattr(diffusers.utils, "randn_tensor"):
        from diffusers.utils.torch_utils import randn_tensor
        diffusers.utils.randn_tensor = randn_tensor
    if not hasattr(transformers, "CLIPFeatureExtractor"):
        image_processor = transformers.CLIPImageProcessor
        # resolving a lazy name can swap sys.modules["transformers"] for a new module object: set it there
        sys.modules["transformers"].CLIPFeatureExtractor = image_processor
    if "clip" not in sys.modules:
        try:
            import clip  # noqa: F401  (a working openai-clip is used as is)
        except Exception:   # noqa: BLE001  (pkg_resources missing, or not installed)
            stub = types.ModuleType("clip")
            stub.__doc__ = "csg_parity stub: openai-clip does not import here (pkg_resources)"

            def _missing(*a, **k):
                raise RuntimeError("openai-clip is not available: the task's source word must be a whole word of "
                                   "the caption (make_target_prompt's CLIP fallback is not run)")
            stub.tokenize = stub.load = _missing
            sys.modules["clip"] = stub
    return CrossAttention


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, str(path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_official(root: Path) -> types.SimpleNamespace:
    utils = root / "src" / "utils"
    if not (utils / "edit_pipeline.py").is_file():
        raise SystemExit(f"--official {root}: no src/utils/edit_pipeline.py there (a checkout of Hleephilip/CSG)")
    cross_attention_cls = install_shims()
    saved = list(sys.path)
    try:
        for top in ("base_pipeline", "cross_attention"):
            have = sys.modules.get(top)
            if have is not None and Path(getattr(have, "__file__", "")).resolve() != (utils / f"{top}.py").resolve():
                raise RuntimeError(f"a module named {top!r} is already imported from {have.__file__}")
            if have is None:
                _load(top, utils / f"{top}.py")
        mods = {n: _load(f"csg_official_{n}", utils / f"{n}.py")
                for n in ("scheduler", "ddim_inv", "edit_pipeline", "target_prompt")}
    finally:
        sys.path[:] = saved          # the code inserts the relative "src/utils" at import
    return types.SimpleNamespace(CrossAttention=cross_attention_cls, **mods)


# -- small helpers ---------------------------------------------------------------------------------------------
def rel(ours, ref) -> float:
    ours, ref = ours.double().cpu(), ref.double().cpu()
    return float((ours - ref).norm() / ref.norm().clamp_min(1e-30))


def maxstd(ours, ref) -> float:
    ours, ref = ours.double().cpu(), ref.double().cpu()
    return float((ours - ref).abs().max() / ref.std().clamp_min(1e-30))


@contextlib.contextmanager
def patched(obj, name: str, value):
    had = name in vars(obj) if hasattr(obj, "__dict__") else False
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            try:
                delattr(obj, name)
            except AttributeError:
                setattr(obj, name, old)


def record_steps(scheduler, out: list):
    """Wrap the scheduler instance's step: out gets (timestep, sample, model_output, prev_sample) per call."""
    inner = scheduler.step

    def step(model_output, timestep, sample, *a, **k):
        res = inner(model_output, timestep, sample, *a, **k)
        prev = res.prev_sample if hasattr(res, "prev_sample") else res[0]
        out.append((int(timestep), sample.detach().clone(), model_output.detach().clone(), prev.detach().clone()))
        return res
    return patched(scheduler, "step", step)


@contextlib.contextmanager
def record_einsum(out: list, override=None):
    """torch.einsum passed through; the code's mask smoothing call ('ij,bcj->bci', A, M_bar) recorded, and its
    result M_hat replaced by `override` ([H, W] object map, --mask-override) when given."""
    import torch
    inner = torch.einsum

    def einsum(eq, *operands):
        res = inner(eq, *operands)
        if isinstance(eq, str) and eq.replace(" ", "") == "ij,bcj->bci":
            ops = operands[0] if len(operands) == 1 and isinstance(operands[0], (list, tuple)) else operands
            out.append(tuple(o.detach().clone() for o in ops) + (res.detach().clone(),))
            if override is not None:
                res = override.to(res).reshape(1, 1, -1).expand(res.shape).clone()
        return res
    torch.einsum = einsum
    try:
        yield
    finally:
        torch.einsum = inner


def vp_of_model(x, sigma: float):
    return x.double() / math.sqrt(1.0 + float(sigma) ** 2)


def sigma_of_abar(a: float) -> float:
    return math.sqrt((1.0 - a) / a)


# -- the host's part: the checkpoint, the latent, the prompts --------------------------------------------------
SEEDED = "csg_parity_seed{seed}_{size}.latent"
MASK_PNG = "csg_parity_object_{size}.png"
EXAMPLE = "z2i_example.png"


def private_input(host) -> Path:
    """This run's own ComfyUI input folder (the host's stays untouched), holding a copy of the example image."""
    import shutil
    folder = Path(tempfile.mkdtemp(prefix="csg_parity_input_"))
    shutil.copy(Path(host.folder_paths.get_input_directory()) / EXAMPLE, folder / EXAMPLE)
    host.set_input_dir(folder)
    return folder


def seeded_latent(folder: Path, args) -> None:
    """--seed: a unit-variance VP latent randn(seed) (ComfyUI units: / 0.18215), written as a .latent file for
    LoadLatent (format version 0: loaded without a multiplier)."""
    import torch
    from safetensors.torch import save_file
    lat = args.size // 8
    raw = torch.randn((1, 4, lat, lat), generator=torch.Generator().manual_seed(args.seed)) / 0.18215
    save_file({"latent_tensor": raw.contiguous(), "latent_format_version_0": torch.tensor([])},
              str(folder / SEEDED.format(seed=args.seed, size=args.size)))


def object_mask_png(folder: Path, args):
    """--mask-override: a soft object map M (a Gaussian blob, 0.15 at the rim to 0.9 in the centre, in steps of
    1/255) written as an 8-bit PNG at image size (each latent pixel an 8x8 block). Returns M at latent size, read
    back exactly as ComfyUI's LoadImageMask reads it (float32 value / 255), so both sides hold the same bits."""
    import numpy as np
    import torch
    from PIL import Image
    lat = args.size // 8
    c = (lat - 1) / 2
    yy, xx = np.mgrid[0:lat, 0:lat]
    m = 0.15 + 0.75 * np.exp(-((yy - c) ** 2 + (xx - c) ** 2) / (2 * (lat / 4) ** 2))
    k = np.round(m * 255).astype(np.uint8)
    path = folder / MASK_PNG.format(size=args.size)
    Image.fromarray(np.kron(k, np.ones((8, 8), dtype=np.uint8)), mode="L").save(path)
    back = np.array(Image.open(path).convert("RGBA").getchannel("R")).astype(np.float32) / 255.0
    return torch.from_numpy(back[::8, ::8].copy())


def base_graph(args) -> dict:
    from z2i.tests.helpers import inverted_image_graph
    p = inverted_image_graph(CKPT, args.caption, steps=args.steps, size=args.size)
    if args.seed is not None:
        for k in ("img", "scale", "rep"):
            del p[k]
        p["enc"] = {"class_type": "LoadLatent", "inputs": {"latent": SEEDED.format(seed=args.seed, size=args.size)}}
    return p


def host_front(host, args, target_prompt: str):
    p = base_graph(args)
    p["tgt"] = {"class_type": "CLIPTextEncode", "inputs": {"text": target_prompt, "clip": ["ckpt", 1]}}
    return host.run_prompt(p, targets=["enc", "pos", "tgt", "ckpt"] + (["scale"] if "scale" in p else []))


def build_official(peer, off, host, res, args):
    """The code's two pipelines (EditingPipeline with diffusers' DDIMScheduler, DDIMInversion with the code's
    DDIMInverseScheduler) sharing the converted modules."""
    from diffusers import DDIMScheduler
    from diffusers.models.attention_processor import Attention

    model, vae = res.output("ckpt", 0), res.output("ckpt", 2)
    raw = res.output("enc", 0)["samples"].float()
    cond = res.output("pos", 0)[0][0].float()
    p2p = peer.build_pipeline(host.folder_paths.get_full_path("checkpoints", CKPT),
                              model.model.model_config.unet_config, host.host_dir)
    conversion = peer.check_conversion(p2p, model, vae, args.caption, cond, raw)   # raises when off
    unet, text_encoder, tokenizer, vae_d = p2p.unet, p2p.text_encoder, p2p.tokenizer, p2p.vae
    n = 0
    for m in unet.modules():
        if type(m) is Attention:
            m.__class__ = off.CrossAttention            # the code finds its layers by this class name
            n += 1
    if "block_out_channels" not in vae_d.config:
        vae_d.register_to_config(block_out_channels=(64, 64, 64, 64))     # TAESD: 3 downsamplings, factor 8
    sched = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    common = dict(vae=vae_d, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    edit = off.edit_pipeline.EditingPipeline(scheduler=DDIMScheduler(**sched), **common)
    inv = off.ddim_inv.DDIMInversion(scheduler=off.scheduler.DDIMInverseScheduler(**sched), **common)
    for pipe in (edit, inv):
        pipe.set_progress_bar_config(disable=True)
    abar_comfy = (1 / (1 + model.get_model_object("model_sampling").sigmas.double() ** 2)).float()
    schedule_diff = float(((abar_comfy - edit.scheduler.alphas_cumprod) / abar_comfy).abs().max())
    if not args.stock_schedule:
        for s in (edit.scheduler, inv.scheduler):
            s.alphas_cumprod = abar_comfy.clone()
            s.final_alpha_cumprod = abar_comfy[0].clone()
    del p2p
    return types.SimpleNamespace(edit=edit, inv=inv, conversion=conversion, attention_modules=n,
                                 schedule_diff=schedule_diff, raw=raw)


def run_official_inversion(o, res, args):
    import numpy as np
    import torch
    from PIL import Image
    if args.seed is None:
        img = res.output("scale", 0)[0].float().clamp(0, 1).cpu().numpy()
    else:
        img = np.full((args.size, args.size, 3), 0.5, dtype=np.float32)
    pil = Image.fromarray(np.round(img * 255).astype(np.uint8))            # only handed to the shimmed encode
    raw = o.raw

    def encode(x, *a, **k):
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(sample=lambda *a, **k: raw.clone()))
    steps: list = []
    with patched(o.inv.vae, "encode", encode), record_steps(o.inv.scheduler, steps):
        x_inv, _, _ = o.inv(args.caption, guidance_scale=1, num_inversion_steps=args.steps, img=pil,
                            torch_dtype=torch.float32)
    # the trajectory: the clean latent (level abar[r]) and each step's output (level abar[t + r - 1])
    r = 1000 // args.steps
    traj = [(r, steps[0][1])] + [(t + r - 1, prev) for (t, _, _, prev) in steps] if steps else []
    return x_inv.detach().clone(), traj, len(steps)


def run_official_edit(o, off, x_T, tgt_prompt, idx, args, lam, mixup_type, override=None):
    steps, ein, decoded, matching = [], [], [], []
    edit = o.edit
    inner_decode, inner_match = edit.decode_latents, edit.generate_token_matching_dict

    def decode(latents):
        decoded.append(latents.detach().clone())
        return inner_decode(latents)

    def match(*a, **k):
        d = inner_match(*a, **k)
        matching.append(dict(d))
        return d
    with record_steps(edit.scheduler, steps), record_einsum(ein, override), patched(edit, "decode_latents", decode), \
            patched(edit, "generate_token_matching_dict", match):
        edit(args.caption, tgt_prompt=tgt_prompt, num_inference_steps=args.steps, x_in=x_T.clone(),
             guidance_scale=args.cfg, negative_prompt=args.caption, task_name=args.task, mask_res=args.mask_res,
             tgt_word_start_idx=idx, posterior_guidance=lam, mixup_type=list(mixup_type))
    n = args.steps
    out = types.SimpleNamespace(
        ref_latents=[s[1] for s in steps[:n]], ref_final=decoded[0], edit_latents=[s[1] for s in steps[n:]],
        final=decoded[1], token_matching=matching[0] if matching else None, timesteps=[s[0] for s in steps[:n]])
    if ein:
        a, m_bar, m_hat = ein[0]
        hw = x_T.shape[-2:]
        out.A, out.M_bar, out.M_hat = a, m_bar.reshape(*m_bar.shape[:2], *hw), m_hat.reshape(*m_hat.shape[:2], *hw)
    return out


# -- the pack's part -------------------------------------------------------------------------------------------
def pack_graph(args, target_prompt: str, src_word: str, form: dict, lam: float) -> dict:
    p = base_graph(args)
    p["inv"]["inputs"]["variant"] = form["variant"]
    p["tgt"] = {"class_type": "CLIPTextEncode", "inputs": {"text": target_prompt, "clip": ["ckpt", 1]}}
    p["mask"] = {"class_type": "Z2I_CSGMask", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "inversion": ["inv", 1], "caption": args.caption,
        "word": src_word, "token_level": 2, "mask_level": 0, "source_maps": "don't keep",
        "source_pass": form["source"], "word_map": form["word_map"]}}
    p["mix"] = {"class_type": "Z2I_CrossAttentionMixup", "inputs": {
        "model": ["ckpt", 0], "background": ["mask", 0], "strength": 1.0, "clip": ["ckpt", 1],
        "source_prompt": args.caption, "target_prompt": target_prompt,
        "mask_normalisation": "per layer (official code)", "passes": form["passes"]}}
    p["sampler"] = {"class_type": "Z2I_CSGSampler", "inputs": {
        "inversion": ["inv", 1], "background": ["mask", 0], "lambda_pre": lam, "delta": 1.5, "clamp_pull": False,
        "hard_mask_guard": False, "source_trajectory": form["source"]}}
    if args.mask_override:           # the synthetic object map's background, for the mixup and the sampler
        p["ovr"] = {"class_type": "LoadImageMask", "inputs": {"image": MASK_PNG.format(size=args.size),
                                                              "channel": "red"}}
        p["ovr_bg"] = {"class_type": "InvertMask", "inputs": {"mask": ["ovr", 0]}}
        p["mix"]["inputs"]["background"] = p["sampler"]["inputs"]["background"] = ["ovr_bg", 0]
    p["s"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["mix", 0], "add_noise": False, "noise_seed": 0, "cfg": args.cfg, "positive": ["tgt", 0],
        "negative": ["pos", 0], "sampler": ["sampler", 0], "sigmas": ["inv", 2], "latent_image": ["inv", 0]}}
    return p


def missing_pack_options(host) -> list[str]:
    want = {"Z2I_DDIMInversion": {"variant": CODE["variant"]},
            "Z2I_CSGMask": {"source_pass": CODE["source"], "word_map": CODE["word_map"]},
            "Z2I_CrossAttentionMixup": {"passes": CODE["passes"]},
            "Z2I_CSGSampler": {"source_trajectory": CODE["source"]}}
    missing = []
    for cls, opts in want.items():
        try:
            info = host.input_types(cls)
        except KeyError:
            missing.append(f"{cls} (node)")
            continue
        spec = {**info.get("required", {}), **info.get("optional", {})}
        for name, value in opts.items():
            if name not in spec:
                missing.append(f"{cls}.{name}")
                continue
            options = spec[name][0] if isinstance(spec[name][0], (list, tuple)) else \
                (spec[name][1] or {}).get("options", [])
            if value not in list(options):
                missing.append(f"{cls}.{name} = {value!r}")
    return missing


def run_pack(host, args, target_prompt: str, src_word: str, form: dict, lam: float, per_step: bool):
    import comfy.sample
    import comfy.samplers
    import torch
    import torch.nn.functional as F

    res = host.run_prompt(pack_graph(args, target_prompt, src_word, form, lam),
                          targets=["s", "inv", "mask", "mix", "sampler", "pos", "tgt", "ckpt"])
    model = res.output("ckpt", 0)
    scale = float(model.get_model_object("latent_format").scale_factor)
    sigmas = res.output("inv", 2)
    inversion = res.output("inv", 1)
    k_max = math.sqrt(1 + float(sigmas[0].double()) ** 2)
    out = types.SimpleNamespace(sigmas=sigmas, scale=scale)
    out.x_T = res.output("inv", 0)["samples"].double() * scale / k_max
    traj = inversion.trajectory
    out.traj = [(float(s), vp_of_model(x, float(s))) for s, x in zip(traj.sigmas, traj.latents)]
    lat_hw = tuple(res.output("inv", 0)["samples"].shape[-2:])
    bg = res.output("mask", 0)
    bg = bg if bg.ndim == 3 else bg[None]
    obj = res.output("mask", 1)[..., 0]
    word = res.output("mask", 2)[..., 0]
    area = lambda m: F.interpolate(m[:, None].float(), size=lat_hw, mode="area")[:, 0]  # noqa: E731
    out.M_hat, out.word_map, out.background = area(obj), area(word), area(bg)
    out.override_bg = area(res.output("ovr_bg", 0)) if "ovr_bg" in res._outputs else None
    out.final = res.output("s", 0)["samples"].double() * scale
    if not per_step:
        return out
    tgt, pos = res.output("tgt", 0), res.output("pos", 0)
    node = res.output("sampler", 0)
    latent = res.output("inv", 0)["samples"]

    def run(m, sampler, positive, negative):
        xs = []

        def cb(i, denoised, x, total):
            xs.append((i, x.detach().clone()))
        with torch.inference_mode():
            r = comfy.sample.sample_custom(m, torch.zeros_like(latent), args.cfg, sampler, sigmas, positive, negative,
                                           latent, callback=cb, disable_pbar=True)
        xs.sort(key=lambda e: e[0])
        return r.double() * scale, [vp_of_model(x, float(sigmas[i])) for i, x in xs]
    ksampler = comfy.samplers.KSAMPLER(node.sampler_function, node.extra_options)
    out.final_direct, out.edit_latents = run(res.output("mix", 0), ksampler, tgt, pos)
    # the reference pass: the same sampler, no pull, no mixup, the caption as both prompts (CFG-neutral)
    plain = comfy.samplers.KSAMPLER(node.sampler_function, {**node.extra_options, "lambda_pre": 0.0})
    out.ref_final, out.ref_latents = run(model, plain, pos, pos)
    return out


# -- main ------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, type=Path, help="a checkout of GitHub Hleephilip/CSG")
    ap.add_argument("--size", type=int, default=64, help="image size in pixels (latent = size / 8)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lam", type=float, default=10.0, help="the code's --posterior_guidance (pack: lambda_pre)")
    ap.add_argument("--cfg", type=float, default=5.0, help="the code's --negative_guidance_scale")
    ap.add_argument("--caption", default="a photo of a cat on a sofa")
    ap.add_argument("--task", default="cat2dog", help="the code's --task_name: source word 2 target word")
    ap.add_argument("--seed", type=int, default=None,
                    help="start from a seeded unit-variance latent randn(seed) instead of the example image's VAE "
                         "Encode (z2i_example.png at --size)")
    ap.add_argument("--mask-res", type=int, default=None, help="the code's --mask_res (default latent / 4)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("Z2I_TEST_THREADS", "1")))
    ap.add_argument("--stock-schedule", action="store_true",
                    help="keep diffusers' alphas_cumprod instead of ComfyUI's (see the docstring)")
    ap.add_argument("--mask-override", action="store_true",
                    help="replace the smoothed mask M_hat on both sides by a synthetic soft object map (the code's "
                         "einsum result; the pack's background input of the mixup and the sampler), so that the "
                         "mixup, which a near-uniform M_hat on random weights leaves almost idle, is exercised")
    ap.add_argument("--official-only", action="store_true", help="skip the pack side")
    ap.add_argument("--no-controls", action="store_true", help="skip the negative controls")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    ap.add_argument("--verbose", action="store_true", help="every step's numbers")
    args = ap.parse_args(argv)
    if args.size % 64:
        log(f"--size {args.size}: the tiny UNet needs a latent that is a multiple of 8 (size a multiple of 64)")
    lat = args.size // 8
    if args.mask_res is None:
        args.mask_res = max(1, lat // 4)

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    pythonpath = REPO / ".host" / "pythonpath"
    if str(pythonpath) not in sys.path:
        sys.path.insert(0, str(pythonpath))
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    import peer_pix2pix_zero as peer
    peer.ensure_bench_deps()
    t0 = time.time()
    from z2i.headless.host import Host
    host = Host.get(output_dir=Path(tempfile.mkdtemp(prefix="csg_parity_")))
    off = load_official(args.official.resolve())
    override = None
    if args.seed is not None or args.mask_override:
        folder = private_input(host)
        if args.seed is not None:
            seeded_latent(folder, args)
        if args.mask_override:
            override = object_mask_png(folder, args)

    src_word, tgt_word = args.task.split("2")
    tgt_prompt, idx = off.target_prompt.make_target_prompt(args.caption, src_word, tgt_word, None, None, "cpu")
    idx = int(idx)
    log(f"caption {args.caption!r} -> {tgt_prompt!r} (word index {idx}), {args.size} px, {args.steps} steps, "
        f"mask_res {args.mask_res}, lambda {args.lam}, cfg {args.cfg}, {args.threads} thread(s)")
    res = host_front(host, args, tgt_prompt)
    o = build_official(peer, off, host, res, args)
    log(f"conversion checked against ComfyUI's modules: {o.conversion}; {o.attention_modules} attention modules "
        f"re-classed; schedule diffusers vs ComfyUI max rel {o.schedule_diff:.2e} "
        f"({'diffusers' if args.stock_schedule else 'ComfyUI'}'s used)")

    with torch.inference_mode(False), torch.no_grad():
        x_T, inv_traj, inv_calls = run_official_inversion(o, res, args)
        log(f"official inversion: {inv_calls} UNet calls (N-2 = {args.steps - 2})")
        code = run_official_edit(o, off, x_T, tgt_prompt, idx, args, args.lam, ["cross-attention", "noise"],
                                 override)
        log(f"official edit: token matching {code.token_matching}")
        neg = parts = None
        if not args.no_controls:
            neg = run_official_edit(o, off, x_T, tgt_prompt, idx, args, 0.0, [], override)
            # each part's own effect: the code without its mixup, and without its pull
            parts = {"official, pull only (mixup_type ['noise'])":
                     run_official_edit(o, off, x_T, tgt_prompt, idx, args, args.lam, ["noise"], override),
                     "official, mixup only (mixup_type ['cross-attention'])":
                     run_official_edit(o, off, x_T, tgt_prompt, idx, args, args.lam, ["cross-attention"],
                                       override)}

    rows: list[tuple] = []      # (stage, rel L2, max/std, note)
    numbers: dict = {"size": args.size, "steps": args.steps, "lam": args.lam, "cfg": args.cfg,
                     "caption": args.caption, "target": tgt_prompt, "mask_res": args.mask_res,
                     "token_matching": {str(k): v for k, v in (code.token_matching or {}).items()},
                     "official": {"inversion_unet_calls": inv_calls,
                                  "x_T_std": float(x_T.std()), "final_std": float(code.final.std()),
                                  "M_hat_range": [float(code.M_hat.min()), float(code.M_hat.max())]},
                     "stages": {}, "controls": {}}
    identity = all(k == v for k, v in (code.token_matching or {}).items())
    log(f"official M_hat in [{float(code.M_hat.min()):.4f}, {float(code.M_hat.max()):.4f}], M_bar in "
        f"[{float(code.M_bar.min()):.4f}, {float(code.M_bar.max()):.4f}]; token matching "
        f"{'identity' if identity else 'NOT identity'}")

    pack = None
    if not args.official_only:
        missing = missing_pack_options(host)
        if missing:
            log("pack side skipped: the pack lacks " + ", ".join(missing))
            numbers["pack_missing"] = missing
        else:
            pack = run_pack(host, args, tgt_prompt, src_word, CODE, args.lam, per_step=True)

    if pack is not None:
        rows.append(("x_T (inversion output)", rel(pack.x_T, x_T), maxstd(pack.x_T, x_T), ""))
        # the inversion's trajectory, matched by level
        matched, worst, worst_ms, first_bad = 0, 0.0, float("nan"), None
        for t_level, lat_off in inv_traj:
            a = float(o.inv.scheduler.alphas_cumprod[t_level])
            s = sigma_of_abar(a)
            hit = [x for (sp, x) in pack.traj if abs(sp - s) <= 1e-4 * s]
            if hit:
                matched += 1
                e = rel(hit[0], lat_off)
                if e >= worst:
                    worst, worst_ms = e, maxstd(hit[0], lat_off)
                if first_bad is None and e > BAR:
                    first_bad = t_level
        rows.append((f"inversion trajectory ({matched}/{len(inv_traj)} levels matched)", worst, worst_ms,
                     "" if first_bad is None else f"first > {BAR:g} at abar[{first_bad}]"))
        # the reference pass
        rows += per_step_rows("reference pass x_src_t", pack.ref_latents, code.ref_latents, args.verbose)
        rows.append(("reference pass final (reconstruction)", rel(pack.ref_final, code.ref_final),
                     maxstd(pack.ref_final, code.ref_final), ""))
        # the mask
        m_bar = code.M_bar[:, 0]
        rows.append(("word map M_bar / max (latent res)", rel(pack.word_map, m_bar / m_bar.max()),
                     maxstd(pack.word_map, m_bar / m_bar.max()), "pack: word_map output, area-resized"))
        rows.append(("object map M_hat (latent res)", rel(pack.M_hat, code.M_hat[:, 0]),
                     maxstd(pack.M_hat, code.M_hat[:, 0]), "pack: object_map output, area-resized"))
        rows.append(("background P = 1 - M_hat", rel(pack.background, 1 - code.M_hat[:, 0]),
                     maxstd(pack.background, 1 - code.M_hat[:, 0]), "pack: background MASK, area-resized"))
        if override is not None and pack.override_bg is not None:
            rows.append(("--mask-override: pack's background vs 1 - M", rel(pack.override_bg, 1 - override[None]),
                         maxstd(pack.override_bg, 1 - override[None]), "the edit below uses this mask"))
        rows += per_step_rows("edit x_t", pack.edit_latents, code.edit_latents, args.verbose)
        rows.append(("final latent (SamplerCustom)", rel(pack.final, code.final), maxstd(pack.final, code.final),
                     f"bar {BAR:g}: {'PASS' if rel(pack.final, code.final) < BAR else 'FAIL'}"))
        rows.append(("final latent (direct call) vs SamplerCustom", rel(pack.final_direct, pack.final),
                     maxstd(pack.final_direct, pack.final), "sanity: should be 0"))

    controls = []
    if neg is not None:
        controls.append(("official, lambda 0 and no mixup", rel(neg.final, code.final), maxstd(neg.final, code.final)))
        controls.append(("official, reconstruction vs edit", rel(code.ref_final, code.final),
                         maxstd(code.ref_final, code.final)))
        for name, part in parts.items():
            controls.append((name, rel(part.final, code.final), maxstd(part.final, code.final)))
        if pack is not None:
            paper = run_pack(host, args, tgt_prompt, src_word, PAPER, args.lam, per_step=False)
            controls.append(("pack paper form (current level, inversion trajectory, span map, one pass)",
                             rel(paper.final, code.final), maxstd(paper.final, code.final)))

    print()
    print(f"CSG parity: official code ({args.official}) vs the pack, tiny SD1.5, {args.size} px "
          f"(latent {lat}x{lat}, mask_res {args.mask_res}), {args.steps} steps, lambda {args.lam}, cfg {args.cfg}"
          + (", input randn(seed %d)" % args.seed if args.seed is not None else ", input: the example image")
          + (", M_hat replaced by a synthetic object map (--mask-override)" if override is not None else ""))
    print(f"  {args.caption!r} -> {tgt_prompt!r}; official token matching: {code.token_matching}"
          f" ({'identity' if identity else 'not the identity'})")
    if pack is None:
        print("  pack side: not run" + (f" (missing: {', '.join(numbers.get('pack_missing', []))})"
                                        if numbers.get("pack_missing") else ""))
    else:
        print(f"  {'stage':58s} {'rel L2':>10s} {'max/std':>10s}")
        for stage, e, m, note in rows:
            print(f"  {stage:58s} {e:10.2e} {m:10.2e}  {note}")
            numbers["stages"][stage] = {"rel_l2": e, "max_over_std": m, "note": note}
        first = next((stage for stage, e, _, _ in rows if not e <= BAR), None)
        numbers["first_stage_over_bar"] = first
        print(f"  first stage above {BAR:g} relative L2: {first or 'none'}")
    if controls:
        print("  negative controls (final latent against the official code's; the 'only' lines are the size of "
              "the other part's effect):")
        for stage, e, m in controls:
            print(f"  {stage:58s} {e:10.2e} {m:10.2e}")
            numbers["controls"][stage] = {"rel_l2": e, "max_over_std": m}
    numbers["seconds"] = round(time.time() - t0, 1)
    print(f"  ({numbers['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2, default=float))
    return 0


def per_step_rows(name, ours: list, ref: list, verbose: bool) -> list:
    n = min(len(ours), len(ref))
    if n == 0:
        return [(name, float("nan"), float("nan"), f"no steps ({len(ours)} ours, {len(ref)} official)")]
    errs = [rel(ours[i], ref[i]) for i in range(n)]
    first = next((i for i, e in enumerate(errs) if e > BAR), None)
    rows = []
    if verbose:
        rows += [(f"{name} step {i}", errs[i], maxstd(ours[i], ref[i]), "") for i in range(n)]
    worst = max(range(n), key=lambda i: errs[i])
    note = f"worst at step {worst}" + ("" if first is None else f"; first > {BAR:g} at step {first}")
    if len(ours) != len(ref):
        note += f"; {len(ours)} ours vs {len(ref)} official"
    rows.append((f"{name} (all {n} steps, worst)", errs[worst], maxstd(ours[worst], ref[worst]), note))
    return rows


if __name__ == "__main__":
    sys.exit(main())
