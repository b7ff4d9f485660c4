"""Gradient-guided UNet calls inside the graphs artists build: ControlNet / T2I-Adapter / GLIGEN in the
conditioning, other packs' model patches in the model options.

Two things break a backward pass through a ComfyUI UNet call that plain sampling never notices:
- Networks other than the UNet run inside the call (control models chained in the conditioning, GLIGEN's
  position net, modules that a model patch carries), and their weights were loaded under inference mode, so
  they "cannot be saved for backward". `guided_networks` finds them; guidance.autograd.autograd_parameters
  aliases them for the guided run exactly as it does the UNet's (no copy, originals restored afterwards).
- Core and other packs write into activations in place: core's apply_control adds control residuals into the
  skip tensors (`h += ctrl`) after the next input block saved them for backward; FreeU_V2 scales `h[:, :C/2]`
  in place after saving it. `guard_inplace` returns a copy of the model options in which (a) a first
  `input_block_patch_after_skip` hands the next input block a clone of h, so the tensor kept for the skip
  connection is no longer one the backward pass needs, and (b) every foreign patch function runs, when
  gradients are on, under a saved-tensors hook that stores copies of the activations it saves for backward
  (tensors that need a gradient; weights and constants are kept as they are), so its own in-place writes cannot invalidate them. Values are unchanged (tests compare guarded
  and plain calls); nothing is cloned when gradients are off, so unguided calls cost nothing more.
Neither touches the MODEL or the conditioning: both act on the per-run objects a sampler already holds.
"""
from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager

import torch

from ..attention_patches.controller import attn1_replace, attn2_replace, over
from ..attention_patches.features import attn1_output_capture
from ..attention_patches.joint import is_own as joint_own
from ..guidance.autograd import autograd_parameters, checked_backward, checkpointed

_OWN = (attn1_replace, attn2_replace, attn1_output_capture)     # Z2I's own patches save maps it needs as they are
GUARDED = "_z2i_inplace_guarded"


def guided_networks(model, extra_args: dict) -> list:
    """The UNet and every other network a UNet call of this sampling run may execute, for autograd_parameters.

    `model` is what core hands a KSAMPLER function (its inner_model is the guider holding the processed conds,
    whose inner_model is the BaseModel)."""
    guider = model.inner_model
    nets = [guider.inner_model.diffusion_model]
    for conds in (getattr(guider, "conds", None) or {}).values():
        for c in conds or []:
            ctrl, seen = c.get("control"), set()
            while ctrl is not None and id(ctrl) not in seen:      # a chain of ControlNets / adapters
                seen.add(id(ctrl))
                for attr in ("control_model", "t2i_model"):
                    m = getattr(ctrl, attr, None)
                    if isinstance(m, torch.nn.Module):
                        nets.append(m)
                ctrl = getattr(ctrl, "previous_controlnet", None)
            gligen = c.get("gligen")
            if gligen is not None and len(gligen) > 1:
                m = getattr(gligen[1], "model", None)
                if isinstance(m, torch.nn.Module):
                    nets.append(m)
    to = (extra_args.get("model_options") or {}).get("transformer_options") or {}
    for fn in _patch_functions(to):
        if isinstance(fn, torch.nn.Module):
            nets.append(fn)
        else:
            nets.extend(v for v in getattr(fn, "__dict__", {}).values() if isinstance(v, torch.nn.Module))
    return nets


# Guided calls recompute the activations of layers on at least this many latent positions during the backward pass
# instead of keeping them (32x32 and up: SD1.x's two finest levels at 512 px, its finest at 256 px; SDXL's two
# finest at 1024 px), where they dominate memory (docs/DEVELOPING.md "Memory of a guided call"); smaller layers
# keep theirs (recomputing them would cost time and save little). Tests lower it to exercise the path.
CHECKPOINT_POSITIONS = 32 * 32


def large_latent(x: torch.Tensor) -> bool:
    """A latent whose finest layers are checkpointed: guided samplers then also run their guided rows one at a
    time (one row's graph at a time) rather than batched."""
    return x.shape[-2] * x.shape[-1] >= CHECKPOINT_POSITIONS


def _large(x, *args, **kwargs) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 4 and large_latent(x)


def checkpoint_layers(nets) -> list:
    """The ResBlocks and SpatialTransformers of `nets` (UNets, ControlNets), each once: the layers whose
    activations a guided call may recompute (guidance.autograd.checkpointed)."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    seen, out = set(), []
    for net in nets:
        for m in net.modules():
            if isinstance(m, (ResBlock, SpatialTransformer)) and id(m) not in seen:
                seen.add(id(m))
                out.append(m)
    return out


@contextmanager
def gradients_through(nets, checkpoint: bool = True):
    """Backward passes through `nets` (the UNet and what runs with it, a VAE, open_clip) inside the block: their
    inference-mode weights aliased for autograd (guidance.autograd.autograd_parameters), fp8 linear layers on
    their upcasting path (fp8_upcast), the backward pass stoppable by Cancel (checked_backward), and with
    `checkpoint` (memory mode low) the activations of their large layers recomputed instead of kept
    (CHECKPOINT_POSITIONS). Entered by nodes._guided.guided_run, the one entry
    point of every guided sampler and trainer, after every network is loaded, so a fix here reaches every method."""
    import comfy.model_management
    with ExitStack() as stack:
        stack.enter_context(autograd_parameters(*nets))
        stack.enter_context(fp8_upcast(nets))
        stack.enter_context(checked_backward(comfy.model_management.throw_exception_if_processing_interrupted))
        if checkpoint:
            stack.enter_context(checkpointed(checkpoint_layers(nets), when=_large))
        yield


@contextmanager
def fp8_upcast(nets):
    """ComfyUI's fp8 linear layers (comfy.ops.fp8_ops, chosen with --fast on GPUs with fp8 compute) multiply in fp8
    through torch._scaled_mm, which has no backward pass, unless the module is in training mode, where they cast
    the weight to the compute dtype per layer as manual_cast does. Inside the block they take that path (the
    forward values are the upcast weights' own); their mode is put back afterwards. Layers that multiply in fp8
    with no such switch (scaled fp8 checkpoints with fp8_matrix_mult) are refused by nodes._guided."""
    switched = []
    try:
        for net in nets:
            for m in net.modules():
                if _fp8_matmul_switchable(m) and not m.training:
                    m.training = True
                    switched.append(m)
        yield
    finally:
        for m in switched:
            m.training = False


def _fp8_matmul_switchable(m) -> bool:
    return type(m).__qualname__ == "fp8_ops.Linear"


def fp8_matmul_fixed(m) -> bool:
    """A linear layer that always multiplies in fp8 (comfy.ops.scaled_fp8_ops with fp8_matrix_mult)."""
    fn = getattr(type(m), "forward_comfy_cast_weights", None)
    code = getattr(fn, "__code__", None)
    if code is None or "fp8_matrix_mult" not in code.co_freevars or fn.__closure__ is None:
        return False
    cell = fn.__closure__[code.co_freevars.index("fp8_matrix_mult")]
    return bool(cell.cell_contents)


def _patch_functions(to: dict):
    for fns in (to.get("patches") or {}).values():
        yield from fns
    for table in (to.get("patches_replace") or {}).values():
        yield from table.values()


def _pack(t: torch.Tensor):
    # only activations of the graph can be rewritten in place by a later step of the same call; weights and
    # other constants (which need no gradient) are kept as they are, not copied on every guided call
    return t.clone() if t.requires_grad else t


def _unpack(t):
    return t


def guard(fn):
    """fn (a patch function) run under a saved-tensors hook that stores copies when gradients are on."""
    if getattr(fn, GUARDED, False) or fn in _OWN or over(fn) is fn or joint_own(fn):
        return fn

    def guarded(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            return fn(*args, **kwargs)

    setattr(guarded, GUARDED, True)
    guarded.__wrapped__ = fn
    return guarded


def fresh_skip(h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
    """input_block_patch_after_skip: the next block gets a clone when gradients flow (see the module doc)."""
    return h.clone() if torch.is_grad_enabled() and h.requires_grad else h


setattr(fresh_skip, GUARDED, True)


def guard_inplace(model_options: dict) -> dict:
    """A copy of `model_options` whose foreign patches cannot break a backward pass (module docstring). Apply
    it before adding Z2I's own patches (they need no guard and their saved maps should not be copied)."""
    mo = dict(model_options or {})
    to = dict(mo.get("transformer_options") or {})
    patches = {name: [guard(fn) for fn in fns] for name, fns in (to.get("patches") or {}).items()}
    after = patches.get("input_block_patch_after_skip", [])
    if fresh_skip not in after:
        patches["input_block_patch_after_skip"] = [fresh_skip, *after]
    to["patches"] = patches
    if to.get("patches_replace"):
        to["patches_replace"] = {name: {key: guard(fn) for key, fn in table.items()}
                                 for name, table in to["patches_replace"].items()}
    mo["transformer_options"] = to
    return mo


def attn2_at(model_options: dict, site):
    """The attn2 replace function installed at a cross-attention site in these model options (core looks up
    (block, id, index) first, then (block, id)), or None."""
    table = ((model_options or {}).get("transformer_options") or {}).get("patches_replace", {}).get("attn2", {})
    return table.get((site.block, site.id, site.index), table.get((site.block, site.id)))


def with_z2i_attn2(model_options: dict, sites) -> dict:
    """A copy of model options with Z2I's controlled attention at every site, composed over any other pack's
    attn2 replace found there (attention_patches.controller.over: the foreign function keeps producing the
    layer's output wherever Z2I only reads maps)."""
    import comfy.model_patcher

    mo = dict(model_options or {})
    mo["transformer_options"] = dict(mo.get("transformer_options") or {})
    for s in sites:
        mo = comfy.model_patcher.set_model_options_patch_replace(mo, over(attn2_at(mo, s)), "attn2", s.block, s.id,
                                                                 s.index)
    return mo


def foreign_attn2_sites(model_options: dict, sites) -> list:
    """Sites whose attn2 replace is not Z2I's (another pack replaced it after Z2I installed its patch)."""
    out = []
    for s in sites:
        fn = attn2_at(model_options, s)
        if fn is not None and over(fn) is not fn:
            out.append(s)
    return out


def inpainting(extra_args: dict, inversion, node: str):
    """(extra_args for the sampler's model calls, keep or None) for a latent with a noise mask (SetLatentNoiseMask;
    the inversion carries the mask to its output): core's inpainting wrapper would pin the region outside the
    mask to the sampler's latent_image, which is the inverted noise here, so Z2I samplers take the mask out of
    the model calls and keep that region on the inversion's own trajectory instead (guidance.ddim.keep_outside):
    the result there is the inversion's reconstruction of the source."""
    from ..guidance.ddim import keep_outside
    from ._host import Z2IInputError, paired_trajectory

    mask = (extra_args or {}).get("denoise_mask")
    if mask is None:
        return extra_args, None
    if inversion is None:
        raise Z2IInputError(node, "inversion", "the latent has a noise mask (inpainting) but no inversion is "
                            "connected", "connect DDIM Inversion's INVERSION output to this sampler node, so the "
                            "region outside the mask keeps the source image")
    traj = paired_trajectory(node, inversion)

    def level(sigma: float):
        try:
            return traj.latents[traj.index_of_sigma(sigma)]
        except KeyError:
            raise Z2IInputError(node, "sigmas (of the sampler node)", f"sigma {sigma:.4g} is not on the "
                                "inversion's schedule", "connect DDIM Inversion's 'sigmas' output") from None

    if tuple(traj.latents.shape[-2:]) != tuple(mask.shape[-2:]):
        raise Z2IInputError(node, "inversion", f"it inverted a {tuple(traj.latents.shape[-2:])} latent, the masked "
                            f"latent is {tuple(mask.shape[-2:])}", "connect the inversion of the image you sample")
    return {**extra_args, "denoise_mask": None}, keep_outside(mask, level)


def own_rng(fn):
    """A KSAMPLER function run with its own RNG stream seeded from the sampler node's seed (extra_args["seed"]),
    the global state restored afterwards: patches that draw from the global RNG (ToMe picks its merge
    partitions with torch.randint) then give the same result on every run of the graph."""
    @functools.wraps(fn)
    def run(model, x, sigmas, extra_args=None, *args, **kwargs):
        seed = int((extra_args or {}).get("seed") or 0)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return fn(model, x, sigmas, extra_args, *args, **kwargs)

    return run


# What the analysis nodes (CSG mask, h-direction from prompts) set aside: patches that change the UNet's token
# layout or resolution (ToMe, HyperTile: attn1 patches; Kohya deep shrink: input/output block patches; FreeU
# rides on the latter). The maps and h-space features they average must come from the full-resolution UNet,
# so that they stack across steps and line up with the latent; weight patches (LoRA) and attn2 patches stay.
ANALYSIS_DROPS = ("attn1_patch", "attn1_output_patch", "input_block_patch", "input_block_patch_after_skip",
                  "output_block_patch")


def analysis_options(model_options: dict, node: str) -> dict:
    """A copy of model options without ANALYSIS_DROPS (logged when something was set aside)."""
    import logging

    mo = dict(model_options or {})
    to = dict(mo.get("transformer_options") or {})
    patches = dict(to.get("patches") or {})
    dropped = [k for k in ANALYSIS_DROPS if patches.pop(k, None)]
    if dropped:
        logging.info("%s: runs the UNet without the model's token-merging / tiling / resolution patches (%s), so "
                     "its maps are made at full resolution", node, ", ".join(dropped))
    to["patches"] = patches
    mo["transformer_options"] = to
    return mo


def per_image_conds(model) -> bool:
    """Whether any conditioning of this sampling run holds more than one row (one prompt per image). Row-wise
    evaluation (guidance.ddim.per_row) would hand every row the first prompt, so it is off for such runs."""
    for conds in (getattr(model.inner_model, "conds", None) or {}).values():
        for c in conds or []:
            for v in (c.get("model_conds") or {}).values():
                t = getattr(v, "cond", None)
                if isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] > 1:
                    return True
    return False


def rows_of(model, extra_args: dict):
    """The denoiser for this run's batch mode (nodes._guided settings): the whole batch in one UNet call (batch
    "batched", the default, as core samples), or one batch row at a time (batch "per image": each image exactly as
    alone; guidance.ddim.per_row), except when the conditioning holds one prompt per image."""
    from ..guidance.ddim import per_row
    from ._guided import per_image

    return per_row(model) if per_image(extra_args) and not per_image_conds(model) else model
