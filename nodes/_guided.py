"""The per-run state of a gradient-guided sampling run, one primitive for every guided method (pix2pix-zero,
pix2pix-zeroCon, AGG, h-space direction training): what ComfyUI's memory manager must load before anything is
aliased, how much memory the backward pass needs, which memory mode runs, the loss scaler of half-precision
networks, and the per-run stores freed on every exit path.

Settings (`Z2I GPU Settings` node, a MODEL patch: nodes/settings.py) travel in the model options under
SETTINGS_KEY; without the node every run uses DEFAULTS:
- memory: "auto" | "fast" | "low". fast keeps every activation of a guided UNet call for its backward pass and
  guides pix2pix-zero's two CFG halves in one batched call; low recomputes the activations of the large layers
  instead of keeping them (guidance.autograd.checkpointed) and guides the halves one after the other; auto picks
  fast when the estimate of fast's extra memory (guided_bytes) fits the free memory the device has once every
  network of the run is loaded, else low.
- batch: "batched" (the rows of a batch in one UNet call, as core samples) | "per image" (one row at a time: each
  image computed with exactly the kernels it gets alone; the batch equals the single runs bit for bit).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..guidance.autograd import LossScaler

SETTINGS_KEY = "z2i_settings"
MEMORY_MODES = ("auto", "fast", "low")
BATCH_MODES = ("batched", "per image")
DEFAULTS = {"memory": "auto", "batch": "batched"}


def settings_of(model_options) -> dict:
    """The run's Z2I settings (DEFAULTS where the GPU Settings node set nothing)."""
    got = ((model_options or {}).get(SETTINGS_KEY) or {})
    return {**DEFAULTS, **{k: v for k, v in got.items() if k in DEFAULTS}}


def per_image(extra_args_or_options) -> bool:
    """Whether this run evaluates the UNet one batch row at a time (batch = "per image")."""
    mo = extra_args_or_options.get("model_options", extra_args_or_options) if extra_args_or_options else {}
    return settings_of(mo)["batch"] == "per image"


# -- the memory estimate -----------------------------------------------------------------------------------------
# Bytes a guided UNet call keeps for its backward pass, per latent position of the layer's level, per channel, in
# units of the compute dtype's element size. Calibrated on the tiny SD1.5 and SDXL UNets (tests/test_gpu_path.py
# measures what autograd saves in a guided call with saved_tensors_hooks and checks the estimate against it):
# a ResBlock keeps about 7 tensors of its width (two GroupNorm inputs, two SiLU outputs, the conv inputs, the
# skip), a transformer block about 24 (LayerNorms, q/k/v, the attention outputs and softmax statistics, the
# GEGLU feed-forward's 8x and 4x activations), an MMDiT joint block about 30 of its hidden size per image token.
K_RESBLOCK, K_TRANSFORMER, K_JOINT = 7.0, 24.0, 30.0
# Low mode keeps each checkpointed layer's input (1 tensor of its width) and, during a recomputation, one layer's
# activations; layers below _compose.CHECKPOINT_POSITIONS keep theirs.


def _levels(unet):
    """(module, downsampling factor) for every ResBlock / SpatialTransformer / joint block of a diffusion model."""
    if hasattr(unet, "joint_blocks"):
        p = int(getattr(unet, "patch_size", 2))
        for blk in unet.joint_blocks:
            yield blk, p
        return
    f = 1
    for part in (unet.input_blocks, [unet.middle_block], unet.output_blocks):
        for blk in part:
            for m in blk:
                name = type(m).__name__
                if name in ("ResBlock", "SpatialTransformer", "SpatialVideoTransformer"):
                    yield m, f
                elif name == "Downsample":
                    f *= 2
                elif name == "Upsample":
                    f //= 2


def _layer_elements(m) -> tuple[float, float]:
    """(elements kept per position with every activation, elements of the layer's input per position)."""
    name = type(m).__name__
    if name == "ResBlock":
        c_in = int(getattr(m, "channels", 0))
        c_out = int(getattr(m, "out_channels", c_in) or c_in)
        return K_RESBLOCK * (c_in + c_out) / 2.0, float(c_in)
    if name in ("SpatialTransformer", "SpatialVideoTransformer"):
        blocks = len(getattr(m, "transformer_blocks", [])) or 1
        c = int(getattr(m, "in_channels", 0))
        inner = int(getattr(getattr(m, "proj_in", None), "out_features", 0) or
                    getattr(getattr(m, "proj_in", None), "out_channels", 0) or c)
        return K_TRANSFORMER * inner * blocks, float(c)
    hidden = 0                                                           # MMDiT joint block
    x_block = getattr(m, "x_block", None)
    attn = getattr(x_block, "attn", None)
    qkv = getattr(attn, "qkv", None)
    if qkv is not None:
        hidden = int(qkv.in_features)
    return K_JOINT * hidden, float(hidden)


def guided_bytes(unet, latent_hw: tuple, rows: int, dtype: torch.dtype, checkpoint: bool,
                 checkpoint_positions: int = 32 * 32) -> int:
    """Estimated memory a guided call of `rows` latent rows keeps for its backward pass beyond plain sampling
    (activations of the diffusion model in `dtype`, the compute dtype). checkpoint: low mode (layers on at least
    `checkpoint_positions` positions keep only their input, plus one layer's activations while it recomputes)."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    total, largest = 0.0, 0.0
    for m, f in _levels(unet):
        pos = (h // f) * (w // f)
        full, inp = _layer_elements(m)
        if checkpoint and pos >= checkpoint_positions:
            total += inp * pos
            largest = max(largest, full * pos)
        else:
            total += full * pos
    return int(rows * (total + largest) * size)


def compute_dtype(patcher) -> torch.dtype:
    """The dtype a ComfyUI model computes in: its manual cast dtype (fp8 or upcast weights, ModelComputeDtype's
    object patch) when set, else its weights' dtype."""
    return patcher.get_model_object("manual_cast_dtype") or patcher.model.get_dtype()


def choose_mode(memory: str, fast_bytes: int, free_bytes: int) -> str:
    """'fast' or 'low' for a settings value: auto = fast when its estimate fits in 80% of the free memory (the rest
    covers the allocator's fragmentation and the estimate's error)."""
    if memory in ("fast", "low"):
        return memory
    return "fast" if fast_bytes <= 0.8 * free_bytes else "low"


# -- the size guard ------------------------------------------------------------------------------------------------
def available_memory(device, keep=()) -> int:
    """Memory a run can have on `device`: what is free plus what ComfyUI would free by offloading models other than
    `keep` (ModelPatchers); on the CPU the process's available RAM (ComfyUI's get_free_memory)."""
    import comfy.model_management as mm
    free = int(mm.get_free_memory(device))
    if getattr(device, "type", "cpu") == "cpu":
        return free
    for lm in list(getattr(mm, "current_loaded_models", [])):
        try:
            if lm.device == device and not any(lm.model is k for k in keep):
                free += int(lm.model_loaded_memory())
        except (AttributeError, TypeError):
            continue
    return free


def check_fits(node: str, base, x: torch.Tensor, rows: int, extra_bytes: int = 0, keep=(),
               input_name: str = "latent_image (of the sampler node)", what: str = "") -> None:
    """Refuse, before any work, a latent whose UNet calls cannot fit the memory at hand: one call of `rows` rows
    (ComfyUI's own estimate, BaseModel.memory_required) plus `extra_bytes` (a guided call's activations, a mask
    pass's maps) against available_memory. The message names the node, the size, the estimate, what is free and the
    largest image side that fits (memory grows about linearly with the latent's positions)."""
    import math

    import comfy.model_management as mm

    from ._host import Z2IInputError
    h, w = int(x.shape[-2]), int(x.shape[-1])
    need = int(base.memory_required([rows, *x.shape[1:]])) + int(extra_bytes)
    have = available_memory(mm.get_torch_device(), keep)
    if need <= have:
        return
    side = 8 * max(h, w)
    fits = int(side * math.sqrt(max(have, 0) / need) // 64 * 64)
    gb = 2 ** 30
    fix = (f"scale the image to at most {fits} px a side (ImageScale), or edit fewer images per batch (GPU "
           "Settings: batch 'per image'), or free memory") if fits >= 64 else \
        "free memory (close other programs or models): not even a 64 px image fits now"
    raise Z2IInputError(node, input_name, f"a {8 * w}x{8 * h} px image ({w}x{h} latent, {rows} UNet row(s) per "
                        f"call{what}) needs about {need / gb:.2f} GB, and {have / gb:.2f} GB is available", fix)


# -- loading, refusals and the run ---------------------------------------------------------------------------------
def _weight_dtypes(nets) -> set:
    out = set()
    for net in nets:
        for p in net.parameters():
            out.add(p.dtype)
    return out


def refuse_unsupported(nets, node: str) -> None:
    """Attention kernels and weight formats that have no backward pass, refused with what to change."""
    from ._host import Z2IInputError
    try:
        import comfy.ldm.modules.attention as attention
        fn = getattr(attention, "optimized_attention", None)
        name = getattr(fn, "__name__", "")
    except ImportError:
        name = ""
    if "sage" in name.lower():
        raise Z2IInputError(node, "model", "ComfyUI runs SageAttention (--use-sage-attention), which has no "
                            "backward pass, and this sampler takes gradients through the UNet", "start ComfyUI "
                            "without --use-sage-attention (PyTorch attention is the default) for guided edits")
    from ._compose import fp8_matmul_fixed
    for net in nets:
        for m in net.modules():
            if fp8_matmul_fixed(m):
                raise Z2IInputError(node, "model", "this scaled-fp8 model multiplies in fp8 (ComfyUI's --fast "
                                    "fp8_matrix_mult), which has no backward pass", "start ComfyUI without --fast "
                                    "for guided edits, or use an fp16/bf16 checkpoint")


def control_patchers(model) -> list:
    """The ModelPatchers core loaded for this sampling run beside the model (ControlNets, GLIGEN, ...)."""
    loaded = getattr(model.inner_model, "loaded_models", None)
    return [m for m in (loaded or []) if hasattr(m, "model")]


@dataclass
class GuidedRun:
    """What a guided sampler reads while it runs: mode ('fast' | 'low'), the loss scaler, the estimate, stores."""
    mode: str
    settings: dict
    estimate: int
    free: int
    scaler: LossScaler

    @property
    def checkpoint(self) -> bool:
        return self.mode == "low"

    @property
    def per_image(self) -> bool:
        return self.settings["batch"] == "per image"

    def report(self, stats) -> None:
        if stats is not None:
            stats.update(memory_mode=self.mode, memory_estimate=self.estimate, free_memory=self.free,
                         loss_scale=self.scaler.scale, loss_scaled=self.scaler.enabled)


def fully_loaded(patcher) -> bool:
    """Whether a ModelPatcher's weights all sit on its load device (not partially loaded in lowvram mode)."""
    inner = getattr(patcher, "model", None)
    return not bool(getattr(inner, "model_lowvram", False))


@contextmanager
def guided_run(model, extra_args: dict, x: torch.Tensor, node: str, rows: int = 1, helpers=(), stats=None,
               cfg_call: bool = False):
    """Everything a guided run does around its loop, in the order ComfyUI needs it:
    1. every network the run backpropagates through (the UNet and what runs with it: control models, GLIGEN,
       patch modules; `helpers`: ModelPatchers of the VAE and open_clip a loss decodes and encodes with) loaded by
       ComfyUI's memory manager, with a memory_required of the guided call's extra memory (guided_bytes for the
       memory mode in use), helpers fully loaded on the compute device;
    2. the memory mode chosen (settings, free memory), the loss scaler made for the networks' compute dtypes;
    3. only then the weights aliased for autograd and the large layers checkpointed in low mode
       (_compose.gradients_through);
    4. on every exit (success, error, OOM, interrupt) the aliases and layers put back, so the shared model is as it
       was (the guidance loops clear their own map and feature stores in `finally` blocks).
    `rows`: latent rows one guided call holds at once per image (2 for pix2pix-zero's paired halves in fast mode);
    cfg_call: the guided call is the guider's full CFG call (AGG, h-direction training), which holds the cond and
    uncond rows of every image (core skips uncond at cfg 1)."""
    import comfy.model_management as mm

    from ._compose import gradients_through, guided_networks

    settings = settings_of(extra_args.get("model_options"))
    guider = model.inner_model
    base = guider.inner_model
    patcher = guider.model_patcher
    helpers = [h for h in helpers if h is not None]
    nets = guided_networks(model, extra_args)
    refuse_unsupported(nets, node)
    dtype = compute_dtype(patcher)
    batch = 1 if settings["batch"] == "per image" else int(x.shape[0])
    if cfg_call and float(getattr(guider, "cfg", 1.0)) != 1.0:
        rows *= 2
    hw = tuple(x.shape[-2:])
    from . import _compose
    fast = guided_bytes(base.diffusion_model, hw, batch * rows, dtype, checkpoint=False)
    low = guided_bytes(base.diffusion_model, hw, batch, dtype, checkpoint=True,
                       checkpoint_positions=_compose.CHECKPOINT_POSITIONS)
    want = low if settings["memory"] == "low" else fast
    keep = [patcher, *control_patchers(model), *[h.patcher for h in helpers]]
    check_fits(node, base, x[:batch], batch * rows, extra_bytes=low if settings["memory"] != "fast" else fast,
               keep=keep, what=f", memory mode {'fast' if settings['memory'] == 'fast' else 'low'}")
    if _aliasing():
        raise RuntimeError(f"{node}: a guided run started inside another one (weights are aliased)")
    mm.load_models_gpu([patcher, *control_patchers(model), *[h.patcher for h in helpers]], memory_required=want,
                       minimum_memory_required=low)
    for h in helpers:
        if not fully_loaded(h.patcher):          # open_clip / the VAE on one device: load them whole
            mm.load_models_gpu([h.patcher], force_full_load=True)
    free = int(mm.get_free_memory(mm.get_torch_device()))
    mode = choose_mode(settings["memory"], fast, free)
    dtypes = {dtype, *_weight_dtypes([h.module for h in helpers])}
    run = GuidedRun(mode=mode, settings=settings, estimate=fast if mode == "fast" else low, free=free,
                    scaler=LossScaler.for_dtypes(*dtypes))
    logging.debug("%s: memory mode %s (estimate %.0f MB, free %.0f MB), loss scaling %s", node, mode,
                  run.estimate / 2 ** 20, free / 2 ** 20, run.scaler.enabled)
    try:
        with gradients_through([*nets, *[h.module for h in helpers]], checkpoint=run.checkpoint):
            yield run
    finally:
        run.report(stats)


def _aliasing() -> bool:
    from ..guidance.autograd import aliasing_active
    return aliasing_active()


@dataclass
class Helper:
    """A network a guided loss runs beside the UNet: its ModelPatcher (for the memory manager) and its module."""
    patcher: object
    module: torch.nn.Module
