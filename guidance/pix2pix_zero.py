"""pix2pix-zero editing with cross-attention guidance (Parmar et al., section 3.3, Alg. 1;
shared/design/algorithms.md section 4.2 steps 4-5 and pitfalls 4.6; reference-parity.md sections 1-2).

Per timestep, a reference branch and the edit advance in lockstep from the same inverted x_T:
- reference: DDIM with the source caption, CFG-neutral (the caption is also the negative prompt in the
  paper's code, so eps_u = eps_c: one conditional evaluation suffices). Its cross-attention maps M_ref of this
  step are captured, used by the edit, and dropped: one step of maps instead of every step as in the code.
- edit, two forms (`form`):
  "code" (default; what the official code and diffusers' StableDiffusionPix2PixZeroPipeline do, and so what
  the paper's figures show): both CFG halves are guided from the same latent x with
  L_b = sum_layers (1/2) mean_heads ||M_b(x) - M_ref||_F^2 for b = u (the negative prompt, i.e. the caption:
  its own drift from the reference) and b = c (the edited prompt) -- the code averages over 2 x heads rows --
  each moved by one SGD step of size lambda in VP units: x_b = x - lambda (1 + sigma^2) grad_x L_b
  (comfyui-internals.md section 2.3). eps is re-evaluated at the two moved latents, mixed by CFG in eps space
  (`combine`), and the DDIM step is taken from x_u.
  "single latent" (Alg. 1's box, ours to keep): one latent moved by the edited branch's loss (mean over heads,
  not halved, so at the same lambda its step is twice the code's per-branch step), then the ordinary CFG
  prediction at the moved latent. One backward pass per step instead of two.
Losses are summed over the batch (per image: mean over heads), so an image gets the same step in a batch as
alone. lambda = 0 skips the reference branch and the gradients: exactly plain DDIM with the edited conditioning.

pix2pix-zeroCon (Si et al., section IV-B, Eq. 14-18) adds a PatchNCE term on UNet token features of the same
branches: L_t = lambda_c * L_xa + lambda_e * L_PatchNCE (Eq. 17), one gradient step of size lambda (Eq. 18).
The reference features are captured by the same lockstep reference call, so they also live one step only; in
the code form both halves use the same patch locations (as one batched pass would) and the 1/2 of the row mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..attention_patches.controller import AttentionCall, Capture, MapStore
from ..attention_patches.features import FeatureCall
from .autograd import LossScaler
from .ddim import ddim_step, finish, schedule_levels
from .losses import cross_attention_loss, patch_nce_loss
from .schedules import VE, NoiseForm, append_dims

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DenoiseWithCall = Callable[[torch.Tensor, torch.Tensor, AttentionCall], torch.Tensor]


@dataclass
class Contrastive:
    """pix2pix-zeroCon's PatchNCE term: weights, feature sites, patches, temperature, scales, RNG."""

    lambda_c: float = 1.0
    lambda_e: float = 0.5
    sites: Optional[frozenset] = None
    n_patches: int = 256
    tau: float = 0.07
    scales: tuple = (1, 2)
    generator: Optional[torch.Generator] = None


FORMS = ("code", "single")


def xa_guidance_step(x: torch.Tensor, sigma, denoise_edit: DenoiseWithCall, reference_maps: dict, step: int,
                     lam: float, sites=None, contrastive: Optional[Contrastive] = None,
                     reference_features: Optional[dict] = None, weight: float = 1.0,
                     patch_ids: Optional[dict] = None, noise_form: NoiseForm = VE,
                     scaler: Optional[LossScaler] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pix2pix-zero (or zeroCon) gradient step on the latent against the loss of `denoise_edit`'s maps
    (times `weight`). Returns (updated x, loss before the step as a detached tensor). The step is lambda in the
    papers' VP units (vp_step_scale). `scaler`: the run's guidance.autograd.LossScaler (half-precision UNets)."""
    scaler = scaler or LossScaler(False)
    store = MapStore(sites=sites, conds=(0,), keep_graph=True, max_steps=1)
    feats = FeatureCall(sites=contrastive.sites, keep_graph=True, latent_hw=tuple(x.shape[-2:])) \
        if contrastive is not None else None
    with torch.inference_mode(False), torch.enable_grad():
        try:
            xg = x.detach().clone().requires_grad_(True)
            call = AttentionCall(step, [Capture(store)], frozenset(sites) if sites else None, tuple(x.shape[-2:]))
            if feats is None:
                denoise_edit(xg, sigma, call)
                loss = cross_attention_loss(store.step(step), reference_maps)
            else:
                denoise_edit(xg, sigma, call, feature_call=feats)
                loss = contrastive.lambda_c * cross_attention_loss(store.step(step), reference_maps)
                if contrastive.lambda_e != 0:
                    loss = loss + contrastive.lambda_e * patch_nce_loss(
                        reference_features, feats.features, contrastive.n_patches, contrastive.tau,
                        contrastive.scales, contrastive.generator, ids=patch_ids)
            if weight != 1.0:
                loss = loss * weight
            grad = scaler.grad(loss, xg)
        finally:
            store.clear()                      # the maps and features hold the graph: free it now (or on an error)
            if feats is not None:
                feats.features.clear()
    x_new = x - lam * vp_step_scale(x, sigma, noise_form) * grad.to(x.dtype)
    return x_new.detach(), loss.detach()


def vp_step_scale(x: torch.Tensor, sigma, noise_form: NoiseForm = VE) -> torch.Tensor:
    """n(sigma)^2 with n the state's scale against the unit-variance VP latent z = x / n (schedules.NoiseForm.norm):
    a step of lambda on z against grad_z L = n grad_x L is a step of lambda n^2 grad_x L on x. VE: 1 + sigma^2
    (comfyui-internals.md section 2.3); FLOW: (1 - sigma)^2 + sigma^2."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    a = noise_form.a(s)
    return append_dims(a * a + s * s, x.ndim)        # VE: a = 1, the same arithmetic as 1 + sigma^2


def xa_guidance_pair(x: torch.Tensor, sigma, denoise_pair, reference_maps: dict, step: int, lam: float,
                     sites=None, noise_form: NoiseForm = VE,
                     scaler: Optional[LossScaler] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The code form's two guided halves in one batched UNet call (what the official code's batched pass does):
    x_u and x_c start at x, the caption half (cond index 0) is pulled toward its own reference maps, the edited
    half (cond index 1) toward the same maps, each by (1/2) of its loss; one backward pass gives both gradients
    (the rows do not interact). Returns (x_u, x_c, the edited half's loss before the step, detached)."""
    scaler = scaler or LossScaler(False)
    store = MapStore(sites=sites, conds=(0, 1), keep_graph=True, max_steps=1)
    with torch.inference_mode(False), torch.enable_grad():
        try:
            xu = x.detach().clone().requires_grad_(True)
            xc = x.detach().clone().requires_grad_(True)
            denoise_pair(xu, xc, sigma, AttentionCall(step, [Capture(store)], frozenset(sites) if sites else None,
                                                      tuple(x.shape[-2:])))
            maps = store.step(step)
            halves = [cross_attention_loss({(site, 0): m for (site, c), m in maps.items() if c == b},
                                           reference_maps) for b in (0, 1)]
            loss = 0.5 * (halves[0] + halves[1])
            gu, gc = scaler.grad(loss, [xu, xc])
        finally:
            store.clear()                      # the maps hold the graph: free it now (or on an error)
    s = vp_step_scale(x, sigma, noise_form)
    return ((x - lam * s * gu.to(x.dtype)).detach(), (x - lam * s * gc.to(x.dtype)).detach(),
            0.5 * halves[1].detach())


def sample_pix2pix_zero(x: torch.Tensor, sigmas: torch.Tensor, denoise_ref: DenoiseWithCall,
                        denoise_edit: DenoiseWithCall, denoise_cfg: Denoise, lam: float = 0.1, sites=None,
                        map_dtype: torch.dtype = torch.float32, callback: Optional[Callable[[dict], None]] = None,
                        stats: Optional[dict] = None, check_loss: bool = False,
                        contrastive: Optional[Contrastive] = None, form: str = "code",
                        combine: Optional[Callable] = None, sigma_floor: Optional[float] = None,
                        denoise_pair: Optional[Callable] = None, keep: Optional[Callable] = None,
                        pair_guidance: bool = True, noise_form: NoiseForm = VE,
                        scaler: Optional[LossScaler] = None) -> torch.Tensor:
    """Implements pix2pix-zero's edit pass from an inverted x_T over descending sigmas.

    denoise_ref(x, sigma, call): D with the source caption only (CFG-neutral; in the code form also the guided
    uncond half); denoise_edit(x, sigma, call): D with the edited prompt only; denoise_cfg(x, sigma): the full CFG
    prediction (single form and lambda = 0); combine(x_u, d_u, x_c, d_c, sigma) -> the CFG prediction at x_u of
    eps_u = (x_u - d_u)/sigma and eps_c = (x_c - d_c)/sigma mixed in eps space (code form). `stats` (optional
    dict) receives the per-step losses and the reference store's peak number of steps held; `check_loss` also
    records the loss after each step's update (one more UNet call per step, for tests). denoise_pair(x_u, x_c,
    sigma, call) -> (d_u, d_c) (optional): the caption prediction at x_u and the edited one at x_c in one batched
    UNet call (cond indices 0 and 1 for `call`); the code form then guides both halves in one pass and
    re-evaluates them in one call (same result, fewer calls; without it, one call per half). pair_guidance=False
    keeps the paired re-evaluation but guides the halves one after the other (the same gradients; one half's
    autograd graph alive at a time: the samplers choose it on large latents). A schedule ending at the
    model's sigma(0) (`sigma_floor`) returns diffusers' clean latent (guidance.ddim.finish). `keep`
    (guidance.ddim.keep_outside): inpainting, applied to the edit and the reference after every step.
    noise_form: the model's schedules.NoiseForm (VE for the UNet families, FLOW for SD3); the DDIM steps, eps and
    the gradient step's VP units follow it. `combine` keeps each branch's own model output at the other latent
    (eps on VE; on FLOW D + (x_u - x_c) keeps the velocity, finite at pure noise).
    """
    nf = noise_form
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "code" and lam != 0 and combine is None:
        raise ValueError("the code form needs `combine` (eps-space CFG of two latents)")
    ref_store = MapStore(sites=sites, conds=(0,), dtype=map_dtype, max_steps=1)
    try:
        return _pix2pix_zero_loop(x, sigmas, denoise_ref, denoise_edit, denoise_cfg, lam, sites, callback, stats,
                                  check_loss, contrastive, form, combine, sigma_floor, denoise_pair, keep,
                                  pair_guidance, nf, scaler or LossScaler(False), ref_store)
    finally:
        ref_store.clear()                      # every exit: success, an error, an OOM, an interrupt


def _pix2pix_zero_loop(x, sigmas, denoise_ref, denoise_edit, denoise_cfg, lam, sites, callback, stats, check_loss,
                       contrastive, form, combine, sigma_floor, denoise_pair, keep, pair_guidance, nf, scaler,
                       ref_store):
    call_sites = frozenset(sites) if sites else None
    x_ref, x_edit = x, x
    losses, losses_after = [], []
    step_bytes, paired_steps = 0, 0
    levels = schedule_levels(sigmas)                   # one read of the schedule, not one per step
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        last = levels[i + 1] == 0
        if lam != 0:
            ref_feats = FeatureCall(sites=contrastive.sites, latent_hw=tuple(x.shape[-2:])) \
                if contrastive is not None else None
            ref_call = AttentionCall(i, [Capture(ref_store)], call_sites, tuple(x.shape[-2:]))
            d_ref = denoise_ref(x_ref, sigma, ref_call) if ref_feats is None else \
                denoise_ref(x_ref, sigma, ref_call, feature_call=ref_feats)
            ref_maps, feats = ref_store.step(i), (ref_feats.features if ref_feats is not None else None)
            if form == "single":
                x_edit, loss = xa_guidance_step(x_edit, sigma, denoise_edit, ref_maps, i, lam, sites, contrastive,
                                                feats, noise_form=nf, scaler=scaler)
                denoised = denoise_cfg(x_edit, sigma)
            else:
                ids = {} if contrastive is not None else None          # one set of patch locations per step
                paired = denoise_pair is not None and pair_guidance and contrastive is None and x_edit is not x_ref
                if paired:
                    paired_steps += 1
                    x_u, x_c, loss = xa_guidance_pair(x_edit, sigma, denoise_pair, ref_maps, i, lam, sites, nf,
                                                      scaler)
                    d_u, d_c = denoise_pair(x_u, x_c, sigma, None)
                elif x_edit is x_ref and contrastive is None:
                    # the first step: the caption half sits on the reference itself, its maps are M_ref, its loss
                    # and gradient are zero, so x_u = x and eps_u is the reference's (saves a forward + backward
                    # and a forward; the official code computes the zero anyway)
                    x_u, d_u = x_edit, d_ref
                else:
                    x_u, _ = xa_guidance_step(x_edit, sigma, denoise_ref, ref_maps, i, lam, sites, contrastive,
                                              feats, weight=0.5, patch_ids=ids, noise_form=nf, scaler=scaler)
                    d_u = None
                if not paired:
                    x_c, loss = xa_guidance_step(x_edit, sigma, denoise_edit, ref_maps, i, lam, sites, contrastive,
                                                 feats, weight=0.5, patch_ids=ids, noise_form=nf, scaler=scaler)
                    if d_u is None and denoise_pair is not None:
                        d_u, d_c = denoise_pair(x_u, x_c, sigma, None)
                    else:
                        if d_u is None:
                            d_u = denoise_ref(x_u, sigma, None)
                        d_c = denoise_edit(x_c, sigma, None)
                denoised = combine(x_u, d_u, x_c, d_c, sigma)
                x_edit = x_u
            losses.append(loss)
            if check_loss:
                probe = MapStore(sites=sites, conds=(0,), max_steps=1)
                x_probe = x_c if form == "code" else x_edit
                denoise_edit(x_probe, sigma, AttentionCall(i, [Capture(probe)], call_sites, tuple(x.shape[-2:])))
                after = cross_attention_loss(probe.step(i), ref_maps)
                losses_after.append(float(after) * (0.5 if form == "code" else 1.0))
            if stats is not None:
                step_bytes = max(step_bytes, ref_store.nbytes())
            ref_store.drop(i)
            x_ref = ddim_step(d_ref, nf.eps(x_ref, sigma, d_ref), sigma, sigma_next, form=nf) \
                if not last else d_ref
            if keep is not None:
                x_ref = keep(x_ref, sigma_next)
        else:
            denoised = denoise_cfg(x_edit, sigma)
        if callback is not None:
            callback({"x": x_edit, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if last:
            x_edit = denoised
        else:
            x_edit = ddim_step(denoised, nf.eps(x_edit, sigma, denoised), sigma, sigma_next, form=nf)
        if keep is not None:
            x_edit = keep(x_edit, sigma_next)
    if stats is not None:
        stats.update(losses=[float(v) for v in losses], loss_scale=scaler.scale, backward_passes=scaler.passes, losses_after=losses_after, ref_peak_steps=ref_store.peak_steps,
                     ref_step_bytes=step_bytes, steps=len(sigmas) - 1, form=form,
                     paired_steps=paired_steps)
    return finish(x_edit, sigmas, sigma_floor)
