"""Asyrp on Stable Diffusion: h-space directions (derive, combine, save, load) and the asymmetric SAMPLER."""
from __future__ import annotations

from contextlib import ExitStack

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy_api.latest import io

from ..attention_patches.joint import with_joint_patches
from ..guidance.asyrp import HDirection, interval_index, sample_asyrp, step_scale
from ..guidance.asyrp_train import ADAM, OPTIMIZERS, asyrp_loss, make_trainable, train_direction
from ..guidance.ddim import finish, model_sigma_floor, noise_form_of_model
from ..guidance.hspace import (HSPACE_KEY, HCall, check_file_header, check_file_tensors,
                               hspace_middle_block_after_patch, hspace_output_block_patch)
from ..guidance.inversion import sample_ddim_invert
from ._host import (Z2IKSampler, Z2IInputError, check_inversion, check_latent, check_sampler_inputs, check_save_name,
                    combo_check,
                    downsample_factor, interruptible, listed_file_error, listed_fingerprint, model_signature, read_checked_safetensors, register_model_folder,
                    save_name_error, save_unique, schedule_sigmas, unet_of, is_sd3, paired_trajectory)
from .clip_models import ClipLossModelType, image_decoder, ready
from ._compose import analysis_options, inpainting, own_rng, per_image_conds, rows_of
from ._guided import Helper, guided_run
from ._guided import per_image as per_image_mode
from .sampling import INVERSION_TIP
from .types import InversionType

HDirectionType = io.Custom("Z2I_H_DIRECTION")
H_DIRS = register_model_folder("h_directions", {".safetensors"})
ASYRP, DERIVE, TRAIN = "Z2I Asyrp Sampler", "Z2I h-space Direction From Prompts", "Z2I Train h-space Direction"
SAVE, LOAD = "Z2I Save h-space Direction", "Z2I Load h-space Direction"
UNITS = ["percent", "timestep"]
PER_IMAGE, MEAN = "one direction per image", "mean over the images"
DEFAULT_OPTIMIZER = ADAM            # trains at least as well as SGD + StepLR on the tiny test model


def middle_block_of(model, node: str, input_name: str = "model", flow_ok: bool = False):
    """The diffusion model, checked to have an h-space: a UNet's middle block, or with flow_ok an SD3 MMDiT (its
    image stream after the middle joint block, attention_patches.joint.middle_block)."""
    if flow_ok and is_sd3(model):
        return model.get_model_object("diffusion_model")
    unet = unet_of(model, node, input_name)
    mid = getattr(unet, "middle_block", None)
    if mid is None or len(list(mid.children())) == 0:
        raise Z2IInputError(node, input_name, "this UNet has no middle block, so it has no h-space",
                            "use an SD1.x, SD2.x or SDXL checkpoint")
    return unet


def with_hspace(model_options: dict, call: HCall | None = None, joint_blocks: int = 0) -> dict:
    """A copy of the run's model options with the h-space hook (and, if given, this call's HCall). joint_blocks > 0:
    an MMDiT of that depth, hooked by Z2I's joint-block replace (attention_patches.joint)."""
    mo = dict(model_options)
    if joint_blocks:
        mo = with_joint_patches(mo, joint_blocks)
    to = dict(mo.get("transformer_options", {}))
    patches = dict(to.get("patches", {}))
    if joint_blocks:        # the joint-block replace applies the HCall at the middle joint block
        pass
    elif hasattr(comfy.model_patcher.ModelPatcher, "set_model_middle_block_after_patch"):   # newer hosts
        patches["middle_block_after_patch"] = [*patches.get("middle_block_after_patch", []),
                                               hspace_middle_block_after_patch]
    else:      # 0.3.75: first in the list, so the delta lands before other output-block patches (FreeU) as there
        patches["output_block_patch"] = [hspace_output_block_patch, *patches.get("output_block_patch", [])]
    to["patches"] = patches
    if call is not None:
        to[HSPACE_KEY] = call
    mo["transformer_options"] = to
    return mo


@own_rng
def _asyrp_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, direction=None, scale=1.0,
              edit_until=0.5, boost_from=1.0, unit="percent", stats=None, inversion=None):
    check_sampler_inputs(ASYRP, model, x, inversion, flow_ok=True)
    fam, mine = direction.meta.get("family"), model_signature(model.inner_model.model_patcher).family
    if fam and fam != mine:
        raise Z2IInputError(ASYRP, "direction", f"it was made with a {fam} model and this is a {mine} model",
                            "derive or train the direction with this model")
    extra_args, keep = inpainting(extra_args or {}, inversion, ASYRP)
    net = middle_block_of(model.inner_model.model_patcher, ASYRP, "model (of the sampler node)", flow_ok=True)
    depth = len(getattr(net, "joint_blocks", []))
    want = h_channels(net)
    if want is not None and direction.channels != want:
        raise Z2IInputError(ASYRP, "direction", f"it has {direction.channels} channels, this model's h-space has "
                            f"{want}", "derive or train the direction with this model (or load one made for it)")
    hw = tuple(x.shape[-2:])
    base = model.inner_model.inner_model
    ms = base.model_sampling
    n = len(sigmas) - 1
    to_sigma = lambda t: ms.sigma(torch.tensor(float(t)))  # noqa: E731
    if direction.rows > 1 and direction.rows != x.shape[0]:
        raise Z2IInputError(ASYRP, "direction", f"it holds one direction per image of a batch of {direction.rows}, "
                            f"the latent has {x.shape[0]}", "sample the batch it was derived from, or derive it "
                            f"with images = '{MEAN}'")
    edit_steps = interval_index(sigmas, edit_until, unit, to_sigma)
    boost = interval_index(sigmas, boost_from, unit, to_sigma)
    total = scale * step_scale(direction.meta.get("steps"), n)
    s_in = x.new_ones([x.shape[0]])
    call = HCall(direction=direction, scale=total, timestep=ms.timestep, latent_hw=hw)
    mo = extra_args.get("model_options", {})
    edit_args = {**extra_args, "model_options": with_hspace(mo, call, depth)}
    rows = rows_of(model, extra_args)
    if rows is model or x.shape[0] == 1:
        model_edit = lambda xx, s: model(xx, s * s_in, **edit_args)  # noqa: E731
    else:       # each image alone, with its own row of a per-image direction (guidance.ddim.per_row)
        row_args = [{**extra_args, "model_options": with_hspace(mo, HCall(
            direction=direction.row(i), scale=total, timestep=ms.timestep, seen=call.seen, latent_hw=hw), depth)}
            for i in range(x.shape[0])]
        model_edit = lambda xx, s: torch.cat([model(xx[i:i + 1], s * s_in[i:i + 1], **row_args[i])  # noqa: E731
                                              for i in range(xx.shape[0])])
    model_orig = lambda xx, s: rows(xx, s * s_in, **extra_args)  # noqa: E731
    out = sample_asyrp(model_edit, model_orig, x, sigmas, edit_steps if total != 0 else 0, boost,
                       seed=extra_args.get("seed"), callback=interruptible(callback), keep=keep,
                       form=noise_form_of_model(model))
    if stats is not None:
        stats.update(edit_steps=edit_steps, boost_from=boost, scale=total, deltas=call.seen)
    return finish(out, sigmas, model_sigma_floor(model))   # diffusers' clean latent when the schedule ends at sigma(0)


class AsyrpSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_AsyrpSampler",
            display_name="Asyrp Sampler (Z2I)",
            category="Z2I/sampling",
            description=(
                "Applies an h-space direction (such as 'smiling') to your inverted image: it nudges the UNet's "
                "middle layer during the early steps, then finishes with plain DDIM. It adds a direction delta_h "
                "to the UNet middle-block output (h-space) and uses the edited prediction only in DDIM's x0 term "
                "(asymmetric), for the first part of the schedule; then plain DDIM; then optional eta=1 quality "
                "boosting. Use with SamplerCustom from an inverted latent (add_noise off) or from noise. "
                "Reference: Asyrp (Kwon et al. 2023), Eq. 8-9."),
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
                InversionType.Input("inversion", optional=True, tooltip=INVERSION_TIP),
            ],
            outputs=[io.Sampler.Output(display_name="sampler",
                                       tooltip="The Asyrp sampler, for SamplerCustom's sampler input (with the "
                                               "inversion's noise as latent_image and its sigmas).")],
            is_experimental=True,
        )

    @classmethod
    def validate_inputs(cls, unit=None):
        return combo_check(cls, ASYRP, unit=unit)

    @classmethod
    def execute(cls, direction, scale, unit, edit_until, boost_from, inversion=None) -> io.NodeOutput:
        if unit == "percent" and (edit_until > 1 or boost_from > 1):
            raise Z2IInputError(ASYRP, "edit_until", f"percent boundaries must be 0..1 (got {edit_until}, "
                                f"{boost_from})", "use fractions of the schedule, or switch unit to timestep")
        return io.NodeOutput(Z2IKSampler(_asyrp_fn, extra_options={
            "direction": direction, "scale": float(scale), "edit_until": float(edit_until),
            "boost_from": float(boost_from), "unit": unit, "inversion": inversion}))


@own_rng
def _derive_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, inversion=None, out=None):
    guider = model.inner_model
    base = guider.inner_model
    traj = paired_trajectory(DERIVE, inversion)
    captured: dict = {}
    call = HCall(captured=captured, latent_hw=tuple(x.shape[-2:]))
    depth = len(getattr(base.diffusion_model, "joint_blocks", []))
    mo = with_hspace(analysis_options((extra_args or {}).get("model_options", {}), DERIVE), call, depth)
    cb = interruptible(callback)
    diffs = []

    def per_image(chunks: list, n: int) -> torch.Tensor:        # [n, C, h, w]: every chunk holds n images in order
        c = torch.cat(chunks)
        return c.view(-1, n, *c.shape[1:]).mean(0)

    conds = [guider.conds["positive"], guider.conds["negative"]]
    # batch "per image": each image alone (guidance.ddim.per_row); "batched" (default): the batch in one call
    whole = per_image_conds(model) or x.shape[0] == 1 or not per_image_mode(extra_args or {})
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        xi = traj.latents[traj.index_of_sigma(float(sigma))].to(x)
        parts, denoised = [], []
        for xr in ([xi] if whole else xi.split(1)):
            captured.clear()
            denoised.append(comfy.samplers.calc_cond_batch(base, conds, xr, sigma * xr.new_ones([xr.shape[0]]),
                                                           mo)[0])
            parts.append(per_image(captured[0], xr.shape[0]) - per_image(captured[1], xr.shape[0]))
        diffs.append(torch.cat(parts))
        cb({"x": xi, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": torch.cat(denoised)})
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
                "Makes an h-space edit direction for the Asyrp Sampler from a target prompt, without training: "
                "how the UNet's middle layer changes when the prompt goes from your caption to the target. It is "
                "the mean over the inversion trajectory of the middle-block output with the target prompt minus "
                "that with the source prompt (the caption used to invert). For a batch: one direction per image "
                "(each image is edited as it would be alone), or their mean (one direction to reuse on other "
                "images). Ours, not from the Asyrp paper (Kwon et al. 2023), which trains its directions."),
            inputs=[
                io.Model.Input("model", tooltip="The model the image was inverted with."),
                InversionType.Input("inversion", tooltip="From DDIM Inversion; its prompt is the source."),
                io.Conditioning.Input("target", tooltip="The prompt describing the edit (e.g. 'a smiling face')."),
                io.Conditioning.Input("source", optional=True,
                                      tooltip="Source prompt; default: the inversion's own prompt."),
                io.Combo.Input("images", options=[PER_IMAGE, MEAN], default=PER_IMAGE, optional=True,
                               tooltip="For an inverted batch: one direction per image (the Asyrp sampler then "
                                       "needs that same batch) or the mean over the images (one direction for "
                                       "any image). Same result for one image."),
            ],
            outputs=[HDirectionType.Output(display_name="direction",
                                           tooltip="The h-space direction, for the Asyrp Sampler, Combine or Save.")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, model, inversion, target, source=None, images=PER_IMAGE) -> io.NodeOutput:
        middle_block_of(model, DERIVE, flow_ok=True)
        check_inversion(DERIVE, inversion, model)
        if images not in (PER_IMAGE, MEAN):
            raise Z2IInputError(DERIVE, "images", f"unknown choice {images!r}", f"pick '{PER_IMAGE}' or '{MEAN}'")
        source = source if source is not None else inversion.positive
        sig = inversion.sigmas
        sigmas = torch.cat([sig[sig > 0], sig.new_zeros(1)])
        traj = paired_trajectory(DERIVE, inversion)
        latent = model.model.process_latent_out(traj.latents[-1]).cpu()
        out: list = []
        sampler = Z2IKSampler(_derive_fn, extra_options={"inversion": inversion, "out": out})
        comfy.sample.sample_custom(model, torch.zeros_like(latent), 2.0, sampler, sigmas, target, source, latent,
                                   callback=latent_preview.prepare_callback(model, len(sigmas) - 1),
                                   disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        delta = out[0].cpu()
        if images == MEAN:
            delta = delta.mean(0, keepdim=True)
        meta = {"family": inversion.model.family, "channels": int(delta.shape[1]), "mode": "derived",
                "spatial": list(delta.shape[-2:]), "steps": None, "images": int(out[0].shape[0]),
                "per_image": images == PER_IMAGE and delta.shape[0] > 1}
        return io.NodeOutput(HDirection(delta, meta))


@own_rng
def _train_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, job=None):
    """Runs inside ComfyUI's sampling (so conds, LoRA and other patches apply): invert the images along the
    training schedule, then Alg. 2 over the editing interval. x: the clean latents; returns x unchanged."""
    extra_args = extra_args or {}
    base = model.inner_model.inner_model
    ms = base.model_sampling
    with torch.inference_mode(False), torch.no_grad():      # the schedule ends at 0: flipped, it starts there
        x_T = sample_ddim_invert(model, x.clone(), sigmas.flip(0), extra_args=extra_args, callback=interruptible(None),
                                 sigma_floor=float(ms.sigma_min))
    edit_steps = job["edit_steps"]
    h_shape = _h_shape(base, x)
    with torch.inference_mode(False):          # on the model's device (fp32 parameters: the optimiser's master copy)
        trainable, params = make_trainable(job["kind"], h_shape[1], h_shape[-2:], job["seed"], job["hidden"],
                                           device=x.device)
    call = HCall(direction=trainable, scale=1.0, timestep=ms.timestep, keep_seen=False)
    edit_args = {**extra_args, "model_options": with_hspace(extra_args.get("model_options", {}), call)}
    plain_args = {**extra_args, "model_options": with_hspace(extra_args.get("model_options", {}))}
    enc, vae = job["clip"], job["vae"]

    def denoise(xx, sigma, edited):
        return model(xx, sigma * xx.new_ones([xx.shape[0]]), **(edit_args if edited else plain_args))

    def progress(info):     # Cancel, the progress bar and a preview of the edited x0 after every optimiser step
        comfy.model_management.throw_exception_if_processing_interrupted()
        job["preview"](info["done"] - 1, info["x0_edit"], info["x0_edit"], info["total"])

    helpers = [Helper(vae.patcher, vae.first_stage_model), Helper(getattr(enc, "patcher", None), enc.model)]
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        run = stack.enter_context(guided_run(model, extra_args, x[:1], TRAIN, rows=1, helpers=helpers,
                                                  cfg_call=True))
        decode = image_decoder(vae, base, TRAIN, load=False)
        stack.enter_context(torch.enable_grad())
        text_dir = enc.text_direction(job["source"], job["target"])

        def loss_fn(x0_edit, x0_src):
            with torch.no_grad():
                img_src = decode(x0_src)
            return asyrp_loss(decode(x0_edit), img_src, enc, text_dir, job["lambda_clip"], job["lambda_recon"])

        starts = [x_T[j:j + 1].clone() for j in range(x_T.shape[0])]
        history = train_direction(denoise, starts, sigmas, edit_steps, loss_fn, params, job["iterations"], job["lr"],
                                  optimizer=job["optimizer"], callback=progress, scaler=run.scaler)
    job["out"] = (trainable, history, edit_steps, h_shape)
    return x


def h_channels(net):
    """Channels of a diffusion model's h-space: a UNet's middle-block output, an MMDiT's image stream; None if unknown."""
    if hasattr(net, "joint_blocks"):
        qkv = getattr(getattr(getattr(net.joint_blocks[0], "x_block", None), "attn", None), "qkv", None)
        return int(qkv.in_features) if qkv is not None else None
    ch = None
    for m in net.middle_block.modules():
        if isinstance(m, torch.nn.Conv2d):
            ch = m.out_channels
    return ch


def _h_shape(base, x) -> tuple:
    """Shape of the middle-block output for latents like x: channels of the middle block, size / 2^downsamples."""
    unet = base.diffusion_model
    f = downsample_factor(unet)
    ch = None
    for m in unet.middle_block.modules():
        if isinstance(m, torch.nn.Conv2d):
            ch = m.out_channels
    return (1, ch, x.shape[-2] // f, x.shape[-1] // f)


class HDirectionTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_HDirectionTrain",
            display_name="Train h-space Direction (Z2I)",
            category="Z2I/hspace",
            description=(
                "Trains an h-space edit direction on your images, so that the Asyrp Sampler moves a picture from "
                "source_text to target_text (e.g. a face -> a smiling face). Each image is DDIM-inverted, then "
                "over the editing interval delta_h is optimised so that the decoded x0 moves along the CLIP "
                "text direction source -> target (directional CLIP loss, open_clip) while an L1 term keeps it "
                "close to the unedited x0. Either the paper's implicit function f_t or one global delta_h. "
                "Seeded, interruptible, with progress. Slow: every step backpropagates through the UNet decoder "
                "half, the VAE decoder and CLIP. Reference: Asyrp (Kwon et al. 2023), Alg. 2, Eq. 7, App. E."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.x/SD2.x/SDXL model (LoRA and other patches apply)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE: the loss sees decoded x0 images."),
                ClipLossModelType.Input("clip_loss_model", tooltip="From Load open_clip for CLIP Losses."),
                io.Latent.Input("latent", tooltip="The training images, VAE-encoded (a batch: each image is one "
                                                  "training sample; the paper uses 100-1000)."),
                io.Conditioning.Input("positive", tooltip="Prompt for inversion and sampling (empty or a neutral "
                                                          "caption; no CFG, as Asyrp is text-free)."),
                io.String.Input("source_text", default="a photo of a face",
                                tooltip="CLIP text for what the images show (y_src)."),
                io.String.Input("target_text", default="a photo of a smiling face",
                                tooltip="CLIP text for the edit (y_tgt)."),
                io.Combo.Input("kind", options=["implicit", "global"], default="implicit",
                               tooltip="implicit: f_t(h_t), two 1x1 convs with the timestep (the paper's default); "
                                       "global: one delta_h for every timestep (cheaper, slightly weaker)."),
                io.Int.Input("steps", default=40, min=2, max=1000,
                             tooltip="S_train: DDIM steps of inversion and training (paper: 40). The sampler "
                                     "rescales the direction by S_train/S_gen."),
                io.Float.Input("edit_until", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="Editing interval as a fraction of the steps from pure noise (about "
                                       "t_edit = 500 of 1000)."),
                io.Int.Input("iterations", default=10, min=1, max=10000,
                             tooltip="Passes over the images (the paper: 1 epoch over 1000 images)."),
                io.Float.Input("lr", default=-1.0, min=-1.0, max=10.0, step=0.001,
                               tooltip="Learning rate of the chosen optimizer (see 'optimizer'); -1 = its "
                                       "reference value. SGD + StepLR: the starting lr (reference 0.5; the schedule "
                                       "then gives 0.5, 0.5, 0.5, 0.05, ... per iteration). Adam: constant (0.05)."),
                io.Float.Input("lambda_clip", default=0.8, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the directional CLIP loss (Table 3: 0.5-2, mostly 0.8)."),
                io.Float.Input("lambda_recon", default=-1.0, min=-1.0, max=100.0, step=0.1,
                               tooltip="Weight of the L1 term (measured on images in [-1, 1], as the official "
                                       "code); -1 = the paper's rule, 3 x CLIP similarity of the two texts."),
                io.Int.Input("hidden", default=512, min=8, max=4096,
                             tooltip="Channels of f_t's hidden layer (App. E: 512). Ignored for global."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seeds the initial direction (training is otherwise deterministic)."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default=DEFAULT_OPTIMIZER, optional=True,
                               tooltip="Both step once per timestep of the editing interval, as the authors' "
                                       "code. 'SGD + StepLR (official code)': SGD lr 0.5, times 0.1 after every 3 "
                                       "iterations (kwonminki/Asyrp_official, tuned for its pixel models). "
                                       "'Adam' (ours, default): Adam lr 0.05, constant, insensitive to the "
                                       "gradient scale."),
            ],
            outputs=[HDirectionType.Output(display_name="direction",
                                           tooltip="The trained h-space direction, for the Asyrp Sampler (save it "
                                                   "with Save h-space Direction: training is slow)."),
                     io.String.Output(display_name="report",
                                      tooltip="The loss per iteration (total, CLIP and L1 parts, learning rate), "
                                              "to check that training went down.")],
            is_experimental=True,
        )

    @classmethod
    def validate_inputs(cls, kind=None, optimizer=None):
        return combo_check(cls, TRAIN, kind=kind, optimizer=optimizer)

    @classmethod
    def execute(cls, model, vae, clip_loss_model, latent, positive, source_text, target_text, kind, steps,
                edit_until, iterations, lr, lambda_clip, lambda_recon, hidden, seed,
                optimizer=DEFAULT_OPTIMIZER) -> io.NodeOutput:
        middle_block_of(model, TRAIN)
        samples = latent["samples"]
        check_latent(model, samples, TRAIN)
        if not target_text.strip() or target_text.strip() == source_text.strip():
            raise Z2IInputError(TRAIN, "target_text", "must differ from source_text", "describe the edit, e.g. "
                                "'a photo of a smiling face'")
        if lambda_recon < 0:
            ready(clip_loss_model)
            with torch.inference_mode(False):
                t = clip_loss_model.encode_text([source_text, target_text])
            lambda_recon = 3.0 * float((t[0] * t[1]).sum())
        if optimizer not in OPTIMIZERS:
            raise Z2IInputError(TRAIN, "optimizer", f"unknown optimizer {optimizer!r}",
                                f"pick one of {list(OPTIMIZERS)}")
        lr = OPTIMIZERS[optimizer]["lr"] if lr < 0 else float(lr)
        job = {"kind": kind, "seed": int(seed), "hidden": int(hidden), "edit_until": float(edit_until),
               "iterations": int(iterations), "lr": lr, "optimizer": optimizer, "lambda_clip": float(lambda_clip),
               "lambda_recon": float(lambda_recon), "source": source_text, "target": target_text,
               "clip": clip_loss_model, "vae": vae}
        sigmas = schedule_sigmas(model, "ddim_uniform", int(steps))
        job["edit_steps"] = interval_index(sigmas, float(edit_until), "percent")
        if job["edit_steps"] < 1:
            raise Z2IInputError(TRAIN, "edit_until", f"{edit_until} of {steps} steps is no step at all",
                                "raise it (the paper edits roughly the first half: 0.5)")
        job["preview"] = latent_preview.prepare_callback(model, int(iterations) * samples.shape[0] * job["edit_steps"])
        sampler = Z2IKSampler(_train_fn, extra_options={"job": job})
        comfy.sample.sample_custom(model, torch.zeros_like(samples), 1.0, sampler, sigmas, positive, positive,
                                   samples, disable_pbar=True)
        trainable, history, edit_steps, h_shape = job["out"]
        meta = {"family": model_signature(model).family, "channels": int(h_shape[1]),
                "mode": f"trained-{kind}", "spatial": list(h_shape[-2:]), "steps": int(steps),
                "edit_steps": edit_steps, "source": source_text, "target": target_text, "lr": lr,
                "optimizer": optimizer,
                "lambda_clip": float(lambda_clip), "lambda_recon": float(lambda_recon), "iterations": int(iterations),
                "images": int(samples.shape[0]), "seed": int(seed), "clip_model": clip_loss_model.name,
                "history": history}
        if kind == "global":
            direction = HDirection(trainable.delta.detach().clone().cpu(), meta)
        else:
            f = trainable.implicit[0][1].eval().requires_grad_(False).cpu()
            direction = HDirection(None, meta, ((1.0, f),))
        report = "\n".join(f"iteration {i + 1}: loss {h['loss']:.4f} (clip {h['clip']:.4f}, recon {h['recon']:.4f}, "
                            f"lr {h['lr']:.4g})" for i, h in enumerate(history))
        return io.NodeOutput(direction, report)


class HDirectionCombine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_HDirectionCombine",
            display_name="Combine h-space Directions (Z2I)",
            category="Z2I/hspace",
            description="Mixes two h-space directions with weights, e.g. smiling + glasses, or scales or "
                        "reverses one (a negative coefficient). Computes a * coef_a + b * coef_b: Asyrp directions "
                        "are linear and add up (Kwon et al. 2023, section 5.2).",
            inputs=[
                HDirectionType.Input("a", tooltip="First direction."),
                io.Float.Input("coef_a", default=1.0, min=-20.0, max=20.0, step=0.05, tooltip="Its coefficient."),
                HDirectionType.Input("b", optional=True, tooltip="Second direction (optional)."),
                io.Float.Input("coef_b", default=1.0, min=-20.0, max=20.0, step=0.05, optional=True,
                               tooltip="Its coefficient."),
            ],
            outputs=[HDirectionType.Output(display_name="direction",
                                           tooltip="The combined direction, for the Asyrp Sampler or Save.")],
        )

    @classmethod
    def execute(cls, a, coef_a, b=None, coef_b=1.0) -> io.NodeOutput:
        out = a.scaled(coef_a)
        if b is not None:
            if b.channels != a.channels:
                raise Z2IInputError("Z2I Combine h-space Directions", "b", f"{b.channels} channels vs {a.channels}",
                                    "combine directions made with the same model family")
            if min(a.rows, b.rows) > 1 and a.rows != b.rows:
                raise Z2IInputError("Z2I Combine h-space Directions", "b", f"per-image directions of batches of "
                                    f"{b.rows} and {a.rows} images", "derive both from the same batch, or with "
                                    f"images = '{MEAN}'")
            out = out + b.scaled(coef_b)
        return io.NodeOutput(out)


class SaveHDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_SaveHDirection",
            display_name="Save h-space Direction (Z2I)",
            category="Z2I/hspace",
            description=f"Saves an h-space direction to a file, so you can reuse it (a trained one above all) "
                        f"without deriving or training it again. Writes models/{H_DIRS} (safetensors + metadata; "
                        "never overwrites).",
            inputs=[HDirectionType.Input("direction", tooltip="The direction to save."),
                    io.String.Input("filename", default="smile",
                                    tooltip=f"Name inside models/{H_DIRS} (folders and '..' are dropped: only the "
                                            "last part is used; at most 255 characters, no NUL byte).")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename=None):
        err = None if filename is None else save_name_error(filename, SAVE)
        return True if err is None else str(err)

    @classmethod
    def execute(cls, direction, filename) -> io.NodeOutput:
        check_save_name(filename, SAVE)
        return io.NodeOutput(ui={"text": [save_unique(H_DIRS, filename, *direction.to_safetensors())]})


class LoadHDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Z2I_LoadHDirection",
            display_name="Load h-space Direction (Z2I)",
            category="Z2I/hspace",
            description=f"Loads an h-space direction you saved earlier, ready for the Asyrp Sampler or Combine. "
                        f"Reads models/{H_DIRS} (safetensors, no pickle).",
            inputs=[io.Combo.Input("name", options=folder_paths.get_filename_list(H_DIRS),
                                   tooltip=f"A file in models/{H_DIRS}.")],
            outputs=[HDirectionType.Output(display_name="direction",
                                           tooltip="The saved direction, for the Asyrp Sampler or Combine.")],
        )

    @classmethod
    def validate_inputs(cls, name=None):
        err = None if name is None else listed_file_error(H_DIRS, name, LOAD, "name", _load_fix())
        return True if err is None else str(err)

    @classmethod
    def fingerprint_inputs(cls, name):
        return listed_fingerprint(H_DIRS, name)

    @classmethod
    def execute(cls, name) -> io.NodeOutput:
        # the header is checked (format, shapes, implicit configs within bounds) before any tensor is read or any
        # layer built: a file declaring huge layers is refused, not allocated
        tensors, metadata = read_checked_safetensors(H_DIRS, name, LOAD, _load_fix(), check_file_header,
                                                     check_file_tensors)
        try:
            return io.NodeOutput(HDirection.from_safetensors(tensors, metadata))
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise Z2IInputError(LOAD, "name", f"'{name}': {(str(e).splitlines() or [type(e).__name__])[0][:200]}",
                                _load_fix()) from None


def _load_fix() -> str:
    return (f"pick a file written by Save h-space Direction (or save one again) in "
            f"{folder_paths.get_folder_paths(H_DIRS)[0]}")


_asyrp_fn.z2i_node = ASYRP                 # named by the size guard (Z2IKSampler.check_size)
_derive_fn.z2i_node = DERIVE                 # named by the size guard (Z2IKSampler.check_size)
_derive_fn.z2i_input = "inversion"
_train_fn.z2i_node = TRAIN                 # named by the size guard (Z2IKSampler.check_size)
_train_fn.z2i_input = "latent"

NODES = [AsyrpSampler, HDirectionFromPrompts, HDirectionTrain, HDirectionCombine, SaveHDirection, LoadHDirection]
