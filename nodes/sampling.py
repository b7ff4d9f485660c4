"""SAMPLER nodes for core SamplerCustom / SamplerCustomAdvanced."""
from __future__ import annotations

from comfy_api.latest import io

from ..guidance.ddim import sample_ddim
from ._compose import inpainting, own_rng, rows_of
from ._host import Z2IKSampler, check_sampler_inputs, interruptible
from .types import InversionType

NODE = "Z2I DDIM Sampler"
INVERSION_TIP = ("Optional: DDIM Inversion's INVERSION. Needed only when the latent has a noise mask (inpainting): outside the mask the result then follows the inversion (the source image), inside it the sampler edits.")


@own_rng
def _ddim_sampler_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, inversion=None):
    """KSAMPLER entry point: the pure DDIM loop with ComfyUI's progress/preview callback."""
    check_sampler_inputs(NODE, model, x, inversion, flow_ok=True)
    extra_args, keep = inpainting(extra_args or {}, inversion, NODE)
    return sample_ddim(rows_of(model, extra_args or {}), x, sigmas, extra_args=extra_args, callback=interruptible(callback),
                       disable=disable, eta=eta, keep=keep)


class DDIMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_DDIMSampler",
            display_name="DDIM Sampler (Z2I)",
            category="Z2I/sampling",
            description=(
                "A sampler for SamplerCustom that takes true DDIM steps: at eta 0 it turns the noise from DDIM "
                "Inversion back into your image (with an edited prompt: into a plain, unguided edit of "
                "it). eta interpolates between deterministic DDIM (0) and DDPM-like sampling (1). Use with "
                "SamplerCustom or SamplerCustomAdvanced and any SIGMAS (BasicScheduler with 'ddim_uniform' gives "
                "the papers' timesteps). Written out as the DDIM update itself (Song et al. 2021, "
                "arXiv:2010.02502) rather than core's Euler alias. On SD3 (rectified flow) the same update is the "
                "flow ODE's Euler step at eta 0."),
            inputs=[
                io.Float.Input(
                    "eta", default=0.0, min=0.0, max=1.0, step=0.01, round=False,
                    tooltip="Stochasticity of each step. 0 = deterministic DDIM (reconstructs inverted "
                            "latents); 1 = DDPM-like. Noise for eta > 0 comes from the sampler node's "
                            "noise_seed, so results are reproducible."),
                InversionType.Input("inversion", optional=True, tooltip=INVERSION_TIP),
            ],
            outputs=[io.Sampler.Output(display_name="sampler",
                                       tooltip="The DDIM sampler, for the sampler input of SamplerCustom or "
                                               "SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, eta: float, inversion=None) -> io.NodeOutput:
        return io.NodeOutput(Z2IKSampler(_ddim_sampler_fn, extra_options={"eta": float(eta),
                                                                                     "inversion": inversion}))


_ddim_sampler_fn.z2i_node = NODE                 # named by the size guard (Z2IKSampler.check_size)

NODES = [DDIMSampler]
