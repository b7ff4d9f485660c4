"""CSG (Conditional Score Guidance): content mask, cross-attention mixup patcher, guided SAMPLER."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.utils
import latent_preview
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..attention_patches.controller import AttentionCall, AttentionController, Capture, MapStore, Mixup, attn2_replace, over
from ..attention_patches.csg_mask import (RESIZE_CODE, RESIZE_OURS, LayerProbe, SelfAttentionMean,
                                          SelfAttentionSmoothing, TokenMapMean, content_mask)
from ..attention_patches.joint import OVERRIDE, foreign_joint_patches, is_own as joint_own, with_joint_patches
from ..attention_patches.sites import cross_attention_sites
from ..guidance.csg import align_tokens, csg_step, hard_background, omega, token_positions
from ..guidance.ddim import ddim_step, finish, model_sigma_floor, noise_form_of_model
from ..guidance.inversion import rescale_input
from ._compose import (analysis_options, attn2_at, foreign_attn2_sites, inpainting, own_rng, per_image_conds,
                       rows_of, with_z2i_attn2)
from ._guided import per_image
from ._host import (Z2IKSampler, Z2IInputError, check_inversion, check_sampler_inputs, check_schedule, combo_check,
                    denoiser_of,
                    interruptible, model_signature, paired_trajectory)
from .attention import GuidedCalls
from .types import CSGSourceMapsType, InversionType

MASK_NODE, MIXUP_NODE, CSG_NODE = "Z2I CSG Mask", "Z2I Cross-Attention Mixup", "Z2I CSG Sampler"
MIXUP_KEY = "z2i_mixup"
NORMALISE_CODE, NORMALISE_NONE = "per layer (official code)", "none (paper Eq. 13)"
KEEP_AUTO, KEEP_ALWAYS, KEEP_NEVER = "auto (keep up to 1 GB)", "keep", "don't keep"
KEEP_BUDGET = 1 << 30          # bytes of source maps "auto" keeps (the maps of every step, every layer)
SA_BUDGET = 256 << 20          # bytes of the mask's [HW, HW] self-attention map above which it is never built
KEEP_FP16, KEEP_FP32 = "fp16 (half the memory)", "fp32 (as the source row)"
SOURCE_CODE, SOURCE_PAPER = "reconstruction (official code)", "inversion trajectory (paper Alg. 1)"
SOURCES = {SOURCE_CODE: "reconstruction", SOURCE_PAPER: "inversion"}
WORD_MAP_CODE, WORD_MAP_OURS = ("first token, bicubic at token level (official code)",
                                "token span, bilinear at mask level (ours)")
PASSES_CODE, PASSES_ONE = "two passes (official code)", "one pass (ours)"
SOURCE_TIP = ("Where the source latents x_t^src and the caption's maps come from. 'reconstruction (official code)', "
              "default: a DDIM pass from the inverted noise with the caption (CFG-neutral: the caption as both "
              "prompts), as the authors' code (Hleephilip/CSG) runs before editing: what the paper's figures show. "
              "'inversion trajectory (paper Alg. 1)': the latents the inversion visited, as the paper's Algorithm 1 "
              "writes it (no extra pass).")
KEEP_DTYPES = {KEEP_FP16: torch.float16, KEEP_FP32: torch.float32}


@dataclass(frozen=True)
class CSGSourceMaps:
    """The source branch's cross-attention maps of every step, captured by the content-mask pass (which runs the
    UNet on the inversion's trajectory with the caption: exactly the CSG Sampler's lockstep source row). The
    sampler's mixup reads them instead of running that row again, when nothing differs (`reuse_problem`).
    Read-only after the mask node returns it (a cached output shared by later runs)."""

    store: MapStore                   # keyed by the mask pass's step index, cond 0, every cross-attention site
    sigmas: tuple                     # the sigma of each step index
    rows: int                         # batch rows held per map
    model: object                     # ModelSignature of the mask node's model
    options_problem: Optional[str]    # why the mask node's model options would change the maps (None: plain)
    conds: object                     # the guider's original conditioning of the mask pass (the caption)
    nbytes: int
    source: str = "inversion"         # SOURCES value: which latents the maps were made at
    latents: Optional[torch.Tensor] = None   # the reconstruction's latents x_src per step index ("reconstruction")

    def __deepcopy__(self, memo):
        return self

    def step_of(self, sigma: float) -> Optional[int]:
        for j, s in enumerate(self.sigmas):
            if abs(s - sigma) <= 1e-6 * max(1.0, abs(s)):
                return j
        return None


def foreign_options(model_options: dict) -> Optional[str]:
    """What in a run's model options could change the source branch's maps, other than Z2I's own attn2 patch and
    mixup (None when nothing does): other packs' patches, wrappers or attention replaces."""
    mo = model_options or {}
    if mo.get("model_function_wrapper") is not None:
        return "a model_function_wrapper"
    to = mo.get("transformer_options") or {}
    for kind, fns in (to.get("patches") or {}).items():
        if fns:
            return f"a '{kind}' patch"
    for kind, entries in (to.get("patches_replace") or {}).items():
        for key, fn in (entries or {}).items():
            if not (kind == "attn2" and fn is attn2_replace) and not (kind == "dit" and joint_own(fn)
                                                                      and fn.keywords.get("inner") is None):
                return f"a '{kind}' replace patch at {key}"
    override = to.get(OVERRIDE)
    if override is not None and not (joint_own(override) and override.keywords.get("inner") is None):
        return "another pack's attention override"
    if any(v for v in (to.get("wrappers") or {}).values()):
        return "a model wrapper"
    return None


def _same(a, b) -> bool:
    """Equality of conditioning structures: tensors by value, ComfyUI CONDRegular-like objects by their tensor,
    other objects (control models) by identity or ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and set(a) - {"uuid"} == set(b) - {"uuid"} and \
            all(_same(a[k], b[k]) for k in a if k != "uuid")
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(b, type(a)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(getattr(a, "cond", None), torch.Tensor):
        return type(a) is type(b) and _same(a.cond, getattr(b, "cond", None))
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:   # noqa: BLE001  (objects without a usable ==)
        return False


def reuse_problem(cached: CSGSourceMaps, model, extra_args: dict, x: torch.Tensor, sigmas,
                  source: str = "inversion") -> Optional[str]:
    """Why the sampler cannot use the mask pass's maps for this run (None when it can: the same model and options,
    the source caption as its negative, the same rows and every sigma captured)."""
    from ._host import model_signature

    if cached.source != source:
        return (f"the mask pass made them on the {cached.source} latents, the sampler's source_trajectory is the "
                f"{source}")
    mine = model_signature(model.inner_model.model_patcher)
    if (mine.unet_id, mine.patches) != (cached.model.unet_id, cached.model.patches):
        return "the sampler's model is not the mask node's model (another checkpoint, LoRA or weight patch)"
    problem = cached.options_problem or foreign_options(extra_args.get("model_options", {}))
    if problem:
        return f"{problem} on the model may change the source maps"
    if extra_args.get("denoise_mask") is not None:
        return "an inpainting mask"
    neg = (getattr(model.inner_model, "original_conds", None) or {}).get("negative")
    if neg is None or not _same(neg, cached.conds):
        return "the sampler's negative is not the caption the mask was made with"
    if cached.rows != x.shape[0]:
        return f"the mask pass held {cached.rows} image(s), the sampler runs {x.shape[0]}"
    missing = [float(s) for s in sigmas[:-1] if cached.step_of(float(s)) is None]
    if missing:
        return f"sigma {missing[0]:.4g} was not a step of the mask pass"
    return None


@dataclass(frozen=True)
class MixupSpec:
    """Set on a MODEL by the mixup patcher; read by the CSG sampler, which supplies the source maps."""

    background: torch.Tensor          # [B or 1, H, W] background probability P (image resolution)
    token_map: torch.Tensor | None    # target token -> source token (None = identity)
    strength: float = 1.0             # scales the mixing weight of the source maps
    normalise: bool = True            # object mask / its max per layer and image (the authors' code)
    two_pass: bool = True             # the code's first, unmixed UNet pass whose maps the second pass mixes

    def __deepcopy__(self, memo):     # immutable: ComfyUI 0.3.75 deep-copies model options on clone
        return self


def _ids(clip, text: str) -> list[int]:
    """The prompt's token ids over every 77-token chunk (a long prompt's conditioning holds them all in order)."""
    tokens = clip.tokenize(text)
    return [int(t[0]) for chunk in next(iter(tokens.values())) for t in chunk]


END_OF_TEXT = 49407  # CLIP's BPE vocabulary, shared by CLIP-L, OpenCLIP-H and OpenCLIP-bigG


def _word_ids(clip, word: str) -> list[int]:
    """The word's own tokens: between the start token and the first end-of-text token."""
    ids = _ids(clip, word)
    end = ids.index(END_OF_TEXT, 1) if END_OF_TEXT in ids[1:] else len(ids)
    return ids[1:end]


def check_caption(clip, caption: str, conditioning, node: str) -> None:
    """The caption must be the inversion's prompt: its maps are the ones the mask is read from."""
    cond = conditioning[0][0] if conditioning else None
    if cond is None:
        return
    mine = clip.encode_from_tokens(clip.tokenize(caption))
    mine = mine[0] if isinstance(mine, (tuple, list)) else mine
    same = mine.shape == cond.shape and bool(torch.allclose(mine.float().cpu(), cond.float().cpu(), rtol=1e-3,
                                                            atol=1e-4))
    if not same:
        raise Z2IInputError(node, "caption", f"'{caption}' does not encode to the prompt the inversion used (a "
                            "different text, or another CLIP / clip skip)", "type the inversion's caption exactly "
                            "and connect the CLIP its prompt was encoded with")


def word_positions(clip, caption: str, word: str, node: str) -> list[int]:
    caption_ids, word_ids = _ids(clip, caption), _word_ids(clip, word)
    pos = token_positions(caption_ids, word_ids)
    if not pos:
        raise Z2IInputError(node, "word", f"'{word}' does not occur in the caption '{caption}' as CLIP tokenizes it",
                            "use a word of the caption exactly as written (e.g. 'cat' in 'a photo of a cat')")
    return pos


@own_rng
def _mask_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, inversion=None, positions=None,
             token_level=2, mask_level=0, out=None, keep=KEEP_NEVER, budget=KEEP_BUDGET, keep_dtype=torch.float16,
             source="inversion", resize=RESIZE_OURS):
    raw_options = (extra_args or {}).get("model_options", {})
    extra_args = {**(extra_args or {}), "model_options": analysis_options(raw_options, MASK_NODE)}  # full-res maps
    calls = GuidedCalls(model, extra_args, MASK_NODE, self_attention=True)
    h, w = x.shape[-2:]
    mask_hw = (max(1, h >> mask_level), max(1, w >> mask_level))
    token_hw = (max(1, h >> token_level), max(1, w >> token_level))
    if calls.joint:          # an MMDiT's joint blocks are all at its patch grid: every one gives the word map
        token_hw = (h, w)
    nf = noise_form_of_model(model)
    denoise = calls.denoise_one("positive")
    cb = interruptible(callback)
    # batch "per image": each image alone (as guidance.ddim.per_row), so a batch's masks are the single-image masks
    # bit for bit; "batched" (default): the batch in one call
    whole = x.shape[0] == 1 or per_image_conds(model) or not per_image(extra_args or {})
    parts = [slice(None)] if whole else [slice(r, r + 1) for r in range(x.shape[0])]
    word_maps, smoothed, source_latents = [], [], []
    steps = len(sigmas) - 1
    if source == "reconstruction":
        # the authors' code: a DDIM pass from x_T with the caption (CFG-neutral), x_T handed at the first level
        traj = inversion.trajectory
        start = rescale_input(traj.latents[-1], traj.sigmas[-1], sigmas[0], nf)
        level = None
    else:
        traj = paired_trajectory(MASK_NODE, inversion)
        level = lambda i, rows: traj.latents[traj.index_of_sigma(float(sigmas[i]))][rows].to(x)  # noqa: E731
    # The source maps for the CSG Sampler's mixup: every step's caption maps, as its lockstep source row makes them
    store = MapStore(conds=(0,), max_steps=steps, dtype=keep_dtype) if keep != KEEP_NEVER else None
    # the [HW, HW] self-attention map grows with the square of the positions (1 GiB at a 128x128 mask in fp32):
    # above SA_BUDGET the smoothing runs as a second pass in linear memory (SelfAttentionSmoothing)
    two_pass = not calls.joint and (mask_hw[0] * mask_hw[1]) ** 2 * 4 > SA_BUDGET
    for part, rows in enumerate(parts):
        sa = LayerProbe(mask_hw) if two_pass else SelfAttentionMean(mask_hw)
        # First pass finds the self-attention resolution actually available (SDXL has none at full latent size).
        tm = None
        lat = []
        xi = start[rows].to(x) if level is None else None
        for i in range(steps):
            sigma = sigmas[i]
            if level is not None:
                xi = level(i, rows)
            lat.append(xi)
            # the same attention arithmetic whether or not the maps are kept (a no-op controller otherwise), so the
            # mask does not depend on the source_maps option
            controllers = ([tm] if tm is not None else []) + [Capture(store) if store is not None else
                                                              AttentionController()]
            d = denoise(xi, sigma, AttentionCall(i, controllers), AttentionCall(i, [sa]))
            if store is not None and keep == KEEP_AUTO and i == 0 and part == 0:
                need = store.nbytes() * steps * len(parts)
                if need > budget:
                    logging.info("%s: the source maps would take %.0f MB (more than %.0f MB): not kept; the CSG "
                                 "Sampler runs its source row instead", MASK_NODE, need / 2**20, budget / 2**20)
                    store = None
            if not two_pass:
                sa.end_step(i)
            if tm is None:
                tm = TokenMapMean(positions, hw=sa.hw or mask_hw, max_hw=token_hw, resize=resize)
                denoise(xi, sigma, AttentionCall(i, [tm]))
            tm.end_step(i)
            if i == 0 and getattr(tm, "total", None) is None:
                raise Z2IInputError(MASK_NODE, "token_level", f"this model has no cross-attention layer at "
                                    f"{token_hw[0]}x{token_hw[1]} or coarser (1/{2 ** token_level} of the "
                                    f"{h}x{w} latent): the word map would be empty",
                                    "lower token_level (each step down doubles the map's size; SD1.5 at 512 px "
                                    "has maps down to level 3; a small image or a shallow model has fewer)")
            cb({"x": xi, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": d})
            if level is None:       # the reconstruction's next latent (DDIM with the caption's prediction)
                xi = ddim_step(d, nf.eps(xi, sigma, d), sigma, sigmas[i + 1], form=nf) \
                    if float(sigmas[i + 1]) > 0 else d
        if level is None:
            source_latents.append(torch.stack(lat))
        # the code clamps the time-averaged word map before smoothing (its bicubic resizes overshoot [0, 1])
        word = tm.mean().clamp(0, 1) if resize == RESIZE_CODE else tm.mean()
        word_maps.append(word)
        if two_pass and sa.site is not None:
            sm = SelfAttentionSmoothing(sa.site, sa.hw, word)
            for i in range(steps):
                sigma = sigmas[i]
                d = denoise(lat[i], sigma, AttentionCall(i, []), AttentionCall(i, [sm]))
                sm.end_step(i)
                cb({"x": lat[i], "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": d})
            smoothed.append(content_mask(sm.mean(), None))
        else:
            smoothed.append(content_mask(word, sa.mean() if getattr(sa, "total", None) is not None else None))
    maps = None
    if store is not None:
        maps = CSGSourceMaps(store, tuple(float(s) for s in sigmas[:-1]), x.shape[0],
                             model_signature(model.inner_model.model_patcher), foreign_options(raw_options),
                             model.inner_model.original_conds["positive"], store.nbytes(), source,
                             torch.cat(source_latents, 1).to(comfy.model_management.intermediate_device())
                             if source == "reconstruction" else None)
    out.append((torch.cat(word_maps), torch.cat(smoothed), maps))
    return x


class CSGMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_CSGMask",
            display_name="CSG Content Mask (Z2I)",
            category="Z2I/masks",
            description=(
                "Finds where the thing named by 'word' (e.g. cat) is in your inverted image and marks the rest as "
                "background to keep, for Cross-Attention Mixup and the CSG Sampler. Re-runs the UNet on the "
                "inversion's trajectory with the caption, averages the word's cross-attention maps over time "
                "(max-normalised per step), smooths them with the time-averaged self-attention, and returns the "
                "background probability P = 1 - M as a MASK (white = background, kept) plus the object map as an "
                "IMAGE to look at. Feed the MASK to Cross-Attention Mixup and CSG Sampler. Reference: CSG (Lee "
                "et al. 2023), Eq. 11-12."),
            inputs=[
                io.Model.Input("model", tooltip="The model the image was inverted with."),
                io.Clip.Input("clip", tooltip="Its CLIP, to find the word's tokens in the caption."),
                InversionType.Input("inversion", tooltip="From DDIM Inversion (with the caption as positive)."),
                io.String.Input("caption", default="a photo of a cat", tooltip="The caption used for the inversion."),
                io.String.Input("word", default="cat", tooltip="The word of the caption naming what to edit."),
                io.Int.Input("token_level", default=2, min=0, max=4,
                             tooltip="Cross-attention layers at 1/2^level of the latent size and coarser form the "
                                     "word map (the authors' code: 16x16 at 512 px = level 2)."),
                io.Int.Input("mask_level", default=0, min=0, max=4,
                             tooltip="Resolution of the self-attention smoothing, 1/2^level of the latent (0 = "
                                     "full, as the code; falls back to the finest layer that exists). Its map is "
                                     "(HW)^2: use 1 to save memory on large images."),
                io.Combo.Input("source_maps", options=[KEEP_AUTO, KEEP_ALWAYS, KEEP_NEVER], default=KEEP_AUTO,
                               optional=True,
                               tooltip="Keep the caption's cross-attention maps of every step for the CSG "
                                       "Sampler (its source_maps input): this pass already computes them, so the "
                                       "sampler's mixup skips its own source UNet row (about a third of its "
                                       "time). auto: keep them when they take at most 1 GB (logged otherwise); "
                                       "keep: always; don't keep: the sampler runs the source row."),
                io.Combo.Input("source_pass", options=list(SOURCES), default=SOURCE_CODE, optional=True,
                               tooltip=SOURCE_TIP + " The CSG Sampler's source_trajectory must say the same."),
                io.Combo.Input("word_map", options=[WORD_MAP_CODE, WORD_MAP_OURS], default=WORD_MAP_CODE,
                               optional=True,
                               tooltip="How each step's word map is made. 'first token, bicubic at token level "
                                       "(official code)', default: the word's first token, the layers averaged at "
                                       "the token level (coarser ones upsampled bicubically), normalised by the "
                                       "maximum there, upsampled bicubically to the mask resolution; the MASK then "
                                       "holds the latent-resolution mask exactly (8x8 pixel blocks), as the code "
                                       "uses it. 'token span, bilinear at mask level (ours)': every token of the "
                                       "word, each layer upsampled bilinearly to the mask resolution and normalised "
                                       "there; a smooth MASK."),
                io.Combo.Input("source_maps_precision", options=list(KEEP_DTYPES), default=KEEP_FP16, optional=True,
                               tooltip="How the kept maps are stored. fp16 (default): half the memory (about 320 MB "
                                       "for 10 steps at 512 px on SD1.5), probabilities to 3 significant digits; "
                                       "the edit then differs from the source row's in about the 4th digit. fp32: "
                                       "the source row's maps as it computes them (to float rounding)."),
            ],
            outputs=[io.Mask.Output(display_name="background",
                                    tooltip="White = background to keep, dark = the object to edit, at image "
                                            "resolution (P = 1 - M_hat). For Cross-Attention Mixup and CSG Sampler."),
                     io.Image.Output(display_name="object_map",
                                     tooltip="Where the word's object is (white), smoothed: M_hat, to preview."),
                     io.Image.Output(display_name="word_map",
                                     tooltip="The time-averaged word map before self-attention smoothing, to "
                                             "preview."),
                     CSGSourceMapsType.Output(display_name="source_maps",
                                              tooltip="The caption's maps of every step (see source_maps above), "
                                                      "for the CSG Sampler's source_maps input. Empty when not "
                                                      "kept; the sampler then runs its source row.")],
            is_experimental=True,
        )

    @classmethod
    def validate_inputs(cls, source_maps=None, source_pass=None, word_map=None, source_maps_precision=None):
        return combo_check(cls, MASK_NODE, source_maps=source_maps, source_pass=source_pass, word_map=word_map,
                           source_maps_precision=source_maps_precision)

    @classmethod
    def execute(cls, model, clip, inversion, caption, word, token_level, mask_level,
                source_maps=KEEP_AUTO, source_maps_precision=KEEP_FP16, source_pass=SOURCE_CODE,
                word_map=WORD_MAP_CODE) -> io.NodeOutput:
        denoiser_of(model, MASK_NODE)
        check_inversion(MASK_NODE, inversion, model)
        check_caption(clip, caption, inversion.positive, MASK_NODE)
        positions = word_positions(clip, caption, word, MASK_NODE)
        code_map = word_map == WORD_MAP_CODE
        if code_map:
            positions = positions[:1]             # the code reads the word's first token
        source = SOURCES.get(source_pass, "reconstruction")
        traj = inversion.trajectory
        if source == "reconstruction":            # the sampler's own schedule, x_T to the clean latent's level
            sigmas = inversion.sigmas
        else:
            paired_trajectory(MASK_NODE, inversion)
            sigmas = inversion.sigmas[:-1] if float(inversion.sigmas[-1]) == 0 else inversion.sigmas
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        out: list = []
        sampler = Z2IKSampler(_mask_fn, extra_options={
            "inversion": inversion, "positions": positions, "token_level": int(token_level),
            "mask_level": int(mask_level), "out": out, "keep": source_maps, "budget": KEEP_BUDGET,
            "keep_dtype": KEEP_DTYPES.get(source_maps_precision, torch.float16), "source": source,
            "resize": RESIZE_CODE if code_map else RESIZE_OURS})
        latent = model.model.process_latent_out(traj.latents[-1]).cpu()
        comfy.sample.sample_custom(model, torch.zeros_like(latent), 1.0, sampler, sigmas, inversion.positive,
                                   inversion.positive, latent, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
                                   callback=latent_preview.prepare_callback(model, len(sigmas) - 1))
        word_map, smoothed, maps = out[0]
        lat_h, lat_w = traj.latents.shape[-2:]
        size = (lat_h * 8, lat_w * 8)
        if code_map:      # each latent pixel an 8x8 block: the sampler's area resize gives back the mask exactly
            up = lambda m: F.interpolate(m[:, None].float(), size=size, mode="nearest")[:, 0]  # noqa: E731
        else:
            up = lambda m: F.interpolate(m[:, None].float(), size=size, mode="bilinear",  # noqa: E731
                                         align_corners=False)[:, 0]
        obj = up(smoothed).clamp(0, 1).cpu()
        background = (1 - obj).clamp(0, 1)
        word_img = up(word_map / word_map.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]).clamp(0, 1).cpu()
        return io.NodeOutput(background, obj[..., None].repeat(1, 1, 1, 3), word_img[..., None].repeat(1, 1, 1, 3),
                             maps)


class CrossAttentionMixup(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_CrossAttentionMixup",
            display_name="Cross-Attention Mixup (Z2I)",
            category="Z2I/model_patches",
            description=(
                "Patches the model so that, in the CSG Sampler, the background keeps the original image's "
                "attention to the prompt while the object follows the new prompt. In every cross-attention layer the "
                "target prompt's maps become "
                "M_src * P + M_tgt * (1 - P), P the background mask resized to the layer, so the background "
                "attends as in the source. By default the object mask 1 - P is divided by its maximum at each "
                "layer, as the authors' code does, so the object's peak takes the target maps alone. "
                "The source maps come from the CSG Sampler's lockstep source branch; with other samplers the "
                "patch is plain attention. Reference: CSG (Lee et al. 2023), Eq. 13, and the official code."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a clone is returned; the input is untouched)."),
                io.Mask.Input("background", tooltip="Background probability P (CSG Content Mask). 1 = source maps, "
                                                    "0 = target maps."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Scales P (after the normalisation). 0 = no mixup (returns the model "
                                       "unchanged)."),
                io.Clip.Input("clip", optional=True, tooltip="With both prompts: aligns target tokens to source "
                                                             "tokens when the swapped words differ in length."),
                io.String.Input("source_prompt", default="", optional=True, tooltip="The source caption."),
                io.String.Input("target_prompt", default="", optional=True,
                                tooltip="The caption with the word swapped (e.g. cat -> dog)."),
                io.Combo.Input("mask_normalisation", options=[NORMALISE_CODE, NORMALISE_NONE], default=NORMALISE_CODE,
                               optional=True,
                               tooltip="per layer (official code, default): at each layer the object mask 1 - P "
                                       "is divided by its maximum, per image, so the object's peak uses the "
                                       "target maps alone (Hleephilip/CSG: new_mask /= new_mask.max()); an "
                                       "all-background mask stays as it is. none (paper Eq. 13): P as given; a "
                                       "CSG Content Mask's object peak is well below 1, so some source maps "
                                       "enter the object too (a weaker edit)."),
                io.Combo.Input("passes", options=[PASSES_CODE, PASSES_ONE], default=PASSES_CODE, optional=True,
                               tooltip="two passes (official code, default): each step runs the UNet once "
                                       "unmixed to take the target maps of every layer, then again with those "
                                       "maps mixed in (Hleephilip/CSG inject_attn): what the paper's figures "
                                       "show; one more UNet call per step. one pass (ours): each layer mixes its "
                                       "own maps as the call runs, so later layers see hidden states the earlier "
                                       "mixing changed (a slightly different edit, a third less time)."),
            ],
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="The patched model, for the model input of the SamplerCustom that runs "
                                             "the CSG Sampler.")],
            is_experimental=True,
        )

    @classmethod
    def validate_inputs(cls, mask_normalisation=None, passes=None):
        return combo_check(cls, MIXUP_NODE, mask_normalisation=mask_normalisation, passes=passes)

    @classmethod
    def execute(cls, model, background, strength, clip=None, source_prompt="", target_prompt="",
                mask_normalisation=NORMALISE_CODE, passes=PASSES_CODE) -> io.NodeOutput:
        if strength == 0:
            return io.NodeOutput(model)
        unet = denoiser_of(model, MIXUP_NODE)
        token_map = None
        if clip is not None and source_prompt.strip() and target_prompt.strip():
            src, tgt = _ids(clip, source_prompt), _ids(clip, target_prompt)
            token_map = align_tokens(src, tgt)
        m = model.clone()
        if hasattr(unet, "joint_blocks"):           # SD3: the joint blocks' image-to-text maps (joint.py)
            m.model_options = with_joint_patches(m.model_options, len(unet.joint_blocks))
        else:
            for s in cross_attention_sites(unet):   # over another pack's attn2 replace, if any (controller.over)
                m.set_model_attn2_replace(over(attn2_at(m.model_options, s)), s.block, s.id, s.index)
        mask = background if background.ndim == 3 else background[None]
        m.model_options["transformer_options"][MIXUP_KEY] = MixupSpec(
            mask.float().clamp(0, 1).cpu(), token_map, float(strength), mask_normalisation != NORMALISE_NONE,
            passes != PASSES_ONE)
        return io.NodeOutput(m)


@own_rng
def _csg_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, inversion=None, background=None,
            lambda_pre=10.0, delta=1.5, clamp=False, hard_mask_guard=True, source_maps=None, stats=None,
            source="inversion"):
    check_sampler_inputs(CSG_NODE, model, x, inversion, flow_ok=True)
    if source == "reconstruction":    # (the inversion form reads each level's latent and names a missing one)
        check_schedule(CSG_NODE, inversion, sigmas)
    nf = noise_form_of_model(model)
    cached = None
    if source_maps is not None and (extra_args or {}).get("model_options", {}).get(
            "transformer_options", {}).get(MIXUP_KEY) is not None:
        problem = reuse_problem(source_maps, model, extra_args or {}, x, sigmas, source)
        if problem is None:
            cached = source_maps
        else:
            logging.warning("%s: not using the CSG Content Mask's source maps (%s): running the source row instead",
                            CSG_NODE, problem)
    if stats is not None:
        stats["cached_source_maps"] = cached is not None
        stats["unet_passes"] = 0
    extra_args, keep = inpainting(extra_args or {}, inversion, CSG_NODE)   # noise mask: keep the source outside
    spec = extra_args.get("model_options", {}).get("transformer_options", {}).get(MIXUP_KEY)
    traj = paired_trajectory(CSG_NODE, inversion) if source == "inversion" else None
    bg = F.interpolate(background[:, None].float(), size=x.shape[-2:], mode="area")[:, 0].to(x)
    steps = len(sigmas) - 1
    if spec is not None:
        # another pack replaced the mixup's attn2 patch after the mixup node: compose over it for this run
        # (its function still runs where maps are only read; mixed layers warn) instead of dropping the mixup
        mo = extra_args.get("model_options", {})
        net = model.inner_model.inner_model.diffusion_model
        if hasattr(net, "joint_blocks"):
            if foreign_joint_patches(mo, len(net.joint_blocks)):
                extra_args = {**extra_args, "model_options": with_joint_patches(mo, len(net.joint_blocks))}
        elif foreign_attn2_sites(mo, cross_attention_sites(net)):
            extra_args = {**extra_args, "model_options": with_z2i_attn2(mo, cross_attention_sites(net))}
    # the source row: the caption's prediction at x_src, for the mixup's source maps and, with the reconstruction
    # source, for x_src's own next step (the code's reference pass, run here in lockstep)
    own_source = cached is None and (spec is not None or source == "reconstruction")
    calls = GuidedCalls(model, extra_args, CSG_NODE, rowwise=per_image(extra_args)) \
        if spec is not None or own_source else None
    if calls is not None:
        calls.refuse_masked(CSG_NODE, "positive", "negative")
        if not calls.conds("negative"):
            raise Z2IInputError(CSG_NODE, "negative (of the sampler node)", "no negative conditioning",
                                "connect the source caption as the negative prompt")
    rows = rows_of(model, extra_args)      # the batch in one call, or each image as alone (batch "per image")
    store = MapStore(conds=(0,), max_steps=1)
    source_row = calls.denoise_one("negative") if own_source else None
    cb = interruptible(callback)
    current = MapStore(max_steps=1) if spec is not None and spec.two_pass else None
    # the mixup's own mask (the Mixup node's input), at the latent's resolution, resized from there to each layer as
    # the code resizes its M_hat (exact for the code's word map, whose MASK holds the latent mask in 8x8 blocks)
    mix = None if spec is None else Mixup(cached.store if cached is not None else store,
                                          F.interpolate(spec.background[:, None].float(), size=x.shape[-2:],
                                                        mode="area")[:, 0].to(x), token_map=spec.token_map,
                                          normalise=spec.normalise, strength=spec.strength, current=current)
    clamp = pull_clamp(bg, clamp, hard_mask_guard and lambda_pre != 0)
    x_src = x
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        step = cached.step_of(float(sigma)) if cached is not None else i
        if cached is not None and cached.latents is not None:
            x_src = cached.latents[step].to(x)
        elif traj is not None:
            try:
                x_src = traj.latents[traj.index_of_sigma(float(sigma))].to(x)
            except KeyError:
                raise Z2IInputError(CSG_NODE, "sigmas (of the sampler node)", f"sigma {float(sigma):.4g} is not on "
                                    "the inversion's schedule", "connect the DDIM Inversion 'sigmas' output") from None
        hw = tuple(x.shape[-2:])           # full-frame calls only (area-conditioned crops run plain attention)
        d_src = None
        if source_row is not None:
            d_src = source_row(x_src, sigma, AttentionCall(i, [Capture(store)] if spec is not None else [],
                                                             latent_hw=hw))
        if spec is not None:
            if current is not None:        # the code's first pass: the target maps of every layer, unmixed
                calls.denoise_cfg(x, sigma, AttentionCall(step, [Capture(current)], latent_hw=hw))
            denoised = calls.denoise_cfg(x, sigma, AttentionCall(step, [mix], latent_hw=hw))
            store.drop(i)
            mix.next_step()
        else:
            denoised = rows(x, sigma * x.new_ones([x.shape[0]]), **extra_args)
        if stats is not None:
            stats["unet_passes"] += 1 + (current is not None) + (source_row is not None)
        cb({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if lambda_pre != 0:
            x_next = csg_step(x, sigma, sigma_next, denoised, x_src, omega(bg, lambda_pre, i, steps, delta),
                              clamp=clamp, form=nf)
        elif float(sigma_next) == 0:
            x_next = denoised
        else:
            x_next = ddim_step(denoised, nf.eps(x, sigma, denoised), sigma, sigma_next, form=nf)
        if d_src is not None and source == "reconstruction":
            x_src = ddim_step(d_src, nf.eps(x_src, sigma, d_src), sigma, sigma_next, form=nf) \
                if float(sigma_next) > 0 else d_src
        x = x_next
        if keep is not None:
            x = keep(x, sigma_next)
    return finish(x, sigmas, model_sigma_floor(model))     # diffusers' clean latent when the schedule ends at sigma(0)


def pull_clamp(background: torch.Tensor, clamp: bool, guard: bool):
    """csg_step's `clamp`: True (everywhere), or per image where the mask is hard and the guard is on."""
    if clamp or not guard:
        return bool(clamp)
    hard = hard_background(background)
    if not bool(hard.any()):
        return False
    share = [f"{100 * float((b >= 1).float().mean()):.0f}%" for b, h in zip(background, hard) if h]
    logging.warning("%s: the background mask is hard (P = 1 on %s of the latent pixels of image(s) %s): the "
                    "paper's pull diverges on it in the last steps, so it is capped at 1 for those images "
                    "(hard_mask_guard; turn it off for Eq. 18 as written).", CSG_NODE, ", ".join(share),
                    [i for i, h in enumerate(hard.tolist()) if h])
    return hard


class CSGSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_CSGSampler",
            display_name="CSG Sampler (Z2I)",
            category="Z2I/sampling",
            description=(
                "Edits the object named in the new prompt (cat -> dog) while pulling the background back toward "
                "your original image at every step, without backpropagation. DDIM from the inverted noise with the "
                "word-swapped caption, pulling background pixels toward the source trajectory with the Gaussian "
                "posterior term -gamma_t * Omega_t * (x_t - x_t^src); no backpropagation. By default x_t^src comes "
                "from a reconstruction pass run in lockstep, as the authors' code does (source_trajectory). With a "
                "MODEL patched by Cross-Attention Mixup it mixes the source branch's maps in (Eq. 13). "
                "SamplerCustom: add_noise off, the inversion's noise and sigmas, positive = target caption, "
                "negative = source caption, cfg about 5. Ours, not the paper: with a hard (binary) mask the "
                "pull is capped at 1, where Eq. 18 as written diverges (hard_mask_guard). Reference: Conditional "
                "Score Guidance, CSG (Lee et al. 2023), Eq. 18."),
            inputs=[
                InversionType.Input("inversion", tooltip="From DDIM Inversion: the source trajectory x_t^src."),
                io.Mask.Input("background", tooltip="Background probability P (CSG Content Mask)."),
                io.Float.Input("lambda_pre", default=10.0, min=0.0, max=100.0, step=0.5,
                               tooltip="lambda_pre of Eq. 15: 10 is the official script's default "
                                       "(--posterior_guidance; its README once advised 15 for real images, 5 for "
                                       "generated). 0 = no posterior guidance (with no mixup: plain DDIM)."),
                io.Float.Input("delta", default=1.5, min=0.1, max=10.0, step=0.1,
                               tooltip="delta of Eq. 16: how fast the guided background region shrinks (1.5)."),
                io.Boolean.Input("clamp_pull", default=False,
                                 tooltip="Cap the per-step pull (1 - sigma_next/sigma) * Omega at 1 at every pixel "
                                         "(ours, not the paper). For far fewer than 50 steps, where the paper's "
                                         "pull over-corrects and can diverge even with a soft mask (also with "
                                         "delta above 1.5). Off = the paper (but see hard_mask_guard)."),
                io.Boolean.Input("hard_mask_guard", default=True, optional=True,
                                 tooltip="Ours, not the paper (on by default): cap the pull at 1 for images whose "
                                         "mask has pixels at exactly P = 1 (a binary or painted mask; a warning "
                                         "is logged). B_t keeps those pixels guided to the last step, where the "
                                         "paper's pull reaches 15x the difference and the run diverges. Soft "
                                         "masks (CSG Content Mask) are left to the paper's Eq. 18: with 50 steps "
                                         "they leave B_t before the pull grows. Off = Eq. 18 as written."),
                io.Combo.Input("source_trajectory", options=list(SOURCES), default=SOURCE_CODE, optional=True,
                               tooltip=SOURCE_TIP + " With the reconstruction, the sampler runs it in lockstep (the "
                                       "caption's prediction at x_src, one more UNet row per step unless the mask "
                                       "node's source_maps are connected); the CSG Content Mask's source_pass must "
                                       "say the same."),
                CSGSourceMapsType.Input("source_maps", optional=True,
                                        tooltip="From CSG Content Mask (same model, the caption as this run's "
                                                "negative): the mixup reads the source maps the mask pass kept "
                                                "instead of running a source UNet row each step (same result, "
                                                "about a third less time). When they do not fit this run (other "
                                                "model, prompt, patches, batch or steps) a warning says why and "
                                                "the source row runs."),
            ],
            outputs=[io.Sampler.Output(display_name="sampler",
                                       tooltip="The CSG sampler, for SamplerCustom's sampler input (with the "
                                               "inversion's noise as latent_image and its sigmas).")],
            is_experimental=True,
        )

    @classmethod
    def validate_inputs(cls, source_trajectory=None):
        return combo_check(cls, CSG_NODE, source_trajectory=source_trajectory)

    @classmethod
    def execute(cls, inversion, background, lambda_pre, delta, clamp_pull, hard_mask_guard=True,
                source_maps=None, source_trajectory=SOURCE_CODE) -> io.NodeOutput:
        mask = background if background.ndim == 3 else background[None]
        source = SOURCES.get(source_trajectory, "reconstruction")
        if source == "inversion":
            paired_trajectory(CSG_NODE, inversion)
        return io.NodeOutput(Z2IKSampler(_csg_fn, extra_options={
            "inversion": inversion, "background": mask, "lambda_pre": float(lambda_pre), "delta": float(delta),
            "clamp": bool(clamp_pull), "hard_mask_guard": bool(hard_mask_guard), "source_maps": source_maps,
            "source": source}))


_mask_fn.z2i_node = MASK_NODE                 # named by the size guard (Z2IKSampler.check_size)
_mask_fn.z2i_input = "inversion"
_csg_fn.z2i_node = CSG_NODE                 # named by the size guard (Z2IKSampler.check_size)

NODES = [CSGMask, CrossAttentionMixup, CSGSampler]
