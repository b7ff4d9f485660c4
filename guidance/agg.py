"""AGG, asymmetric gradient guidance, latent-diffusion variant (Kwon & Ye, "Improving Diffusion-based Image
Translation using Asymmetric Gradient Guidance", section 4, App. A-B, Alg. 1; shared/design/algorithms.md
section 1.3, algorithms-review.md A.1, A.2, #5, #10-#12, reference-parity.md section 4).

Per guided step at level sigma, with D = x0_hat(x_t) under the target prompt and x0* the x0 estimate the
inversion saved at the same level:
1. MCG: g = grad_{x_t^VP} l(x0_hat(x_t)), l = lambda_reg * mean|x0_hat - x0*| (review #5), backpropagated
   through the UNet; eps_tilde = eps + s_t g with s_t = sqrt(1 - a_t) (the descent sign, review A.1; the printed
   Eq. 14/18 have it reversed). In sigma space x0_hat(eps_tilde) = D - sigma^2 grad_x l.
2. DDS: x0' = x0_bar + argmin_Delta l(x0_bar + Delta), AdamW (lr 0.01, 10 steps), no UNet backprop.
3. Optional mask schedule (Eq. 19): x0' everywhere for the first steps, (1 - M) x0' + M D (M = object) until
   a second boundary, then no guidance.
4. Asymmetric update (Eq. 13/17): x_{t-1} from x0' in the x0 term and the *original* eps in the direction
   term, with optional eta (the paper's sigma_t).
lambda_reg = 0 is exactly DDIM.

Steps 1-4 follow the authors' code (submissionanon18/AGG). Ours: the L1 is a mean over each image's elements
summed over the batch (the code is batch 1), so an image's guidance does not depend on the batch size; the top
level is unguided (no saved x0* there; the code adds an extra evaluation so its first reverse step is guided);
one eta for every step (the paper: 0.8); DDS returns x0 + Delta after all its updates (the code returns the one
from before its last update: 9 effective updates of 10).

Optional style loss (App. B Eq. 21-22): any extra differentiable loss of x0 (`extra_loss`, e.g. the CLIP loss
on the VAE-decoded x0 in guidance/clip_loss.py) is added to the L1 term in both the MCG gradient and the DDS
refinement: l_total = lambda_sty l_sty(x0) + lambda_reg l_reg (Eq. 15).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .autograd import LossScaler
from .ddim import ddim_step
from .schedules import VE, NoiseForm, append_dims


def l1_regularizer(x0: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
    """lambda_reg * per-image mean |x0 - x0*|, summed over the batch (rows independent of the batch size)."""
    return weight * (x0 - target).abs().flatten(1).mean(1).sum()


def total_loss(x0: torch.Tensor, target: Optional[torch.Tensor], weight: float,
               extra_loss: Optional[Callable] = None) -> torch.Tensor:
    """Eq. 15: lambda_reg * L1(x0, x0*) (when there is a target) + the optional style loss of x0. Both are sums
    over the batch of per-image losses, so each image's gradient is the one it would get alone."""
    loss = x0.new_zeros(())
    if target is not None and weight != 0:
        loss = loss + l1_regularizer(x0, target.detach().float(), weight)
    if extra_loss is not None:
        loss = loss + extra_loss(x0)
    return loss


def mcg_x0(x: torch.Tensor, sigma, denoise: Callable, target: Optional[torch.Tensor], weight: float,
           extra_loss: Optional[Callable] = None, form: NoiseForm = VE, scaler: Optional[LossScaler] = None):
    """Steps 1 of AGG: (D, x0_bar, loss) where x0_bar = D - sigma^2 * grad_x l(D(x)) (eps_tilde in the x0 term).

    In general x0_bar = D - (b^2 / a) grad_x l for a state x = a x0 + b eps (schedules.NoiseForm): eps_tilde =
    eps + sqrt(1 - a_t) grad_{x^VP} l moves the VP x0 estimate by -(1 - a_t)/sqrt(a_t) grad_{x^VP} l, and x^VP =
    x / n with n = sqrt(a^2 + b^2). VE (a = 1, b = sigma): sigma^2; FLOW (SD3; D = x - sigma v, so x0 = x - sigma v
    as the issue puts it): sigma^2 / (1 - sigma), no step at pure noise (a = 0; AGG leaves the top level unguided).
    The loss is a detached tensor (read it only for statistics: reading it is a host synchronisation); `scaler`
    (guidance.autograd.LossScaler) takes the gradient through a half-precision UNet."""
    scaler = scaler or LossScaler(False)
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        d = denoise(xg)
        loss = total_loss(d.float(), target, weight, extra_loss)
        grad = scaler.grad(loss, xg)
    d = d.detach()
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    scale = s * s if form is VE else torch.where(form.a(s) > 0, s * s / form.a(s).clamp_min(1e-30), s * 0)
    return d, d - append_dims(scale, x.ndim) * grad.to(x.dtype), loss.detach()


def dds_refine(x0: torch.Tensor, target: Optional[torch.Tensor], weight: float, lr: float = 0.01, steps: int = 10,
               losses: Optional[list] = None, extra_loss: Optional[Callable] = None,
               scaler: Optional[LossScaler] = None) -> torch.Tensor:
    """Step 2: AdamW on Delta over x0 against the same loss, without the UNet (through the VAE decoder and CLIP
    when `extra_loss` is the style term: `scaler` then takes its gradient). Returns x0 + Delta*."""
    scaler = scaler or LossScaler(False)
    if steps <= 0 or ((target is None or weight == 0) and extra_loss is None):
        return x0
    with torch.inference_mode(False), torch.enable_grad():
        base = x0.detach().clone().float()
        tgt = None if target is None else target.detach().clone().float()
        delta = torch.zeros_like(base, requires_grad=True)
        opt = torch.optim.AdamW([delta], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = total_loss(base + delta, tgt, weight, extra_loss)
            if losses is not None:
                losses.append(float(loss.detach()))
            scaler.backward(loss, [delta])
            opt.step()
        out = (base + delta).detach().to(x0.dtype)
    return out


def agg_step(x: torch.Tensor, sigma, sigma_next, denoise: Callable, target: Optional[torch.Tensor], weight: float,
             dds_lr: float = 0.01, dds_steps: int = 10, object_mask: Optional[torch.Tensor] = None,
             eta: float = 0.0, noise: Optional[torch.Tensor] = None, stats: Optional[dict] = None,
             extra_loss: Optional[Callable] = None, form: NoiseForm = VE, scaler: Optional[LossScaler] = None,
             last: Optional[bool] = None):
    """One reverse step -> (x_next, x0 used), in the model's NoiseForm `form`. `object_mask` [B or 1, H, W] (1 = object): Eq. 19's middle phase.
    `extra_loss(x0) -> scalar`: the optional style term of Eq. 15, added to the L1 regulariser. `scaler`: the run's
    guidance.autograd.LossScaler (half-precision networks). `last`: whether sigma_next is 0 (a loop that read its
    schedule once passes it, so no device value is read here; None reads sigma_next)."""
    if (target is None or weight == 0) and extra_loss is None:
        d = denoise(x)
        x0 = d
    else:
        d, x0_bar, loss = mcg_x0(x, sigma, denoise, target, weight, extra_loss, form, scaler)
        dds_losses = [] if stats is not None else None
        x0 = dds_refine(x0_bar, target, weight, dds_lr, dds_steps, dds_losses, extra_loss, scaler)
        if object_mask is not None:
            m = object_mask[:, None].to(x0)
            x0 = (1 - m) * x0 + m * d
        if stats is not None:
            stats.setdefault("mcg_loss", []).append(float(loss))
            with torch.inference_mode(False), torch.no_grad():
                after = total_loss(x0_bar.float(), target, weight, extra_loss)
            stats.setdefault("mcg_loss_after", []).append(float(after))
            stats.setdefault("dds_losses", []).append(dds_losses)
    if (float(sigma_next) == 0) if last is None else last:
        return x0, x0
    eps = form.eps(x, sigma, d)          # the original eps: the asymmetric update
    return ddim_step(x0, eps, sigma, sigma_next, eta=eta, noise=noise, form=form), x0


def boundary(value: float, steps: int) -> int:
    """A phase boundary given as a fraction of the steps (<= 1) or as a step count (> 1)."""
    if value < 0:
        raise ValueError(f"a step boundary cannot be negative ({value})")
    return int(round(value * steps)) if value <= 1 else min(int(value), steps)
