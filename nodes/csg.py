"""CSG (Conditional Score Guidance): content mask, cross-attention mixup patcher, guided SAMPLER."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..attention_patches.controller import AttentionCall, Capture, MapStore, Mixup, over
from ..attention_patches.csg_mask import SelfAttentionMean, TokenMapMean, content_mask
from ..attention_patches.sites import cross_attention_sites
from ..guidance.csg import align_tokens, csg_step, hard_background, omega, token_positions
from ..guidance.ddim import ddim_step, finish, model_sigma_floor
from ..guidance.schedules import eps_from_denoised
from ._compose import (analysis_options, attn2_at, foreign_attn2_sites, inpainting, own_rng, per_image_conds,
                       rows_of, with_z2i_attn2)
from ._host import Z2IInputError, check_inversion, check_sampler_inputs, interruptible, unet_of
from .attention import GuidedCalls
from .types import InversionType

MASK_NODE, MIXUP_NODE, CSG_NODE = "Z2I CSG Mask", "Z2I Cross-Attention Mixup", "Z2I CSG Sampler"
MIXUP_KEY = "z2i_mixup"
NORMALISE_CODE, NORMALISE_NONE = "per layer (official code)", "none (paper Eq. 13)"


@dataclass(frozen=True)
class MixupSpec:
    """Set on a MODEL by the mixup patcher; read by the CSG sampler, which supplies the source maps."""

    background: torch.Tensor          # [B or 1, H, W] background probability P (image resolution)
    token_map: torch.Tensor | None    # target token -> source token (None = identity)
    strength: float = 1.0             # scales the mixing weight of the source maps
    normalise: bool = True            # object mask / its max per layer and image (the authors' code)

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
             token_level=2, mask_level=0, out=None):
    extra_args = {**(extra_args or {}), "model_options": analysis_options(
        (extra_args or {}).get("model_options", {}), MASK_NODE)}          # full-resolution maps (ToMe, deep shrink)
    calls = GuidedCalls(model, extra_args, MASK_NODE, self_attention=True)
    h, w = x.shape[-2:]
    mask_hw = (max(1, h >> mask_level), max(1, w >> mask_level))
    token_hw = (max(1, h >> token_level), max(1, w >> token_level))
    traj = inversion.trajectory
    denoise = calls.denoise_one("positive")
    cb = interruptible(callback)
    # each image alone (as guidance.ddim.per_row), so a batch's masks are the single-image masks bit for bit
    parts = [slice(None)] if x.shape[0] == 1 or per_image_conds(model) else [slice(r, r + 1)
                                                                             for r in range(x.shape[0])]
    word_maps, smoothed = [], []
    for rows in parts:
        sa = SelfAttentionMean(mask_hw)
        # First pass finds the self-attention resolution actually available (SDXL has none at full latent size).
        tm = None
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i]
            xi = traj.latents[traj.index_of_sigma(float(sigma))][rows].to(x)
            controllers = [tm] if tm is not None else []
            d = denoise(xi, sigma, AttentionCall(i, controllers), AttentionCall(i, [sa]))
            sa.end_step(i)
            if tm is None:
                tm = TokenMapMean(positions, hw=sa.hw or mask_hw, max_hw=token_hw)
                denoise(xi, sigma, AttentionCall(i, [tm]))
            tm.end_step(i)
            cb({"x": xi, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": d})
        word_maps.append(tm.mean())
        smoothed.append(content_mask(tm.mean(), sa.mean() if sa.total is not None else None))
    out.append((torch.cat(word_maps), torch.cat(smoothed)))
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
            ],
            outputs=[io.Mask.Output(display_name="background",
                                    tooltip="White = background to keep, dark = the object to edit, at image "
                                            "resolution (P = 1 - M_hat). For Cross-Attention Mixup and CSG Sampler."),
                     io.Image.Output(display_name="object_map",
                                     tooltip="Where the word's object is (white), smoothed: M_hat, to preview."),
                     io.Image.Output(display_name="word_map",
                                     tooltip="The time-averaged word map before self-attention smoothing, to "
                                             "preview.")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, model, clip, inversion, caption, word, token_level, mask_level) -> io.NodeOutput:
        unet_of(model, MASK_NODE)
        check_inversion(MASK_NODE, inversion, model)
        check_caption(clip, caption, inversion.positive, MASK_NODE)
        positions = word_positions(clip, caption, word, MASK_NODE)
        traj = inversion.trajectory
        sigmas = inversion.sigmas[:-1] if float(inversion.sigmas[-1]) == 0 else inversion.sigmas
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        out: list = []
        sampler = comfy.samplers.KSAMPLER(_mask_fn, extra_options={
            "inversion": inversion, "positions": positions, "token_level": int(token_level),
            "mask_level": int(mask_level), "out": out})
        latent = model.model.process_latent_out(traj.latents[-1]).cpu()
        comfy.sample.sample_custom(model, torch.zeros_like(latent), 1.0, sampler, sigmas, inversion.positive,
                                   inversion.positive, latent, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
                                   callback=latent_preview.prepare_callback(model, len(sigmas) - 1))
        word_map, smoothed = out[0]
        lat_h, lat_w = traj.latents.shape[-2:]
        size = (lat_h * 8, lat_w * 8)
        up = lambda m: F.interpolate(m[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]  # noqa
        obj = up(smoothed).clamp(0, 1).cpu()
        background = (1 - obj).clamp(0, 1)
        word_img = up(word_map / word_map.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]).clamp(0, 1).cpu()
        return io.NodeOutput(background, obj[..., None].repeat(1, 1, 1, 3), word_img[..., None].repeat(1, 1, 1, 3))


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
            ],
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="The patched model, for the model input of the SamplerCustom that runs "
                                             "the CSG Sampler.")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, model, background, strength, clip=None, source_prompt="", target_prompt="",
                mask_normalisation=NORMALISE_CODE) -> io.NodeOutput:
        if strength == 0:
            return io.NodeOutput(model)
        unet = unet_of(model, MIXUP_NODE)
        token_map = None
        if clip is not None and source_prompt.strip() and target_prompt.strip():
            src, tgt = _ids(clip, source_prompt), _ids(clip, target_prompt)
            token_map = align_tokens(src, tgt)
        m = model.clone()
        for s in cross_attention_sites(unet):       # over another pack's attn2 replace, if any (controller.over)
            m.set_model_attn2_replace(over(attn2_at(m.model_options, s)), s.block, s.id, s.index)
        mask = background if background.ndim == 3 else background[None]
        m.model_options["transformer_options"][MIXUP_KEY] = MixupSpec(
            mask.float().clamp(0, 1).cpu(), token_map, float(strength), mask_normalisation != NORMALISE_NONE)
        return io.NodeOutput(m)


@own_rng
def _csg_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, inversion=None, background=None,
            lambda_pre=15.0, delta=1.5, clamp=False, hard_mask_guard=True):
    check_sampler_inputs(CSG_NODE, model, x, inversion)
    extra_args, keep = inpainting(extra_args or {}, inversion, CSG_NODE)   # noise mask: keep the source outside
    spec = extra_args.get("model_options", {}).get("transformer_options", {}).get(MIXUP_KEY)
    traj = inversion.trajectory
    bg = F.interpolate(background[:, None].float(), size=x.shape[-2:], mode="area")[:, 0].to(x)
    steps = len(sigmas) - 1
    if spec is not None:
        # another pack replaced the mixup's attn2 patch after the mixup node: compose over it for this run
        # (its function still runs where maps are only read; mixed layers warn) instead of dropping the mixup
        mo = extra_args.get("model_options", {})
        sites = cross_attention_sites(model.inner_model.inner_model.diffusion_model)
        if foreign_attn2_sites(mo, sites):
            extra_args = {**extra_args, "model_options": with_z2i_attn2(mo, sites)}
    calls = GuidedCalls(model, extra_args, CSG_NODE, rowwise=True) if spec is not None else None
    rows = rows_of(model)          # each image evaluated as alone (guidance.ddim.per_row)
    store = MapStore(conds=(0,), max_steps=1)
    source = calls.denoise_one("negative") if calls is not None else None
    if calls is not None and not calls.conds("negative"):
        raise Z2IInputError(CSG_NODE, "negative (of the sampler node)", "no negative conditioning",
                            "connect the source caption as the negative prompt")
    cb = interruptible(callback)
    mix = None if spec is None else Mixup(store, spec.background.to(x.device), token_map=spec.token_map,
                                          normalise=spec.normalise, strength=spec.strength)
    clamp = pull_clamp(bg, clamp, hard_mask_guard and lambda_pre != 0)
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        try:
            x_src = traj.latents[traj.index_of_sigma(float(sigma))].to(x)
        except KeyError:
            raise Z2IInputError(CSG_NODE, "sigmas (of the sampler node)", f"sigma {float(sigma):.4g} is not on the "
                                "inversion's schedule", "connect the DDIM Inversion 'sigmas' output") from None
        if spec is not None:
            hw = tuple(x.shape[-2:])       # full-frame calls only (area-conditioned crops run plain attention)
            source(x_src, sigma, AttentionCall(i, [Capture(store)], latent_hw=hw))
            denoised = calls.denoise_cfg(x, sigma, AttentionCall(i, [mix], latent_hw=hw))
            store.drop(i)
        else:
            denoised = rows(x, sigma * x.new_ones([x.shape[0]]), **extra_args)
        cb({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if lambda_pre != 0:
            x = csg_step(x, sigma, sigma_next, denoised, x_src, omega(bg, lambda_pre, i, steps, delta), clamp=clamp)
        elif float(sigma_next) == 0:
            x = denoised
        else:
            x = ddim_step(denoised, eps_from_denoised(x, sigma, denoised), sigma, sigma_next)
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
                "posterior term -gamma_t * Omega_t * (x_t - x_t^src); no backpropagation. With a MODEL patched by "
                "Cross-Attention Mixup it also runs the source branch in lockstep to mix the maps (Eq. 13). "
                "SamplerCustom: add_noise off, the inversion's noise and sigmas, positive = target caption, "
                "negative = source caption, cfg about 5. Ours, not the paper: with a hard (binary) mask the "
                "pull is capped at 1, where Eq. 18 as written diverges (hard_mask_guard). Reference: Conditional "
                "Score Guidance, CSG (Lee et al. 2023), Eq. 18."),
            inputs=[
                InversionType.Input("inversion", tooltip="From DDIM Inversion: the source trajectory x_t^src."),
                io.Mask.Input("background", tooltip="Background probability P (CSG Content Mask)."),
                io.Float.Input("lambda_pre", default=15.0, min=0.0, max=100.0, step=0.5,
                               tooltip="lambda_pre of Eq. 15 (the authors: 15 for real images, 5 for generated). "
                                       "0 = no posterior guidance (with no mixup: plain DDIM)."),
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
            ],
            outputs=[io.Sampler.Output(display_name="sampler",
                                       tooltip="The CSG sampler, for SamplerCustom's sampler input (with the "
                                               "inversion's noise as latent_image and its sigmas).")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, inversion, background, lambda_pre, delta, clamp_pull, hard_mask_guard=True) -> io.NodeOutput:
        mask = background if background.ndim == 3 else background[None]
        return io.NodeOutput(comfy.samplers.KSAMPLER(_csg_fn, extra_options={
            "inversion": inversion, "background": mask, "lambda_pre": float(lambda_pre), "delta": float(delta),
            "clamp": bool(clamp_pull), "hard_mask_guard": bool(hard_mask_guard)}))


NODES = [CSGMask, CrossAttentionMixup, CSGSampler]
