"""Asyrp on Stable Diffusion: h-space directions (derive, combine, save, load) and the asymmetric SAMPLER."""
from __future__ import annotations

import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..guidance.asyrp import HDirection, interval_index, sample_asyrp, step_scale
from ..guidance.hspace import HSPACE_KEY, HCall, hspace_middle_block_after_patch, hspace_output_block_patch
from ._host import (Z2IInputError, file_fingerprint, interruptible, load_safetensors, register_model_folder,
                    save_unique, unet_of)
from .types import InversionType

HDirectionType = io.Custom("Z2I_H_DIRECTION")
H_DIRS = register_model_folder("h_directions", {".safetensors"})
ASYRP, DERIVE = "Z2I Asyrp Sampler", "Z2I h-space Direction From Prompts"
UNITS = ["percent", "timestep"]


def middle_block_of(model, node: str, input_name: str = "model"):
    unet = unet_of(model, node, input_name)
    mid = getattr(unet, "middle_block", None)
    if mid is None or len(list(mid.children())) == 0:
        raise Z2IInputError(node, input_name, "this UNet has no middle block, so it has no h-space",
                            "use an SD1.x, SD2.x or SDXL checkpoint")
    return unet


def with_hspace(model_options: dict, call: HCall | None = None) -> dict:
    """A copy of the run's model options with the h-space hook (and, if given, this call's HCall)."""
    mo = dict(model_options)
    to = dict(mo.get("transformer_options", {}))
    patches = dict(to.get("patches", {}))
    if hasattr(comfy.model_patcher.ModelPatcher, "set_model_middle_block_after_patch"):   # newer hosts
        patches["middle_block_after_patch"] = [*patches.get("middle_block_after_patch", []),
                                               hspace_middle_block_after_patch]
    else:                                                                                   # 0.3.75
        patches["output_block_patch"] = [*patches.get("output_block_patch", []), hspace_output_block_patch]
    to["patches"] = patches
    if call is not None:
        to[HSPACE_KEY] = call
    mo["transformer_options"] = to
    return mo


def _asyrp_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, direction=None, scale=1.0,
              edit_until=0.5, boost_from=1.0, unit="percent", stats=None):
    extra_args = extra_args or {}
    middle_block_of(model.inner_model.model_patcher, ASYRP, "model (of the sampler node)")
    base = model.inner_model.inner_model
    ms = base.model_sampling
    n = len(sigmas) - 1
    to_sigma = lambda t: ms.sigma(torch.tensor(float(t)))  # noqa: E731
    edit_steps = interval_index(sigmas, edit_until, unit, to_sigma)
    boost = interval_index(sigmas, boost_from, unit, to_sigma)
    total = scale * step_scale(direction.meta.get("steps"), n)
    s_in = x.new_ones([x.shape[0]])
    call = HCall(direction=direction, scale=total)
    edit_args = {**extra_args, "model_options": with_hspace(extra_args.get("model_options", {}), call)}
    model_edit = lambda xx, s: model(xx, s * s_in, **edit_args)  # noqa: E731
    model_orig = lambda xx, s: model(xx, s * s_in, **extra_args)  # noqa: E731
    out = sample_asyrp(model_edit, model_orig, x, sigmas, edit_steps if total != 0 else 0, boost,
                       seed=extra_args.get("seed"), callback=interruptible(callback))
    if stats is not None:
        stats.update(edit_steps=edit_steps, boost_from=boost, scale=total, deltas=call.seen)
    return out


class AsyrpSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_AsyrpSampler",
            display_name="Asyrp Sampler (Z2I)",
            category="Z2I/sampling",
            description=(
                "Asyrp (Kwon et al. 2023, Eq. 8-9): adds a direction delta_h to the UNet middle-block output "
                "(h-space) and uses the edited prediction only in DDIM's x0 term (asymmetric), for the first "
                "part of the schedule; then plain DDIM; then optional eta=1 quality boosting. Use with "
                "SamplerCustom from an inverted latent (add_noise off) or from noise."),
            inputs=[
                HDirectionType.Input("direction", tooltip="From h-space Direction From Prompts, Combine or Load."),
                io.Float.Input("scale", default=1.0, min=-20.0, max=20.0, step=0.05,
                               tooltip="Edit strength (linear; negative edits the other way). 0 = plain DDIM."),
                io.Combo.Input("unit", options=UNITS, default="percent",
                               tooltip="How the two boundaries are given: fraction of the steps, or training "
                                       "timestep 0-999 (the paper's t_edit / t_boost; re-derive them for SD)."),
                io.Float.Input("edit_until", default=0.5, min=0.0, max=1000.0, step=0.01,
                               tooltip="End of the editing interval: percent 0.5 = the first half of the steps; "
                                       "timestep 500 = while t >= 500."),
                io.Float.Input("boost_from", default=1.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="Start of eta=1 quality boosting: percent 1.0 (or timestep 0) = never. "
                                       "Boosting adds seeded noise (the sampler node's noise_seed)."),
            ],
            outputs=[io.Sampler.Output(display_name="sampler")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, direction, scale, unit, edit_until, boost_from) -> io.NodeOutput:
        if unit == "percent" and (edit_until > 1 or boost_from > 1):
            raise Z2IInputError(ASYRP, "edit_until", f"percent boundaries must be 0..1 (got {edit_until}, "
                                f"{boost_from})", "use fractions of the schedule, or switch unit to timestep")
        return io.NodeOutput(comfy.samplers.KSAMPLER(_asyrp_fn, extra_options={
            "direction": direction, "scale": float(scale), "edit_until": float(edit_until),
            "boost_from": float(boost_from), "unit": unit}))


def _derive_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, inversion=None, out=None):
    guider = model.inner_model
    base = guider.inner_model
    traj = inversion.trajectory
    captured: dict = {}
    call = HCall(captured=captured)
    mo = with_hspace((extra_args or {}).get("model_options", {}), call)
    cb = interruptible(callback)
    diffs = []
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        xi = traj.latents[traj.index_of_sigma(float(sigma))].to(x)
        captured.clear()
        d = comfy.samplers.calc_cond_batch(base, [guider.conds["positive"], guider.conds["negative"]], xi,
                                           sigma * xi.new_ones([xi.shape[0]]), mo)
        diffs.append(torch.cat(captured[0]).mean(0, keepdim=True) - torch.cat(captured[1]).mean(0, keepdim=True))
        cb({"x": xi, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": d[0]})
    out.append(torch.stack(diffs).mean(0))
    return x


class HDirectionFromPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_HDirectionFromPrompts",
            display_name="h-space Direction From Prompts (Z2I)",
            category="Z2I/hspace",
            description=(
                "A training-free Asyrp direction: the mean over the inversion trajectory of the middle-block "
                "output with the target prompt minus that with the source prompt (the caption used to invert)."),
            inputs=[
                io.Model.Input("model", tooltip="The model the image was inverted with."),
                InversionType.Input("inversion", tooltip="From DDIM Inversion; its prompt is the source."),
                io.Conditioning.Input("target", tooltip="The prompt describing the edit (e.g. 'a smiling face')."),
                io.Conditioning.Input("source", optional=True,
                                      tooltip="Source prompt; default: the inversion's own prompt."),
            ],
            outputs=[HDirectionType.Output(display_name="direction")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, model, inversion, target, source=None) -> io.NodeOutput:
        middle_block_of(model, DERIVE)
        source = source if source is not None else inversion.positive
        sig = inversion.sigmas
        sigmas = torch.cat([sig[sig > 0], sig.new_zeros(1)])
        traj = inversion.trajectory
        latent = model.model.process_latent_out(traj.latents[-1]).cpu()
        out: list = []
        sampler = comfy.samplers.KSAMPLER(_derive_fn, extra_options={"inversion": inversion, "out": out})
        comfy.sample.sample_custom(model, torch.zeros_like(latent), 2.0, sampler, sigmas, target, source, latent,
                                   disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        delta = out[0].cpu()
        meta = {"family": inversion.model.family, "channels": int(delta.shape[1]), "mode": "derived",
                "spatial": list(delta.shape[-2:]), "steps": None}
        return io.NodeOutput(HDirection(delta, meta))


class HDirectionCombine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_HDirectionCombine",
            display_name="Combine h-space Directions (Z2I)",
            category="Z2I/hspace",
            description="a * coef_a + b * coef_b: Asyrp directions are linear and add up (section 5.2).",
            inputs=[
                HDirectionType.Input("a", tooltip="First direction."),
                io.Float.Input("coef_a", default=1.0, min=-20.0, max=20.0, step=0.05, tooltip="Its coefficient."),
                HDirectionType.Input("b", optional=True, tooltip="Second direction (optional)."),
                io.Float.Input("coef_b", default=1.0, min=-20.0, max=20.0, step=0.05, optional=True,
                               tooltip="Its coefficient."),
            ],
            outputs=[HDirectionType.Output(display_name="direction")],
        )

    @classmethod
    def execute(cls, a, coef_a, b=None, coef_b=1.0) -> io.NodeOutput:
        out = a.scaled(coef_a)
        if b is not None:
            if b.channels != a.channels:
                raise Z2IInputError("Z2I Combine h-space Directions", "b", f"{b.channels} channels vs {a.channels}",
                                    "combine directions made with the same model family")
            out = out + b.scaled(coef_b)
        return io.NodeOutput(out)


class SaveHDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_SaveHDirection",
            display_name="Save h-space Direction (Z2I)",
            category="Z2I/hspace",
            description=f"Writes a direction to models/{H_DIRS} (safetensors + metadata; never overwrites).",
            inputs=[HDirectionType.Input("direction", tooltip="The direction to save."),
                    io.String.Input("filename", default="smile", tooltip=f"Name inside models/{H_DIRS}.")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, direction, filename) -> io.NodeOutput:
        return io.NodeOutput(ui={"text": [save_unique(H_DIRS, filename, *direction.to_safetensors())]})


class LoadHDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_LoadHDirection",
            display_name="Load h-space Direction (Z2I)",
            category="Z2I/hspace",
            description=f"Reads a direction from models/{H_DIRS} (safetensors, no pickle).",
            inputs=[io.Combo.Input("name", options=folder_paths.get_filename_list(H_DIRS),
                                   tooltip=f"A file in models/{H_DIRS}.")],
            outputs=[HDirectionType.Output(display_name="direction")],
        )

    @classmethod
    def fingerprint_inputs(cls, name):
        return file_fingerprint(H_DIRS, name)

    @classmethod
    def execute(cls, name) -> io.NodeOutput:
        tensors, metadata = load_safetensors(H_DIRS, name, "Z2I Load h-space Direction",
                                             "save one with Save h-space Direction first")
        try:
            return io.NodeOutput(HDirection.from_safetensors(tensors, metadata))
        except ValueError as e:
            raise Z2IInputError("Z2I Load h-space Direction", "name", str(e), "pick a file written by Save "
                                "h-space Direction") from None


NODES = [AsyrpSampler, HDirectionFromPrompts, HDirectionCombine, SaveHDirection, LoadHDirection]
