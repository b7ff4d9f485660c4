"""Cross-attention guided SAMPLER nodes (pix2pix-zero) for core SamplerCustom / SamplerCustomAdvanced."""
from __future__ import annotations

import comfy.model_patcher
import comfy.samplers
import torch
from comfy_api.latest import io

from ..attention_patches.controller import CALL_KEY, COND_ORDER_KEY, SELF_CALL_KEY, AttentionCall, attn1_replace
from ..attention_patches.features import FEATURE_KEY, FeatureCall, attn1_output_capture
from ..attention_patches.joint import with_joint_patches
from ..attention_patches.sites import cross_attention_sites, joint_sites, select_sites
from ..guidance.ddim import model_sigma_floor, noise_form_of_model
from ..guidance.pix2pix_zero import Contrastive, sample_pix2pix_zero
from ._compose import guard_inplace, inpainting, own_rng, per_image_conds, with_z2i_attn2
from ._guided import guided_run, per_image
from .sampling import INVERSION_TIP
from .types import InversionType
from ._host import check_schedule, combo_check, Z2IKSampler, Z2IInputError, check_sampler_inputs, interruptible

P2PZ = "Z2I pix2pix-zero Sampler"


def label_of(cond_name: str) -> int:
    """core's label for a conditioning of the guider: the negative prompt is CFG's uncond (comfy.samplers.UNCOND,
    1), every other the cond (COND, 0)."""
    return 1 if cond_name == "negative" else 0


class GuidedCalls:
    """Per-run access to one UNet call per conditioning, with the attn2 patch and a per-call AttentionCall.

    Built inside the sampler from ComfyUI's own guider: the patches go into a copy of this run's model
    options, never into the MODEL, so nothing leaks into clones, other graphs or later runs.
    """

    def __init__(self, model, extra_args: dict, node: str, self_attention: bool = False, rowwise: bool = False):
        """rowwise: evaluate every UNet call one batch row at a time, so that each image of a batch is computed
        with exactly the kernels it gets alone (CPU/GPU kernels may partition a batch differently from a single
        row, and a guided loop amplifies those last-digit differences). Not used with an inpainting mask."""
        self.model, self.extra_args = model, extra_args
        self.rowwise = rowwise and extra_args.get("denoise_mask") is None and not per_image_conds(model)
        self.guider = model.inner_model
        self.base = self.guider.inner_model
        self.unet = self.base.diffusion_model
        self.joint = hasattr(self.unet, "joint_blocks")             # an MMDiT (SD3): attention_patches.joint
        self.sites = joint_sites(self.unet) if self.joint else cross_attention_sites(self.unet)
        if not self.sites:
            raise Z2IInputError(node, "model", "this UNet has no cross-attention layers", "use an SD1.x/SD2.x/SDXL model")
        mo = guard_inplace(extra_args.get("model_options", {}))     # other patches survive the backward pass
        if self.joint:
            self.patched = with_joint_patches(mo, len(self.sites))
            return
        mo = with_z2i_attn2(mo, self.sites)                         # composed over other packs' attn2 replaces
        for s in self.sites:
            if self_attention and s.block == "output":
                mo = comfy.model_patcher.set_model_options_patch_replace(mo, attn1_replace, "attn1", s.block, s.id,
                                                                         s.index)
        to = dict(mo["transformer_options"])
        patches = dict(to.get("patches", {}))
        patches["attn1_output_patch"] = [*patches.get("attn1_output_patch", []), attn1_output_capture]
        to["patches"] = patches
        mo["transformer_options"] = to
        self.patched = mo

    def conds(self, name: str):
        return self.guider.conds.get(name)

    def refuse_masked(self, node: str, *names: str) -> None:
        """Region masks in the conditioning (ConditioningSetMask) are refused by name: core evaluates each masked
        region as its own row and blends them, so the maps of a masked prompt are one set per region, which the
        guidance would compare with the caption's single set (a broadcast, wrong edit; an error with a batch)."""
        for name in names:
            if any("mask" in e for e in (self.conds(name) or [])):
                raise Z2IInputError(node, f"{name} (of the sampler node)", "the prompt carries a region mask "
                                    "(ConditioningSetMask), which this sampler's attention guidance cannot split "
                                    "by region", "use prompts without region masks; to edit one region, put the "
                                    "mask on the latent (Set Latent Noise Mask) and connect DDIM Inversion's "
                                    "inversion to the sampler, which keeps the rest of the image")

    def options(self, order: dict, call: AttentionCall = None, self_call: AttentionCall = None,
                feature_call: FeatureCall = None, **extra) -> dict:
        """This run's patched model options for one Z2I call: its label order (COND_ORDER_KEY) and call objects."""
        to = {**self.patched["transformer_options"], COND_ORDER_KEY: order}
        for key, value in ((CALL_KEY, call), (SELF_CALL_KEY, self_call), (FEATURE_KEY, feature_call)):
            if value is not None:
                to[key] = value
        return {**self.patched, **extra, "transformer_options": to}

    def denoise_one(self, cond_name: str):
        """run(x, sigma, call, ...) -> D_cond(x), the one conditioning's prediction, its rows labelled as core's
        CFG call labels them (the negative prompt uncond, the positive cond: label_of) and logical index 0 for
        the controllers."""
        label = label_of(cond_name)
        conds = [None] * label + [self.conds(cond_name)]

        def run(x, sigma, call: AttentionCall, self_call: AttentionCall = None, feature_call: FeatureCall = None):
            mo = self.options({label: 0}, call, self_call, feature_call)

            def one(xr):
                return comfy.samplers.calc_cond_batch(self.base, conds, xr, sigma * xr.new_ones([xr.shape[0]]),
                                                      mo)[label]
            return self.by_rows(one, x, call)

        return run

    def denoise_pair(self, first: str = "negative", second: str = "positive"):
        """run(x_a, x_b, sigma, call) -> (D_first(x_a), D_second(x_b)) in one batched UNet call, as core's CFG call
        makes it: the rows carry core's labels (cond_or_uncond: the positive prompt 0, the negative 1, which
        SAG, PAG and IPAdapter-style patches read) and `call`'s controllers see logical indices 0 (first) and 1
        (second) through COND_ORDER_KEY. core's calc_cond_batch batches the two conditionings and a
        model_function_wrapper (chained to any the graph has) puts each conditioning's own latent into its rows.
        None when a conditioning crops or conditions on the input before that wrapper sees it (area conds,
        control models): then each half runs as its own call."""
        labels = (label_of(first), label_of(second))
        if labels[0] == labels[1]:
            raise ValueError("z2i: a paired call needs one cond and one uncond conditioning")
        conds = [None, None]
        for name, lab in zip((first, second), labels):
            conds[lab] = self.conds(name)
        if any(c is None or any("area" in e or "control" in e or "default" in e for e in c) for c in conds):
            return None
        prev = self.patched.get("model_function_wrapper")
        order = {labels[0]: 0, labels[1]: 1}

        def one(xa, xb, sigma, call):
            rows = {labels[0]: xa, labels[1]: xb}

            def wrapper(apply_model, args):
                cou = list(args["cond_or_uncond"])
                inp = args["input"]
                if inp.shape[0] != len(cou) * xa.shape[0]:
                    raise RuntimeError("z2i: unexpected batch layout in a paired call")
                args = {**args, "input": torch.cat([rows[i].to(inp) for i in cou])}
                if prev is not None:
                    return prev(apply_model, args)
                return apply_model(args["input"], args["timestep"], **args["c"])

            mo = self.options(order, call, model_function_wrapper=wrapper)
            out = comfy.samplers.calc_cond_batch(self.base, conds, xa, sigma * xa.new_ones([xa.shape[0]]), mo)
            return out[labels[0]], out[labels[1]]

        def run(xa, xb, sigma, call: AttentionCall = None):
            if not self.rowwise or xa.shape[0] == 1:
                return one(xa, xb, sigma, call)
            outs = [one(xa[i:i + 1], xb[i:i + 1], sigma, call) for i in range(xa.shape[0])]
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

        return run

    def by_rows(self, fn, x, call: AttentionCall = None):
        """fn(x) for the whole batch, or row by row (concatenated in order) when rowwise; `call.row` says which
        image a row-wise call holds (controllers with per-image state, e.g. the mixup's masks, read it)."""
        if not self.rowwise or x.shape[0] == 1:
            return fn(x)
        out = []
        try:
            for i in range(x.shape[0]):
                if call is not None:
                    call.row = i
                out.append(fn(x[i:i + 1]))
        finally:
            if call is not None:
                call.row = None
        return torch.cat(out)

    def combine(self, x_u, d_u, x_c, d_c, sigma):
        """CFG in eps space of two predictions made at two latents (pix2pix-zero's code form), through core's
        cfg_function so that CFG patches (RescaleCFG, post-CFG hooks) apply: the cond prediction is re-expressed
        at x_u with the same eps, d_c + (x_u - x_c), and core mixes it with d_u at x_u."""
        s = sigma * x_u.new_ones([x_u.shape[0]])
        return comfy.samplers.cfg_function(self.base, d_c + (x_u - x_c), d_u, self.guider.cfg, x_u, s,
                                           model_options=self.extra_args.get("model_options", {}),
                                           cond=self.conds("positive"), uncond=self.conds("negative"))

    def denoise_cfg(self, x, sigma, call: AttentionCall = None):
        """The full CFG prediction through ComfyUI's guider; with `call`, the MODEL's own attn2 patches
        (e.g. the mixup patcher's) see it."""
        extra = self.extra_args
        if call is not None:
            mo = dict(extra.get("model_options", {}))
            mo["transformer_options"] = {**mo.get("transformer_options", {}), CALL_KEY: call}
            extra = {**extra, "model_options": mo}
        return self.by_rows(lambda xr: self.model(xr, sigma * xr.new_ones([xr.shape[0]]), **extra), x, call)


FORMS = {"both halves (official code)": "code", "single latent (paper Alg. 1)": "single"}
SAMPLER_TIP = ("The guided sampler, for SamplerCustom's sampler input (with the inversion's noise as latent_image "
               "and its sigmas).")
FORM_TOOLTIP = ("'both halves (official code)': as the authors' code and diffusers do (what the paper's figures "
                "show): the caption half and the edited half each take their own gradient step, eps is "
                "re-evaluated at both and mixed by CFG. 'single latent (paper Alg. 1)': one latent guided by the "
                "edited branch, cheaper (one backward pass per step instead of two); at the same step size it "
                "moves twice as far as the code's per-branch step.")


@own_rng
def _p2pz_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, xa_guidance=0.1, layers="",
             map_dtype=torch.float32, stats=None, check_loss=False, contrastive=None, node=None, form="code",
             pair=True, inversion=None):
    node = node or P2PZ
    check_sampler_inputs(node, model, x, inversion, flow_ok=True)
    if inversion is not None:
        check_schedule(node, inversion, sigmas)
    extra_args, keep = inpainting(extra_args or {}, inversion, node)
    calls = GuidedCalls(model, extra_args or {}, node, rowwise=per_image(extra_args or {}))
    calls.refuse_masked(node, "positive", "negative")
    if not calls.conds("negative"):
        raise Z2IInputError(node, "negative (of the sampler node)", "no negative conditioning",
                            "connect the source caption as the negative prompt, as pix2pix-zero does")
    try:
        sites = select_sites(calls.sites, layers) if layers.strip() else calls.sites
    except ValueError as e:
        raise Z2IInputError(node, "layers", str(e), "name blocks (input, middle, output; joint on SD3) or sites") \
            from None
    if contrastive is not None:
        spec, seed = contrastive
        try:
            feature_sites = frozenset(select_sites(calls.sites, spec["feature_layers"]))
        except ValueError as e:
            raise Z2IInputError(node, "feature_layers", str(e), "name blocks (input, middle, output; joint on SD3) or "
                                "sites") from None
        contrastive = Contrastive(lambda_c=spec["lambda_c"], lambda_e=spec["lambda_e"], sites=feature_sites,
                                  n_patches=spec["n_patches"], tau=spec["tau"],
                                  generator=torch.Generator().manual_seed(int(seed)))
    denoise_pair = calls.denoise_pair() if pair else None
    run = lambda low=False, scaler=None: sample_pix2pix_zero(  # noqa: E731
        x, sigmas, calls.denoise_one("negative"), calls.denoise_one("positive"), calls.denoise_cfg, lam=xa_guidance,
        sites=sites, map_dtype=map_dtype, callback=interruptible(callback), stats=stats, check_loss=check_loss,
        contrastive=contrastive, form=form, combine=calls.combine, sigma_floor=model_sigma_floor(model),
        denoise_pair=denoise_pair, keep=keep, pair_guidance=not low, noise_form=noise_form_of_model(model),
        scaler=scaler)
    if xa_guidance == 0:
        return run()
    # fast mode: the code form guides both CFG halves in one call (2 rows per image); zeroCon guides them in turn
    rows = 2 if form == "code" and denoise_pair is not None and contrastive is None else 1
    with guided_run(model, extra_args or {}, x, node, rows=rows, stats=stats) as g:
        return run(g.checkpoint, g.scaler)


class Pix2PixZeroSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_Pix2PixZeroSampler",
            display_name="pix2pix-zero Sampler (Z2I)",
            category="Z2I/sampling",
            description=(
                "Edits your inverted image toward the edited prompt (cat -> dog) while keeping its layout and "
                "details in place. Wire SamplerCustom with add_noise off, the inversion's noise and sigmas, "
                "positive = the caption with the edit direction applied, negative = the caption itself, cfg about 5. "
                "Each step a CFG-neutral reference branch (the caption) runs beside the edit, and the edit takes "
                "one gradient step toward the reference's cross-attention maps, keeping the structure. By default "
                "both CFG halves are guided as the authors' code and diffusers do; give the inversion's 'diffusers "
                "(exact)' variant and cfg equal to diffusers' guidance_scale to reproduce diffusers' pipeline. "
                "Reference: pix2pix-zero (Parmar et al. 2023), Alg. 1 and the official code."),
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
                io.Combo.Input("guidance_form", options=list(FORMS), default=next(iter(FORMS)), optional=True,
                               tooltip=FORM_TOOLTIP),
                InversionType.Input("inversion", optional=True, tooltip=INVERSION_TIP),
            ],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip=SAMPLER_TIP)],
            is_experimental=True,
        )

    @classmethod
    def validate_inputs(cls, map_precision=None, guidance_form=None):
        return combo_check(cls, P2PZ, map_precision=map_precision, guidance_form=guidance_form)

    @classmethod
    def execute(cls, xa_guidance, layers, map_precision, guidance_form=next(iter(FORMS)),
                inversion=None) -> io.NodeOutput:
        opts = {"xa_guidance": float(xa_guidance), "layers": layers,
                "map_dtype": torch.float16 if map_precision == "fp16" else torch.float32,
                "form": _form(P2PZ, guidance_form), "inversion": inversion}
        return io.NodeOutput(Z2IKSampler(_p2pz_fn, extra_options=opts))


ZEROCON = "Z2I pix2pix-zeroCon Sampler"


class Pix2PixZeroConSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_Pix2PixZeroConSampler",
            display_name="pix2pix-zeroCon Sampler (Z2I)",
            category="Z2I/sampling",
            description=(
                "Edits your inverted image like the pix2pix-zero sampler and also matches the edit's local "
                "features to the original's, patch by patch, to hold its content in place more firmly. It adds "
                "a PatchNCE contrastive loss between UNet features of the reference and the edit at the same "
                "locations (CUT) to pix2pix-zero's lockstep guidance, L = lambda_c * L_xa + lambda_e * "
                "L_PatchNCE, one latent gradient step of size lambda per step. Wire it like the pix2pix-zero "
                "sampler. Reference: pix2pix-zeroCon (Si et al.), Eq. 14-18."),
            inputs=[
                io.Float.Input("lambda_step", default=0.1, min=0.0, max=10.0, step=0.01,
                               tooltip="lambda of Eq. 18, the latent step size in the paper's units (p2p-zero: "
                                       "0.1; the paper finds smaller better). 0 = plain DDIM."),
                io.Float.Input("lambda_c", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Weight of the cross-attention loss (Eq. 17). 1 keeps pix2pix-zero."),
                io.Float.Input("lambda_e", default=0.5, min=0.0, max=100.0, step=0.05,
                               tooltip="Weight of the PatchNCE loss (Eq. 17). 0 = pix2pix-zero."),
                io.String.Input("feature_layers", default="output",
                                tooltip="Where the contrastive features come from: self-attention outputs of "
                                        "'output' blocks (decoder, as the CDS code; default) or 'input' blocks "
                                        "(encoder, as the paper says), or sites like output.6.0."),
                io.Int.Input("n_patches", default=256, min=1, max=4096,
                             tooltip="Query locations per layer and scale (CUT/CDS: 256)."),
                io.Float.Input("tau", default=0.07, min=0.001, max=10.0, step=0.01,
                               tooltip="Temperature of the InfoNCE logits (CUT: 0.07)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffff,
                             tooltip="Seed of the random patch locations (drawn anew each step)."),
                io.String.Input("layers", default="input,middle,output",
                                tooltip="Cross-attention layers in L_xa (as in the pix2pix-zero sampler)."),
                io.Combo.Input("guidance_form", options=list(FORMS), default=next(iter(FORMS)), optional=True,
                               tooltip=FORM_TOOLTIP),
                InversionType.Input("inversion", optional=True, tooltip=INVERSION_TIP),
            ],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip=SAMPLER_TIP)],
            is_experimental=True,
        )

    @classmethod
    def validate_inputs(cls, guidance_form=None):
        return combo_check(cls, ZEROCON, guidance_form=guidance_form)

    @classmethod
    def execute(cls, lambda_step, lambda_c, lambda_e, feature_layers, n_patches, tau, seed, layers,
                guidance_form=next(iter(FORMS)), inversion=None) -> io.NodeOutput:
        spec = {"lambda_c": float(lambda_c), "lambda_e": float(lambda_e), "feature_layers": feature_layers,
                "n_patches": int(n_patches), "tau": float(tau)}
        return io.NodeOutput(Z2IKSampler(_p2pz_fn, extra_options={
            "xa_guidance": float(lambda_step), "layers": layers, "contrastive": (spec, int(seed)), "node": ZEROCON,
            "form": _form(ZEROCON, guidance_form), "inversion": inversion}))


def _form(node: str, value: str) -> str:
    if value not in FORMS:
        raise Z2IInputError(node, "guidance_form", f"unknown value {value!r}", f"use one of {list(FORMS)}")
    return FORMS[value]


_p2pz_fn.z2i_node = P2PZ                 # named by the size guard (Z2IKSampler.check_size)

NODES = [Pix2PixZeroSampler, Pix2PixZeroConSampler]
