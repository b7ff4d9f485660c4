"""Cross-attention guided SAMPLER nodes (pix2pix-zero) for core SamplerCustom / SamplerCustomAdvanced."""
from __future__ import annotations

import comfy.model_patcher
import comfy.samplers
import torch
from comfy_api.latest import io

from ..attention_patches.controller import CALL_KEY, SELF_CALL_KEY, AttentionCall, attn1_replace, attn2_replace
from ..attention_patches.sites import cross_attention_sites, select_sites
from ..guidance.autograd import autograd_parameters
from ..guidance.pix2pix_zero import sample_pix2pix_zero
from ._host import Z2IInputError, interruptible

P2PZ = "Z2I pix2pix-zero Sampler"


class GuidedCalls:
    """Per-run access to one UNet call per conditioning, with the attn2 patch and a per-call AttentionCall.

    Built inside the sampler from ComfyUI's own guider: the patches go into a copy of this run's model
    options, never into the MODEL, so nothing leaks into clones, other graphs or later runs.
    """

    def __init__(self, model, extra_args: dict, node: str, self_attention: bool = False):
        self.model, self.extra_args = model, extra_args
        self.guider = model.inner_model
        self.base = self.guider.inner_model
        self.unet = self.base.diffusion_model
        self.sites = cross_attention_sites(self.unet)
        if not self.sites:
            raise Z2IInputError(node, "model", "this UNet has no cross-attention layers", "use an SD1.x/SD2.x/SDXL model")
        mo = dict(extra_args.get("model_options", {}))
        mo["transformer_options"] = dict(mo.get("transformer_options", {}))
        for s in self.sites:
            mo = comfy.model_patcher.set_model_options_patch_replace(mo, attn2_replace, "attn2", s.block, s.id, s.index)
            if self_attention and s.block == "output":
                mo = comfy.model_patcher.set_model_options_patch_replace(mo, attn1_replace, "attn1", s.block, s.id,
                                                                         s.index)
        self.patched = mo

    def conds(self, name: str):
        return self.guider.conds.get(name)

    def denoise_one(self, cond_name: str):
        conds = self.conds(cond_name)

        def run(x, sigma, call: AttentionCall, self_call: AttentionCall = None):
            mo = dict(self.patched)
            mo["transformer_options"] = {**self.patched["transformer_options"], CALL_KEY: call}
            if self_call is not None:
                mo["transformer_options"][SELF_CALL_KEY] = self_call
            s = sigma * x.new_ones([x.shape[0]])
            return comfy.samplers.calc_cond_batch(self.base, [conds], x, s, mo)[0]

        return run

    def denoise_cfg(self, x, sigma, call: AttentionCall = None):
        """The full CFG prediction through ComfyUI's guider; with `call`, the MODEL's own attn2 patches
        (e.g. the mixup patcher's) see it."""
        extra = self.extra_args
        if call is not None:
            mo = dict(extra.get("model_options", {}))
            mo["transformer_options"] = {**mo.get("transformer_options", {}), CALL_KEY: call}
            extra = {**extra, "model_options": mo}
        return self.model(x, sigma * x.new_ones([x.shape[0]]), **extra)


def _p2pz_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, xa_guidance=0.1, layers="",
             map_dtype=torch.float32, stats=None, check_loss=False):
    calls = GuidedCalls(model, extra_args or {}, P2PZ)
    if not calls.conds("negative"):
        raise Z2IInputError(P2PZ, "negative (of the sampler node)", "no negative conditioning",
                            "connect the source caption as the negative prompt, as pix2pix-zero does")
    sites = select_sites(calls.sites, layers) if layers.strip() else calls.sites
    run = lambda: sample_pix2pix_zero(  # noqa: E731
        x, sigmas, calls.denoise_one("negative"), calls.denoise_one("positive"), calls.denoise_cfg, lam=xa_guidance,
        sites=sites, map_dtype=map_dtype, callback=interruptible(callback), stats=stats, check_loss=check_loss)
    if xa_guidance == 0:
        return run()
    with autograd_parameters(calls.unet):
        return run()


class Pix2PixZeroSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_Pix2PixZeroSampler",
            display_name="pix2pix-zero Sampler (Z2I)",
            category="Z2I/sampling",
            description=(
                "pix2pix-zero (Parmar et al. 2023, Alg. 1): edits an inverted image with cross-attention "
                "guidance. Wire SamplerCustom with add_noise off, the inversion's noise and sigmas, positive = "
                "the caption with the edit direction applied, negative = the caption itself, cfg about 5. "
                "Each step a CFG-neutral reference branch (the caption) runs beside the edit, and the edit latent "
                "takes one gradient step toward the reference's cross-attention maps, keeping the structure."),
            inputs=[
                io.Float.Input("xa_guidance", default=0.1, min=0.0, max=10.0, step=0.01,
                               tooltip="lambda_xa, the gradient step size in the paper's latent units "
                                       "(official code: 0.1; raise by 0.05 if structure is lost). 0 = plain "
                                       "DDIM with the edited prompt."),
                io.String.Input("layers", default="input,middle,output",
                                tooltip="Cross-attention layers in the loss: block names (input, middle, "
                                        "output) or sites like output.3.0, comma separated. The paper's code "
                                        "uses all of them."),
                io.Combo.Input("map_precision", options=["fp32", "fp16"], default="fp32",
                               tooltip="Storage of the reference maps (one step at a time). fp16 halves it."),
            ],
            outputs=[io.Sampler.Output(display_name="sampler")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, xa_guidance, layers, map_precision) -> io.NodeOutput:
        opts = {"xa_guidance": float(xa_guidance), "layers": layers,
                "map_dtype": torch.float16 if map_precision == "fp16" else torch.float32}
        return io.NodeOutput(comfy.samplers.KSAMPLER(_p2pz_fn, extra_options=opts))


NODES = [Pix2PixZeroSampler]
