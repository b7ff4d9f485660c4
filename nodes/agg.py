"""Z2I_AGGSampler: asymmetric gradient guidance toward the inversion's x0 estimates (latent-diffusion AGG)."""
from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..guidance.agg import agg_step, boundary
from ..guidance.clip_loss import agg_clip_loss, agg_target_vector
from ..guidance.ddim import finish, model_sigma_floor, noise_form_of_model, seeded_noise_sampler
from ._compose import guard_inplace, inpainting, own_rng, rows_of
from ._guided import Helper, guided_run
from ._host import Z2IKSampler, Z2IInputError, check_sampler_inputs, interruptible, is_sd3, paired_trajectory
from .clip_models import ClipLossModelType, image_decoder
from .types import InversionType

NODE = "Z2I AGG Sampler"


@own_rng
def _agg_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, inversion=None, weight=0.1,
            dds_lr=0.01, dds_steps=10, guided_until=0.2, masked_until=0.8, object_mask=None, eta=0.0, stats=None,
            style=None):
    check_sampler_inputs(NODE, model, x, inversion, flow_ok=True)
    if style is not None and is_sd3(model.inner_model.model_patcher):
        raise Z2IInputError(NODE, "style_clip", "the CLIP style loss (App. B) is not built for SD3: its x0 decode and "
                            "cutouts are tested on the UNet families only", "disconnect style_clip on SD3 (the L1 "
                            "structure guidance runs on it), or use an SD1.x/SD2.x/SDXL model for the style loss")
    form = noise_form_of_model(model)
    extra_args, keep = inpainting(extra_args or {}, inversion, NODE)     # noise mask: keep the source outside
    traj = paired_trajectory(NODE, inversion)
    n = len(sigmas) - 1
    e1, e2 = boundary(guided_until, n), boundary(masked_until, n)
    mask = None
    if object_mask is not None:
        mask = F.interpolate(object_mask[:, None].float(), size=x.shape[-2:], mode="area")[:, 0].to(x)
    s_in = x.new_ones([x.shape[0]])
    noise_sampler = seeded_noise_sampler(x, extra_args.get("seed")) if eta > 0 else None
    cb = interruptible(callback)
    base = model.inner_model.inner_model
    rows = rows_of(model, extra_args)       # the batch in one call, or each image as alone (batch "per image")
    levels = [float(v) for v in sigmas.tolist()]        # one read of the schedule, not one per step
    with ExitStack() as stack:
        scaler = None
        if weight != 0 or style is not None:
            helpers = [] if style is None else [Helper(style["vae"].patcher, style["vae"].first_stage_model),
                                                Helper(getattr(style["model"], "patcher", None), style["model"].model)]
            g = stack.enter_context(guided_run(model, extra_args, x, NODE, rows=1, helpers=helpers, stats=stats,
                                                cfg_call=True))
            scaler = g.scaler
            extra_args = {**extra_args, "model_options": guard_inplace(extra_args.get("model_options", {}))}
        extra_loss = _style_loss(style, base, traj, x, extra_args.get("seed")) if style else None
        for i in range(n):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            guided = i < e1 or (mask is not None and i < e2)
            target = None
            if guided and weight != 0:
                try:
                    k = traj.index_of_sigma(float(sigma))
                except KeyError:
                    raise Z2IInputError(NODE, "sigmas (of the sampler node)", f"sigma {float(sigma):.4g} is not on "
                                        "the inversion's schedule", "connect DDIM Inversion's 'sigmas'") from None
                target = traj.x0[k].to(x) if k < traj.x0.shape[0] else None   # the top level has no x0*
            noise = noise_sampler(sigma, sigma_next) if eta > 0 and levels[i + 1] > 0 else None
            x_next, x0 = agg_step(
                x, sigma, sigma_next,
                lambda xx, s=sigma: rows(xx, s * s_in, **extra_args), target, weight,
                dds_lr, dds_steps, mask if (mask is not None and i >= e1) else None, eta, noise, stats,
                extra_loss if guided else None, form, scaler, last=levels[i + 1] == 0)
            cb({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": x0})
            x = x_next if keep is None else keep(x_next, sigma_next)
    return finish(x, sigmas, model_sigma_floor(model))     # diffusers' clean latent when the schedule ends at sigma(0)


def _style_loss(style: dict, base, traj, x, seed):
    """AGG Eq. 21-22 on the VAE-decoded x0: -cos(v_trg, E_I(cutouts(decode(x0)))) times lambda_style (a mean over
    each image's cutouts, summed over the batch). Called inside the guided run, which loaded the VAE and open_clip
    and aliased their weights."""
    decode = image_decoder(style["vae"], base, NODE, load=False)
    enc = style["model"]
    with torch.inference_mode(False), torch.no_grad():
        e_src = enc.encode_image(decode(traj.latents[0].to(x)))        # the source image x_src
        t = enc.encode_text([style["source"], style["target"]])
    v_trg = agg_target_vector(e_src, t[:1], t[1:])
    gen = torch.Generator().manual_seed(int(seed or 0))                  # the cutouts follow noise_seed
    weight, cuts = style["weight"], style["cutouts"]
    return lambda x0: weight * agg_clip_loss(enc, decode(x0), v_trg, cuts, gen)


class AGGSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_AGGSampler",
            display_name="AGG Sampler (Z2I)",
            category="Z2I/sampling",
            description=(
                "Edits your inverted image toward the target prompt (a new style or content) while a structure "
                "loss keeps it close to the original's layout; optionally a CLIP text loss sets the style. It "
                "samples the inverted image with the target prompt while an L1 loss to the inversion's x0 "
                "estimates at the same timestep keeps the structure. Each guided step takes one gradient through the UNet (MCG), refines x0 with "
                "AdamW without the UNet (DDS), and puts the result in DDIM's x0 term only, keeping the original "
                "eps in the direction term. SamplerCustom: add_noise off, the inversion's noise and sigmas, "
                "positive = target prompt. Reference: Asymmetric Gradient Guidance, AGG (Kwon & Ye 2023), in "
                "its latent-diffusion form."),
            inputs=[
                InversionType.Input("inversion", tooltip="From DDIM Inversion: the x0* targets."),
                io.Float.Input("lambda_reg", default=0.1, min=0.0, max=1000.0, step=0.01,
                               tooltip="Weight of the L1 structure loss (mean over each image's latent elements; "
                                       "the paper's LDM value 0.1). 0 = plain DDIM. Higher keeps more structure."),
                io.Float.Input("guided_until", default=0.3, min=0.0, max=1000.0, step=0.01,
                               tooltip="t_edit1: guide the whole image for this fraction of the steps (<= 1) or "
                                       "this many steps (> 1). The paper varies 10-20 of 50."),
                io.Float.Input("masked_until", default=0.8, min=0.0, max=1000.0, step=0.01,
                               tooltip="t_edit2: with an object mask, guide only the background until here "
                                       "(Eq. 19; the paper: 40 of 50). Ignored without a mask."),
                io.Int.Input("dds_steps", default=10, min=0, max=200,
                             tooltip="AdamW refinement steps of x0 per guided step (App. B: 10). 0 = MCG only."),
                io.Float.Input("dds_lr", default=0.01, min=0.0, max=1.0, step=0.001,
                               tooltip="AdamW learning rate of the refinement (App. B: 0.01)."),
                io.Float.Input("eta", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Stochasticity of each step (the paper's sigma_t; it uses 0.8). 0 = "
                                       "deterministic. Noise comes from the sampler node's noise_seed."),
                io.Mask.Input("object_mask", optional=True,
                              tooltip="White where the edited object is (e.g. 1 - CSG Content Mask's background). "
                                      "Enables Eq. 19's background-only phase."),
                ClipLossModelType.Input("style_clip", optional=True,
                                        tooltip="Optional text style loss (App. B Eq. 21-22): an open_clip model "
                                                "from Load open_clip. Needs vae, style_source and style_target."),
                io.Vae.Input("vae", optional=True, tooltip="The checkpoint's VAE: the style loss sees decoded x0."),
                io.String.Input("style_source", default="a photo", optional=True,
                                tooltip="Text describing the input image (d_src of Eq. 22)."),
                io.String.Input("style_target", default="an oil painting", optional=True,
                                tooltip="Text describing the wanted look (d_trg). Lets you edit without a target "
                                        "prompt: give SamplerCustom the source prompt."),
                io.Float.Input("lambda_style", default=1.0, min=0.0, max=10000.0, step=0.1, optional=True,
                               tooltip="Weight of the CLIP style loss (lambda_sty of Eq. 15). Each guided step "
                                       "then decodes x0 and backpropagates through the VAE decoder and CLIP."),
                io.Int.Input("cutouts", default=8, min=0, max=64, optional=True,
                             tooltip="Random crops of decoded x0 seen by CLIP per evaluation (the AGG code: 8); "
                                     "0 = the whole image. Crops follow the sampler node's noise_seed."),
            ],
            outputs=[io.Sampler.Output(display_name="sampler",
                                       tooltip="The AGG sampler, for SamplerCustom's sampler input (with the "
                                               "inversion's noise as latent_image and its sigmas).")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, inversion, lambda_reg, guided_until, masked_until, dds_steps, dds_lr, eta,
                object_mask=None, style_clip=None, vae=None, style_source="a photo", style_target="an oil painting",
                lambda_style=1.0, cutouts=8) -> io.NodeOutput:
        if object_mask is not None and object_mask.ndim == 2:
            object_mask = object_mask[None]
        style = None
        if style_clip is not None and lambda_style > 0:
            if vae is None:
                raise Z2IInputError(NODE, "vae", "the CLIP style loss needs the VAE to decode x0",
                                    "connect the checkpoint loader's VAE")
            if not style_target.strip():
                raise Z2IInputError(NODE, "style_target", "is empty", "describe the wanted look, e.g. "
                                    "'an oil painting'")
            style = {"model": style_clip, "vae": vae, "source": style_source, "target": style_target,
                     "weight": float(lambda_style), "cutouts": int(cutouts)}
        return io.NodeOutput(Z2IKSampler(_agg_fn, extra_options={
            "inversion": inversion, "weight": float(lambda_reg), "dds_lr": float(dds_lr), "dds_steps": int(dds_steps),
            "guided_until": float(guided_until), "masked_until": float(masked_until), "object_mask": object_mask,
            "eta": float(eta), "style": style}))


_agg_fn.z2i_node = NODE                 # named by the size guard (Z2IKSampler.check_size)

NODES = [AGGSampler]
