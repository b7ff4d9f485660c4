"""pix2pix-zero editing with cross-attention guidance (Parmar et al., section 3.3, Alg. 1;
shared/design/algorithms.md section 4.2 steps 4-5 and pitfalls 4.6).

Per timestep, two branches advance in lockstep from the same inverted x_T:
- reference: DDIM with the source caption, CFG-neutral (the caption is also the negative prompt in the
  paper's code, so eps_u = eps_c: one conditional evaluation suffices). Its cross-attention maps M_ref of this
  step are captured, used once by the edit branch, and dropped: memory is one step of maps instead of
  every step as in the official code.
- edit: one gradient step on the latent against L_xa = ||M_edit - M_ref||^2 (losses.cross_attention_loss),
  taken through the UNet on the conditional (edited prompt) branch, with the paper's step size lambda_xa in
  VP latent units: x_vp <- x_vp - lambda * grad_{x_vp} L, which in sigma space is
  x <- x - lambda * (1 + sigma^2) * grad_x L (comfyui-internals.md section 2.3). Then the ordinary CFG
  prediction at the updated latent and the DDIM step from it (the code's choice, pitfall 4.2 step 5).
The paper's code keeps the unconditional half's updated latent and mixes CFG branches evaluated at two
latents; here one latent is updated from the conditional branch's maps and fed to both CFG halves.
lambda = 0 skips the reference branch and the gradient: exactly plain DDIM with the edited conditioning.

pix2pix-zeroCon (Si et al., section IV-B, Eq. 14-18) adds a PatchNCE term on UNet token features of the same
two branches: L_t = lambda_c * L_xa + lambda_e * L_PatchNCE (Eq. 17), one gradient step of size lambda (Eq. 18).
The reference features are captured by the same lockstep reference call, so they also live one step only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..attention_patches.controller import AttentionCall, Capture, MapStore
from ..attention_patches.features import FeatureCall
from .ddim import ddim_step
from .losses import cross_attention_loss, patch_nce_loss
from .schedules import append_dims, eps_from_denoised

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


def xa_guidance_step(x: torch.Tensor, sigma, denoise_edit: DenoiseWithCall, reference_maps: dict, step: int,
                     lam: float, sites=None, contrastive: Optional[Contrastive] = None,
                     reference_features: Optional[dict] = None) -> tuple[torch.Tensor, float]:
    """One pix2pix-zero (or zeroCon) gradient step on the latent. Returns (updated x, loss before the step)."""
    store = MapStore(sites=sites, conds=(0,), keep_graph=True, max_steps=1)
    feats = FeatureCall(sites=contrastive.sites, keep_graph=True) if contrastive is not None else None
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        call = AttentionCall(step, [Capture(store)], frozenset(sites) if sites else None)
        if feats is None:
            denoise_edit(xg, sigma, call)
            loss = cross_attention_loss(store.step(step), reference_maps)
        else:
            denoise_edit(xg, sigma, call, feature_call=feats)
            loss = contrastive.lambda_c * cross_attention_loss(store.step(step), reference_maps)
            if contrastive.lambda_e != 0:
                loss = loss + contrastive.lambda_e * patch_nce_loss(
                    reference_features, feats.features, contrastive.n_patches, contrastive.tau, contrastive.scales,
                    contrastive.generator)
        grad, = torch.autograd.grad(loss, xg)
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    x_new = x - lam * append_dims(1 + s * s, x.ndim) * grad.to(x.dtype)
    return x_new.detach(), float(loss.detach())


def sample_pix2pix_zero(x: torch.Tensor, sigmas: torch.Tensor, denoise_ref: DenoiseWithCall,
                        denoise_edit: DenoiseWithCall, denoise_cfg: Denoise, lam: float = 0.1, sites=None,
                        map_dtype: torch.dtype = torch.float32, callback: Optional[Callable[[dict], None]] = None,
                        stats: Optional[dict] = None, check_loss: bool = False,
                        contrastive: Optional[Contrastive] = None) -> torch.Tensor:
    """Implements pix2pix-zero's edit pass (Alg. 1 lines 5-11) from an inverted x_T over descending sigmas.

    denoise_ref(x, sigma, call): D with the source caption only (CFG-neutral); denoise_edit(x, sigma, call): D with
    the edited prompt only; denoise_cfg(x, sigma): the full CFG prediction. `stats` (optional dict) receives the
    per-step losses and the reference store's peak number of steps held; `check_loss` also records the loss after
    each step's update (one more UNet call per step, for tests).
    """
    ref_store = MapStore(sites=sites, conds=(0,), dtype=map_dtype, max_steps=1)
    call_sites = frozenset(sites) if sites else None
    x_ref, x_edit = x, x
    losses, losses_after = [], []
    step_bytes = 0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if lam != 0:
            ref_feats = FeatureCall(sites=contrastive.sites) if contrastive is not None else None
            ref_call = AttentionCall(i, [Capture(ref_store)], call_sites)
            d_ref = denoise_ref(x_ref, sigma, ref_call) if ref_feats is None else \
                denoise_ref(x_ref, sigma, ref_call, feature_call=ref_feats)
            x_edit, loss = xa_guidance_step(x_edit, sigma, denoise_edit, ref_store.step(i), i, lam, sites,
                                            contrastive, ref_feats.features if ref_feats is not None else None)
            losses.append(loss)
            if check_loss:
                probe = MapStore(sites=sites, conds=(0,), max_steps=1)
                denoise_edit(x_edit, sigma, AttentionCall(i, [Capture(probe)], call_sites))
                losses_after.append(float(cross_attention_loss(probe.step(i), ref_store.step(i))))
            step_bytes = max(step_bytes, ref_store.nbytes())
            ref_store.drop(i)
            x_ref = ddim_step(d_ref, eps_from_denoised(x_ref, sigma, d_ref), sigma, sigma_next) \
                if float(sigma_next) > 0 else d_ref
        denoised = denoise_cfg(x_edit, sigma)
        if callback is not None:
            callback({"x": x_edit, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if float(sigma_next) == 0:
            x_edit = denoised
        else:
            x_edit = ddim_step(denoised, eps_from_denoised(x_edit, sigma, denoised), sigma, sigma_next)
    if stats is not None:
        stats.update(losses=losses, losses_after=losses_after, ref_peak_steps=ref_store.peak_steps,
                     ref_step_bytes=step_bytes, steps=len(sigmas) - 1)
    return x_edit
