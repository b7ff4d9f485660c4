"""Z2I_AGGSampler: asymmetric gradient guidance toward the inversion's x0 estimates (latent-diffusion AGG)."""
from __future__ import annotations

from contextlib import nullcontext

import comfy.samplers
import torch.nn.functional as F
from comfy_api.latest import io

from ..guidance.agg import agg_step, boundary
from ..guidance.autograd import autograd_parameters
from ..guidance.ddim import seeded_noise_sampler
from ._host import Z2IInputError, interruptible
from .types import InversionType

NODE = "Z2I AGG Sampler"


def _agg_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, inversion=None, weight=0.1,
            dds_lr=0.01, dds_steps=10, guided_until=0.2, masked_until=0.8, object_mask=None, eta=0.0, stats=None):
    extra_args = extra_args or {}
    traj = inversion.trajectory
    n = len(sigmas) - 1
    e1, e2 = boundary(guided_until, n), boundary(masked_until, n)
    mask = None
    if object_mask is not None:
        mask = F.interpolate(object_mask[:, None].float(), size=x.shape[-2:], mode="area")[:, 0].to(x)
    s_in = x.new_ones([x.shape[0]])
    noise_sampler = seeded_noise_sampler(x, extra_args.get("seed")) if eta > 0 else None
    cb = interruptible(callback)
    unet = model.inner_model.inner_model.diffusion_model
    with autograd_parameters(unet) if weight != 0 else nullcontext():
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
            noise = noise_sampler(sigma, sigma_next) if eta > 0 and float(sigma_next) > 0 else None
            x_next, x0 = agg_step(
                x, sigma, sigma_next, lambda xx, s=sigma: model(xx, s * s_in, **extra_args), target, weight,
                dds_lr, dds_steps, mask if (mask is not None and i >= e1) else None, eta, noise, stats)
            cb({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": x0})
            x = x_next
    return x


class AGGSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_AGGSampler",
            display_name="AGG Sampler (Z2I)",
            category="Z2I/sampling",
            description=(
                "Asymmetric Gradient Guidance (Kwon & Ye 2023), latent-diffusion form: sample the inverted image "
                "with the target prompt while an L1 loss to the inversion's x0 estimates at the same timestep "
                "keeps the structure. Each guided step takes one gradient through the UNet (MCG), refines x0 with "
                "AdamW without the UNet (DDS), and puts the result in DDIM's x0 term only, keeping the original "
                "eps in the direction term. SamplerCustom: add_noise off, the inversion's noise and sigmas, "
                "positive = target prompt."),
            inputs=[
                InversionType.Input("inversion", tooltip="From DDIM Inversion: the x0* targets."),
                io.Float.Input("lambda_reg", default=0.1, min=0.0, max=1000.0, step=0.01,
                               tooltip="Weight of the L1 structure loss (mean over latent elements; the paper's "
                                       "LDM value 0.1). 0 = plain DDIM. Higher keeps more structure."),
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
            ],
            outputs=[io.Sampler.Output(display_name="sampler")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, inversion, lambda_reg, guided_until, masked_until, dds_steps, dds_lr, eta,
                object_mask=None) -> io.NodeOutput:
        if object_mask is not None and object_mask.ndim == 2:
            object_mask = object_mask[None]
        return io.NodeOutput(comfy.samplers.KSAMPLER(_agg_fn, extra_options={
            "inversion": inversion, "weight": float(lambda_reg), "dds_lr": float(dds_lr), "dds_steps": int(dds_steps),
            "guided_until": float(guided_until), "masked_until": float(masked_until), "object_mask": object_mask,
            "eta": float(eta)}))


NODES = [AGGSampler]
