"""Z2I_DDIMInversion: a real image's latent -> the noise that DDIM sampling maps back to it."""
from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..guidance.inversion import rescale_input, sample_ddim_invert
from ..guidance.regularizers import regularize_noise
from ._compose import own_rng, rows_of
from ._host import (Z2IKSampler, Z2IInputError, check_cond_batch, check_latent, combo_check, denoiser_of,
                    interruptible, is_sd3,
                    model_signature,
                    schedule_sigmas)
from .types import Inversion, InversionType

NODE = "Z2I DDIM Inversion"
VARIANTS = {"current level": "current", "target timestep": "target", "diffusers (exact)": "diffusers",
            "CSG code (N-2 steps)": "csg"}


def csg_code_schedule(model, sigmas: torch.Tensor, node: str):
    """The official CSG code's inversion on the sampling grid `sigmas` (descending, ending at 0; guidance.inversion
    "csg"): (levels, eval_sigmas, reverse schedule). With the grid's timesteps T_0 < ... < T_{N-1}: levels
    abar[T_k - 1] for k = 1..N-1 (as sigmas, ascending), eps of step k evaluated at sigma(T_k), and the reverse
    schedule the grid ending at the lowest trained level (the code's final abar_0), as diffusers' DDIM."""
    ms = model.get_model_object("model_sampling")
    grid = sigmas[:-1].flip(0)                                     # ascending: T_0 .. T_{N-1}
    if len(grid) < 2:
        raise Z2IInputError(node, "steps", f"{len(grid)} step: the CSG code's inversion needs a grid of two "
                            "timesteps or more (it takes N - 2 steps)", "use at least 2 steps (the code uses 50)")
    t = ms.timestep(grid).float().round()                          # the nearest trained timestep of each level
    if bool(((ms.sigma(t).to(grid) - grid).abs() > 1e-4 * grid).any()) or float(t[0]) < 1:
        raise Z2IInputError(node, "scheduler", "the CSG code's inversion steps between trained timesteps (T - 1 "
                            "to the next T - 1); this schedule's levels are not trained timesteps above 0",
                            "use 'ddim_uniform' (the code's grid)")
    levels = ms.sigma((t[1:] - 1).to(grid.dtype)).to(grid)
    evals = grid[1:-1]
    floor = float(ms.sigma_min)
    return levels, evals, torch.cat([sigmas[:-1], sigmas.new_full((1,), floor)])


@own_rng
def _invert_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, start=None, **options):
    x = sample_ddim_invert(rows_of(model, extra_args or {}), x, sigmas, extra_args=extra_args,
                           callback=interruptible(callback), disable=disable, **options)
    # the CSG code's x_T, handed to the sampler at its first level (one training step above where it sits)
    return x if start is None else rescale_input(x, sigmas[-1], start)


class DDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_DDIMInversion",
            display_name="DDIM Inversion (Z2I)",
            category="Z2I/inversion",
            description=(
                "Finds the noise that recreates your image, so an edit can start from it. It runs the "
                "deterministic DDIM update up the noise schedule so that DDIM sampling from the returned noise "
                "reconstructs the input. Feed 'noise' to SamplerCustom with add_noise off, cfg 1, the same "
                "prompt, the Z2I DDIM sampler and 'sigmas'. The INVERSION output carries the whole trajectory "
                "for the editing methods. Optional pix2pix-zero noise regularisation keeps the noise Gaussian "
                "(more editable). References: pix2pix-zero section 3.1, CSG section 3.1."),
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x (v-prediction), SDXL or SD3 model (on SD3, "
                                                "rectified flow: the Euler step of the flow ODE run backwards)."),
                io.Conditioning.Input("positive", tooltip="The source prompt: a caption of the input image."),
                io.Latent.Input("latent", tooltip="The image to invert, from VAE Encode."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="DDIM steps; use the same number to reconstruct or edit. More steps "
                                     "reconstruct more faithfully (the papers use 50-100)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="ddim_uniform",
                               tooltip="Timestep schedule. 'ddim_uniform' is the papers' DDIM grid "
                                       "(t = 981, 961, ..., 1 for 50 steps)."),
                io.Combo.Input("variant", options=list(VARIANTS), default="current level",
                               tooltip="'current level': eps predicted where the latent is (exact Euler "
                                       "inverse of the ODE; default). 'target timestep': eps predicted at the "
                                       "next timestep (the rule of diffusers' DDIMInverseScheduler) from "
                                       "sigma 0. 'diffusers (exact)': reproduces diffusers' pix2pix-zero "
                                       "inversion: the clean latent sits at the lowest trained level, the "
                                       "regulariser draws its shifts as diffusers does, and the returned "
                                       "sigmas end at that level, where every Z2I sampler returns the clean "
                                       "latent as diffusers does. Use it to match the paper's released "
                                       "results. 'CSG code (N-2 steps)': the official CSG code's inversion (its "
                                       "figures' source): N - 2 steps, eps at each grid timestep from the latent "
                                       "one training step below it, x_T handed to the sampler one step above "
                                       "where it sits (an off-by-one of that code, kept to reproduce it); for "
                                       "the CSG nodes with their 'reconstruction (official code)' source. "
                                       "'current level' and 'target timestep' are ours."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance while inverting. 1 = none, as every paper "
                                       "inverts; larger values break reconstruction. Needs 'negative' when not 1."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Invert only part of the way (same meaning as BasicScheduler's denoise). "
                                       "1 = all the way to pure noise."),
                io.Int.Input("refine_iterations", default=0, min=0, max=20,
                             tooltip="Fixed-point iterations per step that make each step the exact inverse "
                                     "of the DDIM sampling step (better reconstruction, one more UNet call "
                                     "per iteration). 0 = plain DDIM inversion."),
                io.Boolean.Input("regularize", default=False,
                                 tooltip="pix2pix-zero's noise regularisation (auto-correlation pyramid + KL, "
                                         "Eq. 3): keeps the inverted noise white, which helps editing but "
                                         "costs exact reconstruction. Off = plain inversion."),
                io.Float.Input("reg_lambda", default=20.0, min=0.0, max=1000.0, step=0.5,
                               tooltip="Step size of each regulariser term (pix2pix-zero: 20). 0 = no effect."),
                io.Int.Input("reg_iterations", default=5, min=1, max=100,
                             tooltip="Regularisation iterations per inversion step (pix2pix-zero: 5)."),
                io.Int.Input("reg_seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the regulariser's random shifts (results are reproducible)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Only used when cfg is not 1. Leave empty otherwise."),
            ],
            outputs=[
                io.Latent.Output(display_name="noise", tooltip="The inverted noise x_T, for SamplerCustom "
                                                               "with add_noise off."),
                InversionType.Output(display_name="inversion", tooltip="Sigmas, per-step latents, per-step "
                                                                       "x0 predictions, conditioning used."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The matching reverse schedule, for "
                                                                "SamplerCustom's sigmas input."),
            ],
        )

    @classmethod
    def validate_inputs(cls, scheduler=None, variant=None):
        return combo_check(cls, NODE, scheduler=scheduler, variant=variant)

    @classmethod
    def execute(cls, model, positive, latent, steps, scheduler, variant, cfg, denoise, refine_iterations,
                regularize, reg_lambda, reg_iterations, reg_seed, negative=None) -> io.NodeOutput:
        samples = latent["samples"]
        denoiser_of(model, NODE)
        check_latent(model, samples, NODE, flow_ok=True)
        check_cond_batch(positive, samples.shape[0], NODE, "positive")
        check_cond_batch(negative, samples.shape[0], NODE, "negative")
        if variant not in VARIANTS:
            raise Z2IInputError(NODE, "variant", f"unknown value {variant!r}", f"use one of {list(VARIANTS)}")
        if VARIANTS[variant] == "csg" and (is_sd3(model) or refine_iterations):
            raise Z2IInputError(NODE, "variant", "'CSG code (N-2 steps)' reproduces the official CSG code's DDPM "
                                "inversion, which has no refinement and no rectified-flow form",
                                "use 'current level' on SD3, or set refine_iterations to 0")
        if is_sd3(model) and VARIANTS[variant] == "diffusers":
            raise Z2IInputError(NODE, "variant", "'diffusers (exact)' reproduces diffusers' DDPM inversion, which "
                                "SD3 (rectified flow) does not have", "use 'current level' (the flow ODE's Euler "
                                "step run backwards) on SD3")
        if negative is None:
            if cfg != 1.0:
                raise Z2IInputError(NODE, "negative", f"cfg is {cfg} but no negative conditioning is connected",
                                    "connect one, or set cfg to 1 (the papers invert without guidance)")
            negative = positive
        sigmas = schedule_sigmas(model, scheduler, steps, denoise)
        sigma_floor = float(model.get_model_object("model_sampling").sigma_min)
        if VARIANTS[variant] == "diffusers":
            if not float(sigmas[-2]) > sigma_floor:
                raise Z2IInputError(NODE, "scheduler", "the schedule's last level is already the model's lowest",
                                    "use 'ddim_uniform' (diffusers' grid) or another scheduler ending at 0")
            sigmas = sigmas.clone()
            sigmas[-1] = sigma_floor          # diffusers' set_alpha_to_one=False: the clean latent sits at abar_0
        ascending, schedule, extra = sigmas.flip(0), None, {}
        if VARIANTS[variant] == "csg":
            ascending, evals, schedule = csg_code_schedule(model, sigmas, NODE)
            extra = {"eval_sigmas": evals, "start": float(schedule[0])}
            sigmas = schedule
        reg = None
        if regularize and VARIANTS[variant] == "diffusers":
            gens = [torch.Generator().manual_seed(int(reg_seed)) for _ in range(samples.shape[0])]
            reg = lambda eps, i: regularize_noise(eps, reg_lambda, reg_lambda, reg_iterations,  # noqa: E731
                                                  generator=gens, style="diffusers")
        elif regularize:
            gen = torch.Generator().manual_seed(int(reg_seed))
            reg = lambda eps, i: regularize_noise(eps, reg_lambda, reg_lambda, reg_iterations,  # noqa: E731
                                                  generator=gen)
        record: list = []
        options = {"variant": VARIANTS[variant], "refine": int(refine_iterations), "regularize": reg,
                   "record": record, "sigma_floor": sigma_floor, **extra}
        sampler = Z2IKSampler(_invert_fn, extra_options=options)
        samples = comfy.sample.fix_empty_latent_channels(model, samples)
        callback = latent_preview.prepare_callback(model, len(ascending) - 1)
        noise = comfy.sample.sample_custom(
            model, torch.zeros_like(samples), cfg, sampler, ascending, positive, negative, samples,
            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=int(reg_seed))
        out = {k: v for k, v in latent.items() if k != "samples"}     # a noise_mask (inpainting) travels on
        out["samples"] = noise
        # the trajectory is a cached node output: it lives where ComfyUI keeps outputs (the CPU on a GPU machine),
        # not in VRAM across runs; the samplers copy the level they need to the latent's device each step
        inversion = Inversion(trajectory=record[0].to(comfy.model_management.intermediate_device()),
                              model=model_signature(model), positive=positive,
                              negative=negative, cfg=float(cfg), variant=VARIANTS[variant],
                              latent_shape=tuple(samples.shape),
                              schedule=None if schedule is None else schedule.detach().clone())
        return io.NodeOutput(out, inversion, sigmas)


_invert_fn.z2i_node = NODE                 # named by the size guard (Z2IKSampler.check_size)
_invert_fn.z2i_input = "latent"

NODES = [DDIMInversion]
